"""Turn each cell's gene vector into a square image: layout, scaling to [0, 1] and the split.

The image store is an AnnData whose X holds the scaled values (sparse, float32), with
``var['pixel']`` (where each gene sits in the flattened side x side image),
``var['scale']`` (the scaling's saved parameters, per gene), ``uns['image']`` (side and
scaling method), ``obs['split']`` (train or test) and ``obs['total_counts']`` (library size). Batches are densified one at a time.
"""

from __future__ import annotations

import logging
import math

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import InputError

log = logging.getLogger(__name__)

SCALINGS = ("global_max", "log1p_gene_max", "log1p_cp10k_gene_max")
GENE_ORDERS = ("matrix", "correlation")


def image_side(n_genes: int, side: int | None = None, multiple: int = 4) -> int:
    """The smallest multiple of ``multiple`` whose square holds ``n_genes``, or a checked ``side``."""
    smallest = multiple
    while smallest**2 < n_genes:
        smallest += multiple
    if side is None:
        return smallest
    if side % multiple or side < smallest:
        raise InputError(
            f"image side {side} cannot be used: it must be a multiple of {multiple} whose square holds "
            f"{n_genes} genes (the smallest is {smallest})"
        )
    return side


def normalise_libraries(counts: sp.csr_matrix, dtype=np.float64) -> sp.csr_matrix:
    """Counts per 10,000 (CP10k) of each cell's library, on a single copy of the nonzero values."""
    normalised = sp.csr_matrix(counts, dtype=dtype, copy=True)
    totals = np.maximum(np.asarray(normalised.sum(axis=1)).ravel(), 1)
    normalised.data *= np.repeat((1e4 / totals).astype(dtype), np.diff(normalised.indptr))
    return normalised


def fit_scale(counts: sp.csr_matrix, method: str) -> np.ndarray:
    """Per-gene divisors that map the fitted cells' values into [0, 1]."""
    if method == "global_max":
        # The original: one divisor, the largest count.
        return np.full(counts.shape[1], max(counts.max(), 1), dtype=np.float64)
    if method in ("log1p_gene_max", "log1p_cp10k_gene_max"):
        if method == "log1p_cp10k_gene_max":
            counts = normalise_libraries(counts)
        gene_max = np.asarray(counts.max(axis=0).todense()).ravel().astype(np.float64)
        # At least log1p(1): a gene the fitted cells never express keeps a finite divisor.
        return np.log1p(np.maximum(gene_max, 1))
    raise ValueError(f"unknown scaling {method!r}; choose one of {SCALINGS}")


def scale_counts(counts: sp.csr_matrix, scale: np.ndarray, method: str) -> sp.csr_matrix:
    """Counts to [0, 1], keeping zeros zero (so the matrix stays sparse)."""
    # In place on one float32 copy of the nonzero values: PBMC68k has 55 million of them.
    if method == "log1p_cp10k_gene_max":
        values = normalise_libraries(counts, np.float32)
    else:
        values = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    if method != "global_max":
        np.log1p(values.data, out=values.data)
    values.data /= scale.astype(np.float32)[values.indices]
    np.clip(values.data, 0.0, 1.0, out=values.data)  # test cells may exceed the training cells' maximum
    return values


def unscale(values: np.ndarray, scale: np.ndarray, method: str) -> np.ndarray:
    """The inverse of :func:`scale_counts`: scaled values back to expected counts or, for
    ``log1p_cp10k_gene_max``, to counts per 10,000 (see :func:`unscale_counts` for counts)."""
    if method == "global_max":
        return values * scale
    if method in ("log1p_gene_max", "log1p_cp10k_gene_max"):
        return np.expm1(values * scale)
    raise ValueError(f"unknown scaling {method!r}; choose one of {SCALINGS}")


def unscale_counts(values: sp.csr_matrix, scale: np.ndarray, method: str, totals: np.ndarray | None = None
                   ) -> sp.csr_matrix:
    """Integer counts (as floats) of sparse scaled values; zeros stay zero, so only nonzeros are touched.

    ``totals``: each row's library size (the store's ``obs['total_counts']``), needed by the
    library-normalised scaling only.
    """
    if method == "log1p_cp10k_gene_max" and totals is None:
        raise ValueError("log1p_cp10k_gene_max values need each cell's library size to become counts")
    counts = sp.csr_matrix(values, dtype=np.float64, copy=True)
    counts.data = unscale(counts.data, scale[counts.indices], method)
    if method == "log1p_cp10k_gene_max":
        counts.data *= np.repeat(np.asarray(totals, dtype=np.float64) / 1e4, np.diff(counts.indptr))
    counts.data = np.rint(counts.data)
    return counts


def log_normalise(counts: sp.csr_matrix, dtype=np.float64) -> sp.csr_matrix:
    """log1p(CP10k) of sparse counts, computed on a single copy of the nonzero values."""
    normalised = normalise_libraries(counts, dtype)
    np.log1p(normalised.data, out=normalised.data)
    return normalised


def gene_pixels(counts: sp.csr_matrix, side: int, order: str, seed: int) -> np.ndarray:
    """The pixel of each gene: the first ``n_genes`` pixels of the side x side image, row by row.

    ``'matrix'`` keeps the matrix's gene order (the original). ``'correlation'`` puts genes
    with similar expression patterns next to each other, where the 3x3 kernels see them
    together: genes are described by their loadings on the principal components of
    log1p(CP10k) of ``counts``, grouped by k-means (about one image row per group), groups
    chained by similarity, and rows run alternately left-right and right-left, so that
    consecutive genes are neighbours (but where a partly filled last row turns). Genes never
    seen in ``counts`` go last.
    """
    n_genes = counts.shape[1]
    if order == "matrix":
        return np.arange(n_genes, dtype=np.int64)
    if order != "correlation":
        raise ValueError(f"unknown gene order {order!r}; choose one of {GENE_ORDERS}")
    from scipy.cluster.hierarchy import leaves_list, linkage
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD

    normalised = log_normalise(counts, np.float32)  # float32: PBMC68k's training cells have 33 million values
    seen = np.flatnonzero(np.bincount(normalised.indices, minlength=n_genes))
    if len(seen) < 3 or normalised.shape[0] < 3:
        log.warning("%d cells with %d detected genes are too few to order genes by correlation; "
                    "keeping the matrix order", normalised.shape[0], len(seen))
        return np.arange(n_genes, dtype=np.int64)
    n_components = max(1, min(20, normalised.shape[0] - 1, len(seen) - 1))
    svd = TruncatedSVD(n_components=n_components, random_state=seed).fit(normalised[:, seen])
    loadings = svd.components_.T * svd.singular_values_
    loadings /= np.maximum(np.linalg.norm(loadings, axis=1, keepdims=True), 1e-12)
    n_groups = max(1, min(len(seen), round(len(seen) / side)))
    kmeans = KMeans(n_clusters=n_groups, n_init=1, random_state=seed).fit(loadings)
    chain = leaves_list(linkage(kmeans.cluster_centers_, "average")) if n_groups > 1 else np.zeros(1, dtype=int)
    rank_of_group = np.empty(n_groups, dtype=int)
    rank_of_group[chain] = np.arange(n_groups)
    # Within a group, genes follow their first loading; across groups, the chain.
    sequence = seen[np.lexsort((loadings[:, 0], rank_of_group[kmeans.labels_]))]
    sequence = np.concatenate([sequence, np.setdiff1d(np.arange(n_genes), seen)])
    slots = np.arange(n_genes)
    row, column = slots // side, slots % side
    snake = row * side + np.where(row % 2 == 1, side - 1 - column, column)
    # The snake can leave the last row's first pixels empty: renumber into the first n_genes pixels.
    snake = np.argsort(np.argsort(snake))
    pixels = np.empty(n_genes, dtype=np.int64)
    pixels[sequence] = snake
    return pixels


def stratified_split(labels: pd.Series | np.ndarray, test_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of test cells: ceil(test_fraction x n) cells, allotted to types in proportion.

    Per-type quotas use largest remainders, so each type's share matches the whole's, and
    a type too small for a test cell keeps its cells for training.
    """
    labels = np.asarray(labels)
    n_test = math.ceil(test_fraction * len(labels))
    types, codes = np.unique(labels, return_inverse=True)
    sizes = np.bincount(codes)
    quotas = test_fraction * sizes
    allotted = np.floor(quotas).astype(int)
    leftover = n_test - allotted.sum()
    by_remainder = np.argsort(-(quotas - allotted), kind="stable")
    allotted[by_remainder[:leftover]] += 1
    allotted = np.minimum(allotted, sizes - 1)  # keep at least one training cell per type
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(labels), dtype=bool)
    for code, quota in enumerate(allotted):
        members = np.flatnonzero(codes == code)
        is_test[rng.choice(members, size=quota, replace=False)] = True
    return is_test


def build_image_store(
    filtered: ad.AnnData, side: int | None, scaling: str, test_fraction: float, seed: int, side_multiple: int = 4,
    gene_order: str = "matrix",
) -> ad.AnnData:
    """Scaled values, layout and split for ``filtered`` (cells x genes integer counts).

    ``side_multiple`` is strides^2 of the model's two strided convolutions.
    """
    side = image_side(filtered.n_vars, side, side_multiple)
    is_test = stratified_split(filtered.obs["cell_type"], test_fraction, seed)
    counts = sp.csr_matrix(filtered.X)
    # Scaling and gene order are fitted on training cells only, so the test cells stay unseen.
    scale = fit_scale(counts[~is_test], scaling)
    var = filtered.var.copy()
    var["pixel"] = gene_pixels(counts[~is_test], side, gene_order, seed)
    var["scale"] = scale
    obs = pd.DataFrame(
        {
            "cell_type": filtered.obs["cell_type"].to_numpy(),
            "split": pd.Categorical(np.where(is_test, "test", "train"), categories=["train", "test"]),
            # Library sizes, for simulations that draw them from real cells of the type.
            "total_counts": np.asarray(counts.sum(axis=1)).ravel(),
        },
        index=filtered.obs_names,
    )
    obs["cell_type"] = pd.Categorical(obs["cell_type"], categories=filtered.obs["cell_type"].cat.categories)
    store = ad.AnnData(X=scale_counts(counts, scale, scaling), obs=obs, var=var)
    store.uns["image"] = {"side": side, "scaling": scaling, "gene_order": gene_order, "test_fraction": test_fraction,
                          "seed": seed}
    return store


def layout_table(store: ad.AnnData) -> pd.DataFrame:
    """Where each gene sits in the image, with its scaling divisor: for people and other tools."""
    side = store.uns["image"]["side"]
    pixel = store.var["pixel"].to_numpy()
    return pd.DataFrame(
        {"gene": store.var_names, "pixel": pixel, "row": pixel // side, "column": pixel % side,
         "scale": store.var["scale"].to_numpy()}
    )


def to_images(values: sp.csr_matrix | np.ndarray, pixel: np.ndarray, side: int) -> np.ndarray:
    """Dense (n, side, side, 1) float32 images for a batch of scaled gene vectors; padding is 0."""
    images = np.zeros((values.shape[0], side * side), dtype=np.float32)
    if sp.issparse(values):
        # Only the nonzero values are placed: training batches came 3-4x faster than densifying the genes first.
        values = sp.csr_matrix(values)
        values.sum_duplicates()
        rows = np.repeat(np.arange(values.shape[0]) * side * side, np.diff(values.indptr))
        images.reshape(-1)[rows + pixel[values.indices]] = values.data
    else:
        images[:, pixel] = values
    return images.reshape(-1, side, side, 1)


def from_images(images: np.ndarray, pixel: np.ndarray) -> np.ndarray:
    """Gene vectors (n, genes) read back from images, padding pixels dropped."""
    return images.reshape(images.shape[0], -1)[:, pixel]
