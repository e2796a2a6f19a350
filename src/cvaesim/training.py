"""Train the conv-CVAE on an image store, streaming densified batches from its sparse matrix."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import anndata as ad
import keras
import numpy as np
import pandas as pd
import scipy.sparse as sp
import tensorflow as tf

from .images import to_images
from .model import ConditionalConvVAE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingSettings:
    """Defaults are the original's (RMSprop, learning rate 1e-3, batch 32)."""

    epochs: int = 50
    batch_size: int = 32
    learning_rate: float = 1e-3
    optimizer: str = "rmsprop"
    filters: int = 16
    kernel_size: int = 3
    strides: int = 2
    dense_units: int = 16
    latent_dim: int = 2
    beta: float = 1.0


class ImageBatches(keras.utils.PyDataset):
    """Batches of (images, one-hot cell types), densified from sparse rows one batch at a time."""

    def __init__(self, values: sp.csr_matrix, codes: np.ndarray, n_cell_types: int, pixel: np.ndarray,
                 side: int, batch_size: int, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.values = values
        self.codes = codes
        self.n_cell_types = n_cell_types
        self.pixel = pixel
        self.side = side
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if self.seed is None:
            return np.arange(self.values.shape[0])
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.values.shape[0])

    def __len__(self) -> int:
        return math.ceil(self.values.shape[0] / self.batch_size)

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        images = to_images(self.values[rows], self.pixel, self.side)
        labels = np.eye(self.n_cell_types, dtype=np.float32)[self.codes[rows]]
        return (images, labels),

    def on_epoch_end(self):
        self.epoch += 1
        self.order = self._order()


def describe_devices() -> str:
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return "GPU: " + ", ".join(gpu.name for gpu in gpus)
    return "CPU (TensorFlow sees no GPU)"


def batches_for(store: ad.AnnData, split: str, batch_size: int, seed: int | None) -> ImageBatches:
    """Batches of one split of an image store; ``seed`` None keeps the cells in order."""
    cells = (store.obs["split"] == split).to_numpy()
    return ImageBatches(
        values=sp.csr_matrix(store.X)[cells],
        codes=store.obs["cell_type"].cat.codes.to_numpy()[cells],
        n_cell_types=store.obs["cell_type"].cat.categories.size,
        pixel=store.var["pixel"].to_numpy(),
        side=int(store.uns["image"]["side"]),
        batch_size=batch_size,
        seed=seed,
    )


def make_optimizer(settings: TrainingSettings) -> keras.optimizers.Optimizer:
    optimizers = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam}
    return optimizers[settings.optimizer](learning_rate=settings.learning_rate)


def train(store: ad.AnnData, settings: TrainingSettings, seed: int) -> tuple[ConditionalConvVAE, pd.DataFrame]:
    """Fit on the store's training cells, validating on its test cells each epoch."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    log.info("training on %s", describe_devices())
    model = ConditionalConvVAE(
        image_side=int(store.uns["image"]["side"]),
        n_cell_types=store.obs["cell_type"].cat.categories.size,
        filters=settings.filters, kernel_size=settings.kernel_size, strides=settings.strides,
        dense_units=settings.dense_units, latent_dim=settings.latent_dim, beta=settings.beta, seed=seed,
    )
    model.compile(optimizer=make_optimizer(settings))
    training_batches = batches_for(store, "train", settings.batch_size, seed)
    test_batches = batches_for(store, "test", settings.batch_size, None)
    log.info("%d training and %d test cells, image side %d, %d parameters",
             training_batches.values.shape[0], test_batches.values.shape[0], model.image_side, model.count_params())
    history = model.fit(
        training_batches,
        validation_data=test_batches if len(test_batches.codes) else None,
        epochs=settings.epochs,
        verbose=2,
    )
    table = pd.DataFrame(history.history)
    table.insert(0, "epoch", np.arange(1, len(table) + 1))
    return model, table
