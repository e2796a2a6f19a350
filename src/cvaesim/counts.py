"""Integer counts drawn around expected profiles, sparse: used by the simulator and the evaluation's baselines.

Kept free of TensorFlow so that evaluation does not load it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

COUNT_SAMPLING = ("poisson", "round")


def draw_counts(profiles: np.ndarray, totals: np.ndarray, method: str, rng: np.random.Generator) -> sp.csr_matrix:
    """Sparse integer counts whose expectation is ``totals`` spread over the genes in proportion to ``profiles``.

    ``profiles`` (cells x genes, non-negative) need not sum to one. ``'poisson'`` draws each
    gene independently from a Poisson; ``'round'`` takes the nearest integer to the expectation.
    """
    if method == "poisson":
        return poisson_counts(profiles, totals, rng)
    if method == "round":
        sums = profiles.sum(axis=1, keepdims=True)
        expected = np.divide(profiles * np.asarray(totals, dtype=np.float64)[:, np.newaxis], sums,
                             out=np.zeros(profiles.shape), where=sums > 0)
        return sp.csr_matrix(np.rint(expected).astype(np.int32))
    raise ValueError(f"unknown count sampling {method!r}; choose one of {COUNT_SAMPLING}")


def poisson_counts(profiles: np.ndarray, totals: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Independent Poisson counts per gene, drawn as N ~ Poisson(total) molecules placed by proportion.

    The same distribution as one Poisson draw per gene, but the work scales with the library
    size (thousands) rather than the number of genes (tens of thousands).
    """
    n_cells, n_genes = profiles.shape
    cdf = np.cumsum(profiles, axis=1, dtype=np.float64)
    molecules = rng.poisson(np.where(cdf[:, -1] > 0, totals, 0))
    indices, data = [], []
    for row, n_molecules in enumerate(molecules):
        # Sorted points come out as sorted genes, so each run of one gene is its count.
        points = np.sort(rng.random(n_molecules)) * cdf[row, -1]
        genes = np.minimum(np.searchsorted(cdf[row], points, side="right"), n_genes - 1)
        starts = np.flatnonzero(np.diff(genes, prepend=-1))
        indices.append(genes[starts])
        data.append(np.diff(starts, append=len(genes)))
    indptr = np.concatenate([[0], np.cumsum([len(row) for row in indices])])
    empty = np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.concatenate(data or [empty]).astype(np.int32), np.concatenate(indices or [empty]),
                          indptr), shape=(n_cells, n_genes))
