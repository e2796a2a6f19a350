"""Generate cells of chosen types from a trained model, in batches, as sparse integer counts."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from .images import from_images, to_images, unscale
from .model import ConditionalConvVAE

log = logging.getLogger(__name__)

COUNT_SAMPLING = ("poisson", "round")
LIBRARY_SIZES = ("resampled", "decoded")
LATENT_DRAWS = ("prior", "posterior")


def expected_to_counts(expected: np.ndarray, method: str, rng: np.random.Generator) -> sp.csr_matrix:
    """Decoded expected counts to sparse integers: a Poisson draw around them, or the nearest integer."""
    expected = np.maximum(expected, 0.0)
    if method == "poisson":
        return poisson_counts(expected, rng)
    if method == "round":
        return sp.csr_matrix(np.rint(expected).astype(np.int32))
    raise ValueError(f"unknown count sampling {method!r}; choose one of {COUNT_SAMPLING}")


def poisson_counts(expected: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Independent Poisson(expected) counts, drawn as N ~ Poisson(sum) molecules placed by proportion.

    The same distribution as one Poisson draw per gene, but the work scales with the library
    size (thousands) rather than the number of genes (tens of thousands).
    """
    n_cells, n_genes = expected.shape
    totals = expected.sum(axis=1)
    molecules = rng.poisson(totals)
    cdf = np.cumsum(expected, axis=1)
    cdf /= np.where(totals > 0, totals, 1.0)[:, np.newaxis]
    cdf[:, -1] = 1.0
    # Row i's cdf is shifted into (i, i + 1], so one sorted search places every molecule.
    cdf += np.arange(n_cells)[:, np.newaxis]
    owners = np.repeat(np.arange(n_cells), molecules)
    positions = np.searchsorted(cdf.ravel(), owners + rng.random(len(owners)), side="right")
    positions = np.minimum(positions, owners * n_genes + n_genes - 1)  # guards the last gene of each row
    counts = sp.csr_matrix((np.ones(len(positions), dtype=np.int32), (owners, positions - owners * n_genes)),
                           shape=(n_cells, n_genes))
    counts.sum_duplicates()
    return counts


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def rescale_libraries(expected: np.ndarray, libraries: np.ndarray) -> np.ndarray:
    """Expected counts rescaled so that each cell's total is its library size (all-zero cells stay zero)."""
    totals = expected.sum(axis=1, keepdims=True)
    return np.divide(expected * libraries[:, np.newaxis], totals, out=np.zeros_like(expected), where=totals > 0)


class Simulator:
    """Generates cells of chosen types from a trained model, one decoder call per batch.

    ``store_meta`` is the image store: cell-type order, gene layout, the scaling whose
    inverse turns decoded pixels into expected counts, and the training cells' library
    sizes (its X is read only for posterior draws). ``latent='prior'`` draws z ~ N(0, I);
    ``'posterior'`` encodes a random training cell of the type and draws z from its
    posterior N(mean, var), which keeps z where the decoder was trained. With
    ``library_sizes='resampled'`` each cell's expected counts are rescaled to the library
    size of a random training cell of its type; ``'decoded'`` keeps the decoder's own total
    (only for models whose decoder gives counts, not proportions).
    """

    def __init__(self, model: ConditionalConvVAE, store_meta: ad.AnnData, batch_size: int = 256,
                 count_sampling: str = "poisson", library_sizes: str = "resampled", latent: str = "prior"):
        if count_sampling not in COUNT_SAMPLING:
            raise ValueError(f"unknown count sampling {count_sampling!r}; choose one of {COUNT_SAMPLING}")
        if library_sizes not in LIBRARY_SIZES:
            raise ValueError(f"unknown library sizes {library_sizes!r}; choose one of {LIBRARY_SIZES}")
        if latent not in LATENT_DRAWS:
            raise ValueError(f"unknown latent draws {latent!r}; choose one of {LATENT_DRAWS}")
        self.proportions = getattr(model, "reconstruction_loss", "mse") == "multinomial"
        if self.proportions and library_sizes == "decoded":
            raise ValueError("a multinomial model decodes proportions, not totals: library sizes must be 'resampled'")
        self.model = model
        self.latent = latent
        self.batch_size = batch_size
        self.count_sampling = count_sampling
        self.library_sizes = library_sizes
        self.cell_types = list(store_meta.obs["cell_type"].cat.categories)
        self.pixel = store_meta.var["pixel"].to_numpy()
        self.scale = store_meta.var["scale"].to_numpy()
        self.scaling = store_meta.uns["image"]["scaling"]
        self.var = store_meta.var.drop(columns=["pixel", "scale"])
        is_training = (store_meta.obs["split"] == "train").to_numpy()
        training = store_meta.obs[is_training]
        self.training_libraries = {
            name: group["total_counts"].to_numpy() for name, group in training.groupby("cell_type", observed=True)
        }
        if latent == "posterior":
            self.side = int(store_meta.uns["image"]["side"])
            self.training_values = sp.csr_matrix(store_meta.X[np.flatnonzero(is_training)])
            self.training_rows = {name: np.flatnonzero(training["cell_type"].to_numpy() == name)
                                  for name in self.training_libraries}

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
                labels = np.broadcast_to(label, (n, label.size))
                z = self.draw_latent(cell_type, labels, rng)
                decoded = from_images(np.asarray(self.model.decoder.predict_on_batch([z, labels])), self.pixel)
                if self.proportions:
                    expected = softmax(decoded.astype(np.float64))
                else:
                    expected = unscale(decoded.astype(np.float64), self.scale, self.scaling)
                if self.library_sizes == "resampled":
                    expected = rescale_libraries(expected, rng.choice(self.training_libraries[cell_type], size=n))
                yield expected_to_counts(expected, self.count_sampling, rng), cell_type
            log.info("simulated %d cells of %s", n_cells, cell_type)

    def draw_latent(self, cell_type: str, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(labels)
        epsilon = rng.standard_normal((n, self.model.latent_dim))
        if self.latent == "prior":
            return epsilon.astype(np.float32)
        rows = rng.choice(self.training_rows[cell_type], size=n)
        images = to_images(self.training_values[rows], self.pixel, self.side)
        z_mean, z_log_var = (np.asarray(value, dtype=np.float64)
                             for value in self.model.encoder.predict_on_batch([images, labels]))
        return (z_mean + np.exp(0.5 * z_log_var) * epsilon).astype(np.float32)

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
                "latent": self.latent}


def cell_names(n_cells: int, start: int = 0) -> list[str]:
    return [f"simulated_{i}" for i in range(start, start + n_cells)]


def simulate(
    model: ConditionalConvVAE,
    store_meta: ad.AnnData,
    cells_per_type: dict[str, int],
    seed: int,
    batch_size: int = 256,
    count_sampling: str = "poisson",
    library_sizes: str = "resampled",
    latent: str = "prior",
) -> ad.AnnData:
    """All requested cells in memory, as one AnnData (see :class:`Simulator`)."""
    return Simulator(model, store_meta, batch_size, count_sampling, library_sizes, latent).to_anndata(
        cells_per_type, seed)
