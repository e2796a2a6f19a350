"""Generate cells of chosen types from a trained model, in batches, as sparse integer counts."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .images import from_images, unscale
from .model import ConditionalConvVAE

log = logging.getLogger(__name__)

COUNT_SAMPLING = ("poisson", "round")
LIBRARY_SIZES = ("resampled", "decoded")


def expected_to_counts(expected: np.ndarray, method: str, rng: np.random.Generator) -> np.ndarray:
    """Decoded expected counts to integers: a Poisson draw around them, or the nearest integer."""
    if method == "poisson":
        return rng.poisson(np.maximum(expected, 0.0)).astype(np.int32)
    if method == "round":
        return np.rint(np.maximum(expected, 0.0)).astype(np.int32)
    raise ValueError(f"unknown count sampling {method!r}; choose one of {COUNT_SAMPLING}")


def rescale_libraries(expected: np.ndarray, libraries: np.ndarray) -> np.ndarray:
    """Expected counts rescaled so that each cell's total is its library size (all-zero cells stay zero)."""
    totals = expected.sum(axis=1, keepdims=True)
    return np.divide(expected * libraries[:, np.newaxis], totals, out=np.zeros_like(expected), where=totals > 0)


class Simulator:
    """Generates cells of chosen types from a trained model, one decoder call per batch.

    ``store_meta`` is the image store (its X is not read): cell-type order, gene layout,
    the scaling whose inverse turns decoded pixels into expected counts, and the training
    cells' library sizes. z is drawn from the prior N(0, I). With
    ``library_sizes='resampled'`` each cell's expected counts are rescaled to the library
    size of a random training cell of its type; ``'decoded'`` keeps the decoder's own total.
    """

    def __init__(self, model: ConditionalConvVAE, store_meta: ad.AnnData, batch_size: int = 1024,
                 count_sampling: str = "poisson", library_sizes: str = "resampled"):
        if count_sampling not in COUNT_SAMPLING:
            raise ValueError(f"unknown count sampling {count_sampling!r}; choose one of {COUNT_SAMPLING}")
        if library_sizes not in LIBRARY_SIZES:
            raise ValueError(f"unknown library sizes {library_sizes!r}; choose one of {LIBRARY_SIZES}")
        self.model = model
        self.batch_size = batch_size
        self.count_sampling = count_sampling
        self.library_sizes = library_sizes
        self.cell_types = list(store_meta.obs["cell_type"].cat.categories)
        self.pixel = store_meta.var["pixel"].to_numpy()
        self.scale = store_meta.var["scale"].to_numpy()
        self.scaling = store_meta.uns["image"]["scaling"]
        self.var = store_meta.var.drop(columns=["pixel", "scale"])
        training = store_meta.obs[store_meta.obs["split"] == "train"]
        self.training_libraries = {
            name: group["total_counts"].to_numpy() for name, group in training.groupby("cell_type", observed=True)
        }

    def check(self, cells_per_type: dict[str, int]) -> None:
        unknown = sorted(set(cells_per_type) - set(self.cell_types))
        if unknown:
            raise ValueError(f"unknown cell types {unknown}; the model knows {self.cell_types}")

    def batches(self, cells_per_type: dict[str, int], seed: int) -> Iterator[tuple[sp.csr_matrix, str]]:
        """Yield (integer counts of up to ``batch_size`` cells, their cell type), seeded."""
        self.check(cells_per_type)
        rng = np.random.default_rng(seed)
        identity = np.eye(len(self.cell_types), dtype=np.float32)
        for cell_type, n_cells in cells_per_type.items():
            label = identity[self.cell_types.index(cell_type)]
            for start in range(0, n_cells, self.batch_size):
                n = min(self.batch_size, n_cells - start)
                z = rng.standard_normal((n, self.model.latent_dim)).astype(np.float32)
                decoded = self.model.decoder.predict_on_batch([z, np.broadcast_to(label, (n, label.size))])
                expected = unscale(from_images(np.asarray(decoded), self.pixel).astype(np.float64),
                                   self.scale, self.scaling)
                if self.library_sizes == "resampled":
                    expected = rescale_libraries(expected, rng.choice(self.training_libraries[cell_type], size=n))
                yield sp.csr_matrix(expected_to_counts(expected, self.count_sampling, rng)), cell_type
            log.info("simulated %d cells of %s", n_cells, cell_type)

    def to_anndata(self, cells_per_type: dict[str, int], seed: int) -> ad.AnnData:
        """All requested cells in memory; for many cells, write :meth:`batches` as they come."""
        blocks, labels = [], []
        for counts, cell_type in self.batches(cells_per_type, seed):
            blocks.append(counts)
            labels.extend([cell_type] * counts.shape[0])
        counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(self.pixel)), dtype=np.int32)
        obs = pd.DataFrame({"cell_type": pd.Categorical(labels, categories=self.cell_types)},
                           index=cell_names(len(labels)))
        simulated = ad.AnnData(X=counts, obs=obs, var=self.var)
        simulated.uns["simulation"] = self.settings(seed)
        return simulated

    def settings(self, seed: int) -> dict:
        return {"seed": seed, "count_sampling": self.count_sampling, "library_sizes": self.library_sizes,
                "latent": "prior"}


def cell_names(n_cells: int, start: int = 0) -> list[str]:
    return [f"simulated_{i}" for i in range(start, start + n_cells)]


def simulate(
    model: ConditionalConvVAE,
    store_meta: ad.AnnData,
    cells_per_type: dict[str, int],
    seed: int,
    batch_size: int = 1024,
    count_sampling: str = "poisson",
    library_sizes: str = "resampled",
) -> ad.AnnData:
    """All requested cells in memory, as one AnnData (see :class:`Simulator`)."""
    return Simulator(model, store_meta, batch_size, count_sampling, library_sizes).to_anndata(cells_per_type, seed)
