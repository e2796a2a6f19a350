"""Generate cells of chosen types from a trained model, in batches, as sparse integer counts."""

from __future__ import annotations

import logging

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


def simulate(
    model: ConditionalConvVAE,
    store_meta: ad.AnnData,
    cells_per_type: dict[str, int],
    seed: int,
    batch_size: int = 1024,
    count_sampling: str = "poisson",
    library_sizes: str = "resampled",
) -> ad.AnnData:
    """Draw z ~ N(0, I) for each requested cell, decode with its type, map back to counts.

    ``store_meta`` is the image store (its X is not read): cell-type order, gene layout,
    the scaling whose inverse turns decoded pixels into expected counts, and the training
    cells' library sizes. With ``library_sizes='resampled'`` each cell's expected counts are
    rescaled to the library size of a random training cell of its type; ``'decoded'`` keeps
    the decoder's own total.
    """
    if library_sizes not in LIBRARY_SIZES:
        raise ValueError(f"unknown library sizes {library_sizes!r}; choose one of {LIBRARY_SIZES}")
    cell_types = list(store_meta.obs["cell_type"].cat.categories)
    unknown = sorted(set(cells_per_type) - set(cell_types))
    if unknown:
        raise ValueError(f"unknown cell types {unknown}; the model knows {cell_types}")
    pixel = store_meta.var["pixel"].to_numpy()
    scale = store_meta.var["scale"].to_numpy()
    scaling = store_meta.uns["image"]["scaling"]
    training = (store_meta.obs["split"] == "train").to_numpy()
    rng = np.random.default_rng(seed)
    identity = np.eye(len(cell_types), dtype=np.float32)
    blocks, labels = [], []
    for cell_type, n_cells in cells_per_type.items():
        code = cell_types.index(cell_type)
        type_libraries = store_meta.obs["total_counts"].to_numpy()[
            training & (store_meta.obs["cell_type"] == cell_type).to_numpy()]
        for start in range(0, n_cells, batch_size):
            n = min(batch_size, n_cells - start)
            z = rng.standard_normal((n, model.latent_dim)).astype(np.float32)
            decoded = model.decoder.predict_on_batch([z, np.repeat(identity[code:code + 1], n, axis=0)])
            expected = unscale(from_images(decoded, pixel).astype(np.float64), scale, scaling)
            if library_sizes == "resampled":
                expected = rescale_libraries(expected, rng.choice(type_libraries, size=n))
            blocks.append(sp.csr_matrix(expected_to_counts(expected, count_sampling, rng)))
            labels.extend([cell_type] * n)
        log.info("simulated %d cells of %s", n_cells, cell_type)
    counts = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, len(pixel)), dtype=np.int32)
    obs = pd.DataFrame(
        {"cell_type": pd.Categorical(labels, categories=cell_types)},
        index=pd.Index([f"simulated_{i}" for i in range(len(labels))]),
    )
    var = store_meta.var.drop(columns=["pixel", "scale"])
    simulated = ad.AnnData(X=counts, obs=obs, var=var)
    simulated.uns["simulation"] = {"seed": seed, "count_sampling": count_sampling,
                                   "library_sizes": library_sizes, "latent": "prior"}
    return simulated


def to_original_table(simulated: ad.AnnData) -> pd.DataFrame:
    """The original's layout: one row per cell, one column per gene, then a label column."""
    table = pd.DataFrame(simulated.X.toarray(), columns=simulated.var_names, index=simulated.obs_names)
    table["cell_type"] = simulated.obs["cell_type"].astype(str).to_numpy()
    return table
