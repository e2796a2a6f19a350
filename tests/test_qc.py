"""The QC step's joint embedding of real and simulated cells, at the sizes PBMC68k runs reach."""

import logging
import warnings

import anndata as ad
import numpy as np
import pandas as pd

from cvaesim.evaluation import top_markers
from cvaesim.qc import MITOCHONDRIAL_SYMBOL, add_qc_metrics, combine, embed, marker_table, plot_markers, qc_summary

from conftest import random_counts


def test_the_embedding_works_past_scanpys_approximate_neighbour_threshold():
    # PBMC68k's default QC embeds 10,000 real and 1,100 simulated cells; from 8,192 cells scanpy
    # switches to approximate neighbours, whose output it could not read with current libraries.
    types = ["T", "B", "NK"]
    real, simulated = random_counts(7000, 60, types, seed=1), random_counts(1300, 60, types, seed=2)
    simulated.obs_names = [f"simulated_{i}" for i in range(simulated.n_obs)]
    for cells in (real, simulated):
        cells.obs["cell_type"] = pd.Categorical(cells.obs["cell_type"], categories=types)
    combined = combine(real, simulated, max_real_cells=10_000, seed=0)
    normalised = embed(combined, seed=0)
    assert normalised.obsm["X_umap"].shape == (8300, 2) and np.isfinite(normalised.obsm["X_umap"]).all()
    # Exact neighbours on the PCs (scanpy takes them for more than 50 genes): 14 per cell, itself left out.
    distances = normalised.obsp["distances"]
    assert (np.diff(distances.indptr) == 14).all()
    pcs = normalised.obsm["X_pca"]
    to_others = np.sqrt(((np.delete(pcs, 0, axis=0) - pcs[0]) ** 2).sum(axis=1))
    np.testing.assert_allclose(np.sort(distances[0].data), np.sort(to_others)[:14], rtol=1e-4)


def test_scanpys_default_neighbours_run_in_this_environment_past_8192_cells():
    """Users cluster the simulated cells with scanpy in the workflow's environment; from 8,192 cells its default
    neighbours come from pynndescent, whose 0.7 release returns arrays scanpy 1.11 cannot read ('getnnz')."""
    import scanpy as sc

    cells = ad.AnnData(np.random.default_rng(0).normal(size=(9000, 30)).astype(np.float32))
    sc.pp.neighbors(cells, use_rep="X", random_state=0)
    # Approximate neighbours: at least the 14 others of scanpy's default 15 for every cell.
    assert cells.obsp["connectivities"].shape == (9000, 9000)
    assert (np.diff(cells.obsp["distances"].indptr) >= 14).all()


def test_qc_metrics_include_the_mitochondrial_share_of_human_and_mouse_genes():
    types = ["T", "B"]
    real, simulated = random_counts(40, 12, types, seed=1), random_counts(30, 12, types, seed=2)
    names = ["MT-CO1", "mt-Nd1", "MTOR", *[f"GENE{j}" for j in range(9)]]  # MTOR is no mitochondrial gene
    for cells in (real, simulated):
        cells.var_names = names
        cells.obs["cell_type"] = pd.Categorical(cells.obs["cell_type"], categories=types)
    simulated.obs_names = [f"simulated_{i}" for i in range(simulated.n_obs)]
    combined = combine(real, simulated, max_real_cells=100, seed=0)
    add_qc_metrics(combined)
    counts = combined.X.toarray()
    expected = 100 * counts[:, :2].sum(axis=1) / counts.sum(axis=1)
    np.testing.assert_allclose(combined.obs["pct_counts_mt"], expected, rtol=1e-5)
    summary = qc_summary(combined).set_index(["source", "cell_type"])
    real_t = combined.obs[(combined.obs["source"] == "real") & (combined.obs["cell_type"] == "T")]
    assert summary.loc[("real", "T"), "median_pct_counts_mt"] == np.median(real_t["pct_counts_mt"])


def test_mitochondrial_genes_of_rat_fly_and_multi_genome_references_are_found():
    names = pd.Index(["MT-CO1", "mt-Nd1", "Mt-co1", "mt:CoI", "GRCh38_MT-CO1", "mm10___mt-Co1", "hg19_MT-ND1",
                      "MT.CO1",  # as R's make.names writes a data.frame's column names
                      "MTOR", "MT1A", "MT2A", "GRCh38_MTOR", "SMT-1", "CD3E", "mtor"])
    assert names[names.str.contains(MITOCHONDRIAL_SYMBOL)].tolist() == names[:8].tolist()


def test_genes_named_by_ensembl_id_are_found_and_shown_by_symbol(caplog, tmp_path):
    # CELLxGENE files name genes by Ensembl id and keep the symbols in var['feature_name'].
    types = ["T", "B"]
    real, simulated = random_counts(40, 30, types, seed=1), random_counts(30, 30, types, seed=2)
    for cells in (real, simulated):
        cells.var_names = [f"ENSG{j:011d}" for j in range(30)]
        cells.obs["cell_type"] = pd.Categorical(cells.obs["cell_type"], categories=types)
    real.var["feature_name"] = ["MT-CO1", "MT-ND1", "CD3E", "MTOR", *[f"GENE{j}" for j in range(26)]]
    simulated.obs_names = [f"simulated_{i}" for i in range(simulated.n_obs)]
    combined = combine(real, simulated, max_real_cells=100, seed=0)
    with caplog.at_level(logging.INFO, logger="cvaesim.qc"):
        add_qc_metrics(combined)
    counts = combined.X.toarray()
    np.testing.assert_allclose(combined.obs["pct_counts_mt"], 100 * counts[:, :2].sum(axis=1) / counts.sum(axis=1),
                               rtol=1e-5)
    assert "mitochondrial genes by var['feature_name']: 2" in caplog.text
    # The marker table names each marker's symbol beside its id; the dot plot is labelled by symbol.
    normalised = embed(combined, seed=0)
    markers = marker_table(normalised, n_markers=3)
    symbol_of = dict(zip(real.var_names, real.var["feature_name"]))
    assert len(markers) and markers["symbol"].tolist() == [symbol_of[gene] for gene in markers["gene"]]
    plot_markers(normalised, markers, tmp_path / "markers.png")
    assert (tmp_path / "markers.png").stat().st_size > 0


def test_real_cells_over_the_qc_limit_are_a_seeded_sample_and_the_log_says_so(caplog):
    types = ["T", "B"]
    real, simulated = random_counts(300, 20, types, seed=3), random_counts(40, 20, types, seed=4)
    simulated.obs_names = [f"simulated_{i}" for i in range(simulated.n_obs)]
    for cells in (real, simulated):
        cells.obs["cell_type"] = pd.Categorical(cells.obs["cell_type"], categories=types)
    with caplog.at_level(logging.INFO):
        combined = combine(real, simulated, max_real_cells=100, seed=0)
    assert (combined.obs["source"] == "real").sum() == 100
    assert combined.obs_names.equals(combine(real, simulated, max_real_cells=100, seed=0).obs_names)
    assert "a seeded sample of 100 of the 300 real cells" in caplog.text
    assert "QC of 100 real and 40 simulated cells, 20 genes" in caplog.text


def test_ranking_the_markers_of_many_cell_types_leaves_no_pandas_warnings_in_the_log():
    """scanpy builds its marker table a column at a time; with 30 clusters, pandas used to warn of fragmentation
    hundreds of times in the QC and evaluate logs. Both steps rank markers the same way."""
    types = [f"cluster {i}" for i in range(30)]
    cells = random_counts(300, 40, types, seed=5)
    cells.obs["cell_type"] = pd.Categorical(cells.obs["cell_type"], categories=types)
    cells.obs["source"] = "real"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        qc_markers = marker_table(cells, n_markers=3)
        evaluation_markers = top_markers(cells, n_markers=3, max_cells_per_type=250, seed=0)
    assert not [w for w in caught if issubclass(w.category, pd.errors.PerformanceWarning)]
    # The markers themselves are unchanged: both steps rank every type, with the same top genes.
    real = qc_markers[qc_markers["source"] == "real"]
    assert set(real["cell_type"]) == set(evaluation_markers) == set(types)
    for name, genes in evaluation_markers.items():
        assert real.loc[real["cell_type"] == name, "gene"].tolist() == genes
