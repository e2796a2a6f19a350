"""Scanpy QC of real versus simulated cells: metrics, violins, joint PCA/UMAP, markers."""

from __future__ import annotations

import logging
import re
import warnings

import anndata as ad
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import scanpy as sc  # noqa: E402

log = logging.getLogger(__name__)

SOURCES = ["real", "simulated"]
# Mitochondrial gene symbols as scanpy's QC tutorials flag them (human MT-, mouse mt-), in any case (rat Mt-)
# or with fly's "mt:" or R's make.names's "MT.CO1", after the genome prefix a multi-genome Cell Ranger reference
# adds (GRCh38_MT-CO1, mm10___mt-Co1). Metallothioneins (MT1A, MT2A) and MTOR have no separator: not matched.
MITOCHONDRIAL_SYMBOL = re.compile(r"^(?:[A-Za-z0-9.]+_+)?mt[-:.]", re.IGNORECASE)
# Where files named by Ensembl id keep the symbols: CELLxGENE's feature_name, scanpy's gene_symbols, ...
SYMBOL_COLUMNS = ("feature_name", "gene_symbols", "gene_symbol", "gene_name", "symbol")
QC_METRICS = ["total_counts", "n_genes_by_counts", "pct_counts_mt", "fraction_zeros"]


def combine(real: ad.AnnData, simulated: ad.AnnData, max_real_cells: int, seed: int) -> ad.AnnData:
    """Real (a seeded subsample when larger than ``max_real_cells``) and simulated cells, with obs['source']."""
    if real.n_obs > max_real_cells:
        log.info("a seeded sample of %d of the %d real cells (qc.max_real_cells)", max_real_cells, real.n_obs)
        keep = np.sort(np.random.default_rng(seed).choice(real.n_obs, size=max_real_cells, replace=False))
        real = real[keep]
    log.info("QC of %d real and %d simulated cells, %d genes", real.n_obs, simulated.n_obs, real.n_vars)
    if list(real.var_names) != list(simulated.var_names):
        raise ValueError("real and simulated cells have different genes")
    cell_types = list(real.obs["cell_type"].cat.categories)
    parts = []
    for source, cells in zip(SOURCES, (real, simulated)):
        part = ad.AnnData(X=cells.X.astype(np.float32), obs=pd.DataFrame(
            {"cell_type": cells.obs["cell_type"].astype(str).to_numpy(), "source": source},
            index=[f"{source}:{name}" for name in cells.obs_names]), var=pd.DataFrame(index=real.var_names))
        parts.append(part)
    combined = ad.concat(parts)
    if (symbols := symbol_column(real)) is not None:
        combined.var[symbols] = real.var[symbols].astype(str).to_numpy()
    combined.obs["source"] = pd.Categorical(combined.obs["source"], categories=SOURCES)
    combined.obs["cell_type"] = pd.Categorical(combined.obs["cell_type"], categories=cell_types)
    return combined


def symbol_column(cells: ad.AnnData) -> str | None:
    """The var column holding gene symbols where the genes are named otherwise, or None."""
    return next((column for column in SYMBOL_COLUMNS if column in cells.var), None)


def add_qc_metrics(combined: ad.AnnData) -> None:
    """scanpy's per-cell QC metrics, with the share of counts on mitochondrial genes (pct_counts_mt), whose
    excess marks damaged cells, and the fraction of genes not detected."""
    combined.var["mt"] = combined.var_names.str.contains(MITOCHONDRIAL_SYMBOL)
    symbols = symbol_column(combined)
    if not combined.var["mt"].any() and symbols is not None:
        combined.var["mt"] = combined.var[symbols].str.contains(MITOCHONDRIAL_SYMBOL).to_numpy()
        log.info("mitochondrial genes by var[%r]: %d", symbols, combined.var["mt"].sum())
    if not combined.var["mt"].any():
        log.info("no mitochondrial genes (names%s starting with MT-, MT. or mt: in any case, after any genome "
                 "prefix): pct_counts_mt is 0", f" or var[{symbols!r}]" if symbols else "")
    sc.pp.calculate_qc_metrics(combined, qc_vars=["mt"], percent_top=None, log1p=False, inplace=True)
    combined.obs["fraction_zeros"] = 1.0 - combined.obs["n_genes_by_counts"] / combined.n_vars


def qc_summary(combined: ad.AnnData) -> pd.DataFrame:
    """Per source and cell type: cell count, median library size, detected genes and mitochondrial share,
    zero fraction."""
    grouped = combined.obs.groupby(["source", "cell_type"], observed=False)
    summary = grouped.agg(
        cells=("total_counts", "size"),
        median_total_counts=("total_counts", "median"),
        median_genes_detected=("n_genes_by_counts", "median"),
        median_pct_counts_mt=("pct_counts_mt", "median"),
        mean_fraction_zeros=("fraction_zeros", "mean"),
    )
    return summary.reset_index()


def plot_violins(combined: ad.AnnData, path) -> None:
    figure, axes = plt.subplots(1, len(QC_METRICS), figsize=(4 * len(QC_METRICS), 4))
    for axis, metric in zip(axes, QC_METRICS):
        sc.pl.violin(combined, metric, groupby="source", ax=axis, show=False, stripplot=False)
        axis.set_title(metric)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def embed(combined: ad.AnnData, seed: int) -> ad.AnnData:
    """Log-normalise, PCA and UMAP on real and simulated cells together."""
    normalised = combined.copy()
    sc.pp.normalize_total(normalised, target_sum=1e4)
    sc.pp.log1p(normalised)
    n_components = max(2, min(30, normalised.n_obs - 1, normalised.n_vars - 1))
    sc.pp.pca(normalised, n_comps=n_components, random_state=seed)
    # Exact neighbours at every size: from 8,192 cells scanpy 1.11 would use pynndescent, whose sparse
    # arrays (0.7+) it cannot read ('csr_array' has no 'getnnz'), and brute force takes seconds on 30 PCs.
    sc.pp.neighbors(normalised, n_neighbors=min(15, normalised.n_obs - 1), transformer="sklearn", random_state=seed)
    sc.tl.umap(normalised, random_state=seed)
    return normalised


def plot_embedding(normalised: ad.AnnData, basis: str, path) -> None:
    figure, axes = plt.subplots(1, 2, figsize=(13, 5))
    for axis, key in zip(axes, ("source", "cell_type")):
        sc.pl.embedding(normalised, basis=basis, color=key, ax=axis, show=False, size=12)
    figure.tight_layout()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def wilcoxon_markers(cells: ad.AnnData, groups: list[str], n_markers: int) -> pd.DataFrame:
    """The top ``n_markers`` genes of each group (Wilcoxon, the group against the rest), a column per group."""
    with warnings.catch_warnings():
        # scanpy builds its result a column at a time; from about 20 types on, pandas warns of fragmentation
        # hundreds of times per call, filling the log with a note on scanpy's internals.
        warnings.simplefilter("ignore", pd.errors.PerformanceWarning)
        sc.tl.rank_genes_groups(cells, "cell_type", groups=groups, method="wilcoxon", n_genes=n_markers)
    return pd.DataFrame(cells.uns["rank_genes_groups"]["names"])


def marker_table(normalised: ad.AnnData, n_markers: int) -> pd.DataFrame:
    """Top ``n_markers`` of each cell type (Wilcoxon, one type versus the rest) in real and in simulated cells."""
    rows = []
    for source in SOURCES:
        cells = normalised[normalised.obs["source"] == source].copy()
        sizes = cells.obs["cell_type"].value_counts()
        groups = [str(name) for name in sizes.index[sizes >= 2]]
        if len(groups) < 2:
            log.warning("%s cells: fewer than two cell types with two cells; no markers", source)
            continue
        names = wilcoxon_markers(cells, groups, n_markers)
        for cell_type in names.columns:
            for rank, gene in enumerate(names[cell_type], start=1):
                rows.append({"source": source, "cell_type": cell_type, "rank": rank, "gene": gene})
    markers = pd.DataFrame(rows, columns=["source", "cell_type", "rank", "gene"])
    if (symbols := symbol_column(normalised)) is not None:
        markers["symbol"] = normalised.var[symbols].reindex(markers["gene"]).to_numpy()
    return markers


def marker_overlap(markers: pd.DataFrame) -> pd.DataFrame:
    """Per cell type: how many of the real top markers are also top markers of the simulated cells."""
    sets = markers.groupby(["cell_type", "source"])["gene"].apply(set).unstack("source")
    rows = []
    for cell_type, row in sets.iterrows():
        real, simulated = row.get("real"), row.get("simulated")
        if isinstance(real, set) and isinstance(simulated, set):
            rows.append({"cell_type": cell_type, "real_markers": len(real),
                         "shared_with_simulated": len(real & simulated)})
    return pd.DataFrame(rows, columns=["cell_type", "real_markers", "shared_with_simulated"])


def plot_markers(normalised: ad.AnnData, markers: pd.DataFrame, path, per_type: int = 3) -> None:
    """Dot plots of the real cells' top markers, in real cells (left) and simulated cells (right)."""
    real_top = markers[(markers["source"] == "real") & (markers["rank"] <= per_type)]
    genes = list(dict.fromkeys(real_top["gene"]))
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 0.9 * len(genes)), 0.4 * normalised.obs["cell_type"].cat.categories.size + 3))
    labels = genes
    if "symbol" in markers:  # labelled by symbol rather than by id
        symbols = markers.drop_duplicates("gene").set_index("gene")["symbol"].reindex(genes).astype(str)
        labels = list(ad.utils.make_index_unique(pd.Index(symbols)))
    for axis, source in zip(axes, SOURCES):
        cells = normalised[normalised.obs["source"] == source]
        if genes:
            cells = ad.AnnData(X=cells[:, genes].X, obs=cells.obs, var=pd.DataFrame(index=labels))
            sc.pl.dotplot(cells, labels, groupby="cell_type", ax=axis, show=False, title=f"{source} cells")
        else:
            axis.set_axis_off()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
