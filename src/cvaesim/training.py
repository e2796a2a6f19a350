"""Train the conv-CVAE on an image store, streaming densified batches from its sparse matrix."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import keras
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .images import scale_counts, to_images, unscale_counts
from .io import atomic_output
from .model import COUNT_LOSSES, ConditionalConvVAE

log = logging.getLogger(__name__)

# Below this KL divergence per cell (nats) the latent says next to nothing about a cell, and every
# cell of a type decodes to about the same profile: posterior collapse, the original design's
# failure, into which another seed or setting can fall too (a default run ends near 27).
COLLAPSED_KL = 2.0


@dataclass(frozen=True)
class TrainingSettings:
    """Defaults are the original's (RMSprop, learning rate 1e-3, batch 32, latent 2, MSE)."""

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
    reconstruction_loss: str = "mse"
    gene_offsets: bool = False
    early_stopping_patience: int = 0  # 0: train every epoch
    type_balance: float = 0.0  # 0: cells drawn as they come; 1: every type equally often
    count_split: float = 0.0  # 0: each training cell is its own target; else the encoder's share of its counts
    kl_warmup_epochs: int = 0  # epochs over which the KL weight rises from 0 to beta; 0: beta from the start
    mixed_precision: bool = False


class ImageBatches(keras.utils.PyDataset):
    """Batches of (images, one-hot cell types), densified from sparse rows one batch at a time.

    ``rows`` selects the cells (a split) from ``values`` without copying the matrix.
    """

    def __init__(self, values: sp.csr_matrix, rows: np.ndarray, codes: np.ndarray, n_cell_types: int,
                 pixel: np.ndarray, side: int, batch_size: int, seed: int | None = None,
                 to_counts: Callable[[sp.csr_matrix, np.ndarray], sp.csr_matrix] | None = None,
                 type_balance: float = 0.0, count_split: float = 0.0,
                 to_values: Callable[[sp.csr_matrix], sp.csr_matrix] | None = None, **kwargs):
        """``to_counts(values, rows)`` (the store's inverse scaling), when given, adds each batch's counts
        as images. ``type_balance`` α > 0 draws each epoch's cells with replacement, a cell of a type
        with n cells with weight n^-α: α = 1 gives every type the same share of the batches.

        ``count_split`` f > 0 (needs ``to_counts``, ``to_values``, the store's scaling, and a seed)
        splits each cell's counts binomially, a new split every epoch: the encoder sees the share f
        (scaled up by 1/f, so the image keeps the cell's depth) and the loss scores the other share
        (scaled up by 1/(1 - f)). The two shares' sampling noise is independent, so the decoder cannot
        learn to hand back a training cell's own noise, only what its other counts predict.
        """
        super().__init__(**kwargs)
        if count_split and (to_counts is None or to_values is None or seed is None):
            raise ValueError("splitting the counts needs the counts, the forward scaling and a seed")
        self.to_counts = to_counts
        self.to_values = to_values
        self.count_split = count_split
        self.values = values
        self.rows = rows
        self.codes = codes
        self.weights = None
        if type_balance > 0 and len(rows):
            row_codes = codes[rows]
            self.weights = np.bincount(row_codes)[row_codes] ** -float(type_balance)
            self.weights /= self.weights.sum()
        self.n_cell_types = n_cell_types
        self.pixel = pixel
        self.side = side
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.order = self._order()

    def _order(self) -> np.ndarray:
        if self.seed is None:
            return self.rows
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.weights is None:
            return rng.permutation(self.rows)
        return rng.choice(self.rows, size=len(self.rows), p=self.weights)

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.batch_size)

    def __getitem__(self, index: int):
        rows = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        values = self.values[rows]
        labels = np.eye(self.n_cell_types, dtype=np.float32)[self.codes[rows]]
        if self.to_counts is None:
            return (to_images(values, self.pixel, self.side), labels),
        # Unscaled while sparse: the nonzero values are a few percent of the pixels.
        counts = self.to_counts(values, rows)
        if self.count_split:
            encoded, counts = self.split(counts, index)
            values = self.to_values(encoded)
        return (to_images(values, self.pixel, self.side), labels, to_images(counts, self.pixel, self.side)),

    def split(self, counts: sp.csr_matrix, index: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
        """(the encoder's share scaled by 1/f, the rest scaled by 1/(1 - f)); seeded by epoch and batch,
        so batches prepared in parallel threads split the same way in every run."""
        rng = np.random.default_rng([self.seed, self.epoch, index])
        encoded = counts.copy()
        encoded.data = rng.binomial(counts.data.astype(np.int64), self.count_split).astype(np.float64)
        rest = counts.copy()
        rest.data = (counts.data - encoded.data) / (1 - self.count_split)
        encoded.data /= self.count_split
        return encoded, rest

    def on_epoch_end(self):
        self.start_at_epoch(self.epoch + 1)

    def start_at_epoch(self, epoch: int) -> None:
        """The batch order of an epoch depends on the seed and the epoch only, so a resumed run repeats it."""
        self.epoch = epoch
        self.order = self._order()


def describe_devices() -> str:
    gpus = [device for device in keras.distribution.list_devices() if device.lower().startswith(("gpu", "cuda"))]
    if gpus:
        return "GPU: " + ", ".join(gpus)
    return f"CPU (Keras's {keras.backend.backend()} backend sees no GPU)"


def batches_for(store: ad.AnnData, split: str, batch_size: int, seed: int | None,
                with_counts: bool = False, workers: int = 2, type_balance: float = 0.0,
                count_split: float = 0.0) -> ImageBatches:
    """Batches of one split of an image store; ``seed`` None keeps the cells in order.

    ``workers`` threads prepare batches while the model trains (measured: 37 -> 66 cells/s at
    side 144 on 2 CPU cores with 2); a GPU consumes them faster than two threads prepare them.
    """
    scale, scaling = store.var["scale"].to_numpy(), store.uns["image"]["scaling"]
    totals = store.obs["total_counts"].to_numpy()  # the library-normalised scaling's counts need them
    return ImageBatches(
        to_counts=(lambda values, rows: unscale_counts(values, scale, scaling, totals[rows])) if with_counts else None,
        to_values=lambda counts: scale_counts(counts, scale, scaling),
        values=sp.csr_matrix(store.X),  # shares the arrays of a CSR X: no copy
        rows=np.flatnonzero((store.obs["split"] == split).to_numpy()),
        codes=store.obs["cell_type"].cat.codes.to_numpy(),
        n_cell_types=store.obs["cell_type"].cat.categories.size,
        pixel=store.var["pixel"].to_numpy(),
        side=int(store.uns["image"]["side"]),
        batch_size=batch_size,
        seed=seed,
        type_balance=type_balance,
        count_split=count_split,
        workers=workers,
    )


def initial_gene_offsets(store: ad.AnnData, reconstruction_loss: str) -> np.ndarray:
    """Each pixel's starting offset, from the training cells: the decoder starts at their mean.

    Count losses: the log of each gene's share of all training counts (padding: far below any
    gene). MSE: the logit of each pixel's mean scaled value, for the sigmoid.
    """
    side = int(store.uns["image"]["side"])
    values = sp.csr_matrix(store.X)
    rows = np.flatnonzero((store.obs["split"] == "train").to_numpy())
    proportions = reconstruction_loss in COUNT_LOSSES
    scale, scaling = store.var["scale"].to_numpy(), store.uns["image"]["scaling"]
    totals = store.obs["total_counts"].to_numpy()
    sums = np.zeros(store.n_vars)
    # In chunks of rows: a copy of every training cell would cost PBMC68k's training job 0.5 GB.
    for start in range(0, len(rows), 4096):
        chunk_rows = rows[start:start + 4096]
        chunk = values[chunk_rows]
        if proportions:
            chunk = unscale_counts(chunk, scale, scaling, totals[chunk_rows])
        sums += np.asarray(chunk.sum(axis=0)).ravel()
    image = np.zeros(side * side)
    if proportions:
        image[store.var["pixel"].to_numpy()] = sums
        offsets = np.log(image / max(image.sum(), 1.0) + 1e-9)
    else:
        image[store.var["pixel"].to_numpy()] = sums / max(len(rows), 1)
        mean = np.clip(image, 1e-4, 1 - 1e-4)
        offsets = np.log(mean / (1 - mean))
    return offsets.reshape(side, side, 1).astype(np.float32)


def make_optimizer(settings: TrainingSettings) -> keras.optimizers.Optimizer:
    optimizers = {"rmsprop": keras.optimizers.RMSprop, "adam": keras.optimizers.Adam}
    return optimizers[settings.optimizer](learning_rate=settings.learning_rate)


class EpochCheckpoint(keras.callbacks.Callback):
    """After every epoch: every variable (weights, optimizer slots, sampler state) and the history.

    A training job killed mid-way (a cluster time limit, say) resumes from the last complete
    epoch when rerun with the same store, settings and seed; a different fingerprint starts over.
    Without a folder it only records the history.
    """

    def __init__(self, folder: Path | None, fingerprint: str):
        super().__init__()
        self.folder = Path(folder) if folder is not None else None
        self.fingerprint = fingerprint
        self.rows: list[dict] = []

    def _checkpoint(self):
        import tensorflow as tf  # resumable checkpoints are TensorFlow's; the model and batches need no TensorFlow

        # The sampler's seed state is named explicitly: it is not a layer weight.
        return tf.train.Checkpoint(model=self.model, optimizer=self.model.optimizer,
                                   sampler=self.model.sampling.seed_generator.state)

    def resume(self, model: keras.Model) -> int:
        """Load the last checkpoint into ``model`` if it is this run's; returns the epochs done."""
        state_path = self.folder / "state.json" if self.folder else None
        if state_path is None or not state_path.exists():
            return 0
        state = json.loads(state_path.read_text())
        if state["fingerprint"] != self.fingerprint:
            log.info("%s belongs to other settings or data; starting over", self.folder)
            return 0
        self.set_model(model)
        model.optimizer.build(model.trainable_variables)
        self._checkpoint().read(str(self.folder / state["prefix"])).assert_existing_objects_matched()
        self.rows = state["rows"]
        log.info("resuming from the checkpoint after epoch %d in %s", state["epoch"], self.folder)
        return state["epoch"]

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch + 1, **{name: float(value) for name, value in (logs or {}).items()}})
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        prefix = f"epoch-{epoch + 1}"
        self._checkpoint().write(str(self.folder / prefix))
        state = {"fingerprint": self.fingerprint, "epoch": epoch + 1, "prefix": prefix, "rows": self.rows}
        with atomic_output(self.folder / "state.json") as temporary:
            temporary.write_text(json.dumps(state))
        for old in self.folder.glob("epoch-*"):
            if not old.name.startswith(prefix + "."):
                old.unlink()

    def finish(self) -> pd.DataFrame:
        """The whole history; the checkpoints are no longer needed."""
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
        return pd.DataFrame(self.rows)


def use_threads(threads: int) -> None:
    """Size TensorFlow's thread pools to the job's threads; by default they take every core of the machine,
    whatever Snakemake gave the job. Too late once TensorFlow has run an operation (the pools then stay
    as they are, with a warning)."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as error:
        log.warning("TensorFlow's threads could not be limited to %d (%s)", threads, error)


def train(store: ad.AnnData, settings: TrainingSettings, seed: int, checkpoint: Path | None = None,
          fingerprint: str = "", callbacks: tuple = ()) -> tuple[ConditionalConvVAE, pd.DataFrame]:
    """Fit on the store's training cells, validating on its test cells each epoch.

    With ``checkpoint`` (a folder) every epoch is saved there and an interrupted run with the
    same ``fingerprint`` resumes; the folder is removed when training completes.
    """
    if (backend := keras.backend.backend()) != "tensorflow":
        raise RuntimeError(f"training needs Keras's TensorFlow backend (resumable checkpoints, operation determinism), "
                           f"but Keras runs on {backend!r}, as KERAS_BACKEND in the environment says; "
                           "unset it or set KERAS_BACKEND=tensorflow")
    import tensorflow as tf

    with_counts = settings.reconstruction_loss in COUNT_LOSSES
    if not 0 <= settings.count_split < 1:
        raise ValueError(f"train.count_split is the encoder's share of each cell's counts, at least 0 and below 1; "
                         f"got {settings.count_split}")
    if settings.count_split and not with_counts:
        raise ValueError(f"train.count_split needs a count loss ({', '.join(COUNT_LOSSES)}): the "
                         f"{settings.reconstruction_loss} loss scores the images, not the counts")
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
    # TF32, on by default on Ampere and later GPUs, rounds float32 convolutions and matrix products to 10-bit
    # mantissas: on an H100 it cost realism (RF AUC 0.022 higher over ten seeds) at no gain in speed.
    tf.config.experimental.enable_tensor_float_32_execution(False)
    devices = describe_devices()
    log.info("training on %s", devices)
    if settings.mixed_precision:
        if devices.startswith("GPU"):
            keras.mixed_precision.set_global_policy("mixed_float16")
            log.info("mixed precision: float16 compute, float32 variables and losses")
        else:
            log.warning("mixed precision needs a GPU; training in float32")
    training_batches = batches_for(store, "train", settings.batch_size, seed, with_counts,
                                   type_balance=settings.type_balance, count_split=settings.count_split)
    test_batches = batches_for(store, "test", settings.batch_size, None, with_counts)
    model = ConditionalConvVAE(
        image_side=int(store.uns["image"]["side"]),
        n_cell_types=store.obs["cell_type"].cat.categories.size,
        filters=settings.filters, kernel_size=settings.kernel_size, strides=settings.strides,
        dense_units=settings.dense_units, latent_dim=settings.latent_dim, beta=settings.beta, seed=seed,
        reconstruction_loss=settings.reconstruction_loss, n_genes=store.n_vars, gene_offsets=settings.gene_offsets,
        kl_warmup_steps=settings.kl_warmup_epochs * len(training_batches),
    )
    if not np.array_equal(np.sort(store.var["pixel"].to_numpy()), np.arange(store.n_vars)):
        raise ValueError("the genes must fill the image's first pixels (the rest is padding)")
    if settings.gene_offsets:
        model.decoder.get_layer("gene_offsets").set_weights([initial_gene_offsets(store, settings.reconstruction_loss)])
    model.compile(optimizer=make_optimizer(settings))
    log.info("%d training and %d test cells, image side %d, %d parameters",
             len(training_batches.rows), len(test_batches.rows), model.image_side, model.count_params())
    saver = EpochCheckpoint(checkpoint, fingerprint)
    done = saver.resume(model)
    training_batches.start_at_epoch(done)
    stopping = []
    if settings.early_stopping_patience and len(test_batches.rows):
        # The test cells' loss picks the epoch whose weights are kept. (After a resume, the
        # count of epochs without improvement starts again.)
        stopping = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=settings.early_stopping_patience,
                                                  restore_best_weights=True, verbose=1)]
    model.fit(
        training_batches,
        validation_data=test_batches if len(test_batches.rows) else None,
        epochs=settings.epochs,
        initial_epoch=done,
        shuffle=False,  # the batches shuffle themselves, by seed and epoch: Keras would use the global RNG
        verbose=2,
        callbacks=[saver, *stopping, *callbacks],
    )
    history = saver.finish()
    if warning := collapse_warning(history):
        log.warning(warning)
    return model, history


def collapse_warning(history: pd.DataFrame) -> str | None:
    """What to tell the user when the last epoch's KL says the latent collapsed; None when it did not."""
    kl = float(history["kl_loss"].iloc[-1])
    if kl >= COLLAPSED_KL:
        return None
    return (f"the latent carries almost nothing: KL {kl:.3g} nats per training cell at the last epoch (below "
            f"{COLLAPSED_KL:g}); every cell of a type decodes to about the same profile, so simulated cells will score "
            "near the naive baselines. Retrain with another seed or a smaller train.beta")
