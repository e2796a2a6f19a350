"""Cell types for a dataset that has none: Leiden clusters of its cells, found as scanpy's tutorials find them.

Kept free of TensorFlow: the cluster rule runs in the TensorFlow-free environment.
"""

from __future__ import annotations

import logging

import anndata as ad
import numpy as np
import pandas as pd

from . import InputError

log = logging.getLogger(__name__)

# scanpy's usual preparation for clustering: 2,000 variable genes, 50 principal components, 15 neighbours.
VARIABLE_GENES = 2000
COMPONENTS = 50
NEIGHBOURS = 15
# Fewer cells than this make no neighbour graph worth clustering.
MIN_CELLS = 3 * NEIGHBOURS
# Half the barcodes under this many counts: an unfiltered matrix, mostly empty droplets (a called cell has hundreds).
EMPTY_DROPLET_MEDIAN = 20


def leiden_clusters(cells: ad.AnnData, resolution: float, seed: int, source: str) -> pd.Categorical:
    """Each cell's Leiden cluster ('0', '1', ...) on its log-normalised counts (library size to 10,000, log1p),
    over the most variable genes, principal components and a neighbour graph; seeded, so a rerun finds the same."""
    import scanpy as sc

    if cells.n_obs < MIN_CELLS:
        raise InputError(f"{source}: {cells.n_obs} cells pass the filter, too few to cluster (at least {MIN_CELLS}); "
                         f"give the cell types with label_column instead")
    median_counts = float(np.median(np.asarray(cells.X.sum(axis=1)).ravel()))
    if median_counts < EMPTY_DROPLET_MEDIAN:
        raise InputError(f"{source}: the {cells.n_obs} barcodes that pass the filter have a median of {median_counts:g} "
                         f"counts, as an unfiltered matrix of mostly empty droplets has (Cell Ranger's "
                         f"raw_feature_bc_matrix, kb's counts_unfiltered), which clustering would type as cells; give "
                         f"the filtered matrix (filtered_feature_bc_matrix; kb count --filter), or set "
                         f"filter.min_counts_per_cell (e.g. 500) to keep only the cells")
    log.info("%s: clustering %d cells (Leiden, resolution %g, seed %d) for their cell types", source, cells.n_obs,
             resolution, seed)
    values = log_normalised(cells)
    values = values[:, variable_genes(values, VARIABLE_GENES)].copy()
    sc.pp.pca(values, n_comps=min(COMPONENTS, values.n_obs - 1, values.n_vars - 1), random_state=seed)
    sc.pp.neighbors(values, n_neighbors=NEIGHBOURS, random_state=seed)
    sc.tl.leiden(values, resolution=resolution, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
    clusters = values.obs["leiden"]
    log.info("%s: %d clusters: %s", source, clusters.cat.categories.size,
             ", ".join(f"{name}: {n}" for name, n in clusters.value_counts(sort=False).items()))
    return pd.Categorical(clusters)


def log_normalised(cells: ad.AnnData) -> ad.AnnData:
    """The cells' counts scaled to 10,000 per cell and log1p-transformed (float32), as scanpy's tutorials prepare
    them for variable genes and principal components."""
    import scanpy as sc

    values = ad.AnnData(cells.X.astype(np.float32), obs=pd.DataFrame(index=cells.obs_names))
    sc.pp.normalize_total(values, target_sum=1e4)
    sc.pp.log1p(values)
    return values


def variable_genes(values: ad.AnnData, n_genes: int) -> np.ndarray:
    """Which genes of the log-normalised cells ``values`` are the ``n_genes`` most variable, as scanpy's
    highly_variable_genes (its default flavor) picks them (of fewer genes, those whose dispersion it can rank)."""
    import scanpy as sc

    table = sc.pp.highly_variable_genes(values, n_top_genes=min(n_genes, values.n_vars), inplace=False)
    return table["highly_variable"].to_numpy()
