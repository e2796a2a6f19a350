"""Integer counts drawn around expected profiles, sparse: used by the simulator and the evaluation's baselines.

Kept free of TensorFlow so that evaluation does not load it.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

COUNT_SAMPLING = ("poisson", "round", "negative_binomial")


# How often a cell that came out empty is drawn again: one expecting a single count stays empty with odds of 1e-50.
MAX_REDRAWS = 115


def draw_counts(profiles: np.ndarray, totals: np.ndarray, method: str, rng: np.random.Generator,
                dispersion: np.ndarray | None = None) -> sp.csr_matrix:
    """Sparse integer counts whose expectation is ``totals`` spread over the genes in proportion to ``profiles``.

    ``profiles`` (cells x genes, non-negative) need not sum to one. ``'poisson'`` draws each
    gene independently from a Poisson; ``'negative_binomial'`` from a negative binomial with
    each gene's inverse dispersion ``dispersion`` (variance mu + mu^2 / dispersion; ``inf``:
    Poisson); ``'round'`` takes the nearest integer to the expectation.

    A drawn cell has at least one count wherever it expects any: a real cell has (the filter drops
    barcodes without a count), so a cell that came out empty is drawn again, which gives the draw's
    distribution given at least one count. That matters only where libraries are tiny: a cell expecting
    one count comes out empty 37% of the time.
    """
    if method not in COUNT_SAMPLING:
        raise ValueError(f"unknown count sampling {method!r}; choose one of {COUNT_SAMPLING}")
    if method == "negative_binomial" and (dispersion is None or len(dispersion) != profiles.shape[1]):
        raise ValueError("negative-binomial counts need one dispersion per gene")
    totals = np.asarray(totals, dtype=np.float64)
    counts = _counts_around(profiles, totals, method, rng, dispersion)
    if method == "round":
        return counts
    empty = np.flatnonzero(np.diff(counts.indptr) == 0)
    # Only the empty cells are looked at: cells expecting no count (no profile or no library) stay empty.
    empty = empty[(totals[empty] > 0) & (profiles[empty].sum(axis=1) > 0)]
    for _ in range(MAX_REDRAWS):
        if not len(empty):
            break
        redrawn = _counts_around(profiles[empty], totals[empty], method, rng, dispersion)
        order = np.arange(counts.shape[0])
        order[empty] = counts.shape[0] + np.arange(len(empty))
        counts = sp.vstack([counts, redrawn], format="csr")[order]
        counts.sort_indices()
        empty = empty[np.diff(redrawn.indptr) == 0]
    return counts


def expected_counts(profiles: np.ndarray, totals: np.ndarray) -> np.ndarray:
    """Each cell's expected count of each gene: its total spread over the genes in proportion to its profile."""
    sums = profiles.sum(axis=1, dtype=np.float64)
    scale = np.divide(np.asarray(totals, dtype=np.float64), sums, out=np.zeros(len(sums)), where=sums > 0)
    return profiles * scale[:, np.newaxis]


def _counts_around(profiles: np.ndarray, totals: np.ndarray, method: str, rng: np.random.Generator,
                   dispersion: np.ndarray | None) -> sp.csr_matrix:
    if method == "poisson":
        return poisson_counts(profiles, totals, rng)
    expected = expected_counts(profiles, totals)
    if method == "round":
        return sp.csr_matrix(np.rint(expected).astype(np.int32))
    return negative_binomial_counts(expected, np.asarray(dispersion, dtype=np.float64), rng)


def poisson_counts(profiles: np.ndarray, totals: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Independent Poisson counts per gene, drawn as N ~ Poisson(total) molecules placed by proportion.

    The same distribution as one Poisson draw per gene, but the work scales with the library
    size (thousands) rather than the number of genes (tens of thousands).
    """
    n_cells, n_genes = profiles.shape
    molecules = rng.poisson(np.where(profiles.sum(axis=1) > 0, totals, 0))
    indices, data = [], []
    for row, n_molecules in enumerate(molecules):
        # Row by row: numpy's cumulative sum along the rows of a 2-D array is 2.5x slower.
        cdf = np.cumsum(profiles[row], dtype=np.float64)
        # Sorted points come out as sorted genes, so each run of one gene is its count.
        points = np.sort(rng.random(n_molecules)) * cdf[-1]
        genes = np.minimum(np.searchsorted(cdf, points, side="right"), n_genes - 1)
        starts = np.flatnonzero(np.diff(genes, prepend=-1))
        indices.append(genes[starts])
        data.append(np.diff(starts, append=len(genes)))
    indptr = np.concatenate([[0], np.cumsum([len(row) for row in indices])])
    empty = np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((np.concatenate(data or [empty]).astype(np.int32), np.concatenate(indices or [empty]),
                          indptr), shape=(n_cells, n_genes))


def negative_binomial_counts(expected: np.ndarray, dispersion: np.ndarray, rng: np.random.Generator) -> sp.csr_matrix:
    """Independent negative-binomial counts (mean ``expected``, inverse dispersion per gene; ``inf``: Poisson).

    Drawn as a compound Poisson: a Poisson number of clusters per gene, rate theta log(1 + mu/theta),
    each cluster of a logarithmic size with p = mu / (theta + mu). The same distribution as a
    Poisson around a gamma-distributed mean, but the work scales with the counts drawn rather
    than the number of genes (a gamma draw per gene costs more than the rest of a simulation).
    """
    finite = np.isfinite(dispersion)
    theta = np.where(finite, dispersion, 1.0)
    # In place: these passes over every gene of every cell are most of the time.
    cluster_rates = expected / theta
    np.log1p(cluster_rates, out=cluster_rates)
    cluster_rates *= theta
    cluster_rates[:, ~finite] = expected[:, ~finite]
    clusters = poisson_counts(cluster_rates, cluster_rates.sum(axis=1), rng)
    rows = np.repeat(np.arange(clusters.shape[0]), np.diff(clusters.indptr))
    genes = clusters.indices
    mean = expected[rows, genes]
    # p = 0 (a Poisson gene) gives clusters of one count.
    cluster_p = np.where(finite[genes], mean / (theta[genes] + mean), 0.0)
    sizes = rng.logseries(np.repeat(cluster_p, clusters.data))
    starts = np.concatenate([[0], np.cumsum(clusters.data)[:-1]]).astype(np.int64)
    data = np.add.reduceat(sizes, starts) if len(sizes) else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((data.astype(np.int32), genes, clusters.indptr), shape=clusters.shape)
