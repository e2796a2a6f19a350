"""The whole workflow, run as a user runs it, on the embedded dataset and on awkward inputs."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import yaml

from conftest import (AWKWARD_TYPES, CELLS_PER_TYPE, EMBEDDED_H5AD, EPOCHS, QUICK_RUN, Server, copy_repository,
                      planned_jobs, random_counts, snakemake, write_10x_h5, write_annotation, write_config, write_loom,
                      write_tarball)

pytestmark = pytest.mark.workflow


def test_embedded_run_outputs_are_checked(workdir):
    results = workdir / "results" / "pbmc68k_reduced"
    real = ad.read_h5ad(results / "filtered.h5ad")
    assert real.shape == (700, 765)
    assert real.X.dtype == np.int32
    simulated = ad.read_h5ad(results / "simulated" / "simulated.h5ad")
    cell_types = list(real.obs["cell_type"].cat.categories)
    assert len(cell_types) == 10 and "CD8+/CD45RA+ Naive Cytotoxic" in cell_types
    assert simulated.shape == (10 * CELLS_PER_TYPE, 765)
    assert list(simulated.var_names) == list(real.var_names)
    assert simulated.obs["cell_type"].value_counts().to_dict() == dict.fromkeys(cell_types, CELLS_PER_TYPE)
    counts = simulated.X
    assert counts.dtype == np.int32 and counts.min() >= 0
    real_libraries = np.asarray(real.X.sum(axis=1)).ravel()
    simulated_libraries = np.asarray(counts.sum(axis=1)).ravel()
    low, high = np.percentile(simulated_libraries, [5, 95])
    assert real_libraries.min() <= low and high <= real_libraries.max(), (low, high)
    for cell_type in cell_types:
        median = np.median(simulated_libraries[(simulated.obs["cell_type"] == cell_type).to_numpy()])
        assert real_libraries.min() <= median <= real_libraries.max(), cell_type

    # The known truth: per type and gene, what the counts were drawn around.
    truth = pd.read_csv(results / "simulated" / "expected.tsv", sep="\t")
    assert list(truth["cell_type"].unique()) == cell_types
    for cell_type, of_type in truth.groupby("cell_type", sort=False):
        assert list(of_type["gene"]) == list(real.var_names)
        assert of_type["mean_per_10k"].sum() == pytest.approx(1e4, rel=1e-4)
        pooled = np.asarray(counts[(simulated.obs["cell_type"] == cell_type).to_numpy()].mean(axis=0)).ravel()
        assert np.corrcoef(pooled, of_type["mean_count"])[0, 1] > 0.9, cell_type

    table = pd.read_hdf(results / "simulated" / "simulated_table.h5", "simulated")
    assert list(table.columns) == [*real.var_names, "cell_type"]
    assert np.array_equal(table.iloc[:, :-1].to_numpy(), counts.toarray())
    tenx = sc.read_10x_mtx(results / "simulated" / "simulated_10x", var_names="gene_ids")
    assert np.array_equal(tenx.X.toarray(), counts.toarray()) and list(tenx.obs_names) == list(simulated.obs_names)
    labels = pd.read_csv(results / "simulated" / "simulated_10x" / "cell_types.tsv", sep="\t")
    assert list(labels["cell_type"]) == list(simulated.obs["cell_type"])

    history = pd.read_csv(results / "model" / "history.tsv", sep="\t")
    assert list(history["epoch"]) == list(range(1, EPOCHS + 1))
    assert "training on CPU" in (workdir / "logs" / "pbmc68k_reduced" / "train.log").read_text()
    summary = pd.read_csv(results / "qc" / "summary.tsv", sep="\t")
    assert set(summary["source"]) == {"real", "simulated"} and set(summary["cell_type"]) == set(cell_types)
    for figure in ("violins", "pca", "umap", "marker_dotplot"):
        assert (results / "qc" / f"{figure}.png").stat().st_size > 10_000

    overall = pd.read_csv(results / "evaluation" / "overall.tsv", sep="\t", index_col="metric")
    assert list(overall.columns) == ["cvae", "nb", "poisson", "training_cells", "real_vs_real"]
    assert overall.loc[["rf_auc", "mmd", "fidelity_accuracy", "memorisation_ratio"]].notna().all().all()
    assert 0.3 < overall.loc["rf_auc", "real_vs_real"] < 0.7
    # Real training cells sit far closer to the test cells than independent Poisson genes do.
    assert overall.loc["mmd", "training_cells"] < overall.loc["mmd", "poisson"] / 5
    assert overall.loc["memorisation_ratio", "training_cells"] == 0
    per_type = pd.read_csv(results / "evaluation" / "metrics.tsv", sep="\t")
    assert set(per_type["cell_type"]) - {"overall"} <= set(cell_types)


def test_saved_model_reloads_and_resimulates_identically(workdir):
    from cvaesim.simulation import Posteriors, simulate
    from cvaesim.steps import load_model

    results = workdir / "results" / "pbmc68k_reduced"
    store = ad.read_h5ad(results / "images" / "images.h5ad", backed="r")
    config = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    cell_types = list(store.obs["cell_type"].cat.categories)
    again = simulate(load_model(str(results / "model" / "cvae.keras")), store,
                     dict.fromkeys(cell_types, CELLS_PER_TYPE), config["seed"],
                     config["simulate"]["batch_size"], config["simulate"]["count_sampling"],
                     config["simulate"]["library_sizes"], config["simulate"]["latent"],
                     Posteriors.load(results / "model" / "posteriors.npz"), config["simulate"]["calibration"],
                     config["simulate"]["origins"])
    saved = ad.read_h5ad(results / "simulated" / "simulated.h5ad")
    assert (again.X != saved.X).nnz == 0


def test_only_what_changed_reruns(workdir):
    base = QUICK_RUN
    assert planned_jobs(workdir, *base) == {}
    more_cells = write_config(workdir / "more_cells.yaml", {"simulate": {"cells_per_type": CELLS_PER_TYPE + 1}})
    assert planned_jobs(workdir, *base, more_cells) == {
        "simulate": 1, "original_table": 1, "simulated_10x": 1, "qc": 1, "evaluate": 1, "compare_datasets": 1, "all": 1}
    mix = write_config(workdir / "mix.yaml", {"simulate": {"cells_per_type": {"CD14+ Monocyte": 50, "CD19+ B": 0}}})
    assert planned_jobs(workdir, *base, mix) == {
        "simulate": 1, "original_table": 1, "simulated_10x": 1, "qc": 1, "evaluate": 1, "compare_datasets": 1, "all": 1}
    # A new threshold reruns from the filter on; top_genes too, which left out (as above) changes nothing.
    for name, threshold in (("stricter", {"min_cells_per_gene": 5}), ("fewer_genes", {"top_genes": 300})):
        assert planned_jobs(workdir, *base, write_config(workdir / f"{name}.yaml", {"filter": threshold})) == {
            "filter": 1, "reshape": 1, "train": 1, "simulate": 1, "original_table": 1, "simulated_10x": 1, "qc": 1,
            "evaluate": 1, "compare_datasets": 1, "all": 1}
    # A local source edited in place is copied again, and what follows reruns; put back, nothing does.
    annotation = workdir / "resources/embedded/pbmc68k_reduced_barcodes_annotation.tsv"
    original, times = annotation.read_bytes(), annotation.stat()
    annotation.write_bytes(original + b"\n")
    try:
        assert planned_jobs(workdir, *base) == {"download": 1, "filter": 1, "reshape": 1, "train": 1, "simulate": 1,
                                                "original_table": 1, "simulated_10x": 1, "qc": 1, "evaluate": 1,
                                                "compare_datasets": 1, "all": 1}
    finally:
        annotation.write_bytes(original)
        os.utime(annotation, ns=(times.st_atime_ns, times.st_mtime_ns))
    assert planned_jobs(workdir, *base) == {}


def test_other_datasets_from_config_alone_in_their_own_folders(workdir):
    """The same cells as .h5ad with Louvain labels, and a 10x dataset with awkward names via file://."""
    awkward_cells = random_counts(300, 120, AWKWARD_TYPES, seed=4)
    write_tarball(workdir / "awkward.tar.gz", awkward_cells, v3=True)
    write_annotation(workdir / "awkward.tsv", awkward_cells)
    first_run = {path: path.stat().st_mtime for path in (workdir / "results" / "pbmc68k_reduced").rglob("*")}
    overlay = write_config(workdir / "others.yaml", {
        "dataset": ["pbmc68k_reduced_louvain", "awkward"],
        "datasets": {"awkward": {
            "format": "10x_tarball",
            "matrix": {"source": (workdir / "awkward.tar.gz").as_uri()},
            "annotation": {"source": "awkward.tsv"},
            "label_column": "celltype",
        }},
    })
    snakemake(workdir, *QUICK_RUN, overlay)

    louvain = ad.read_h5ad(workdir / "results" / "pbmc68k_reduced_louvain" / "simulated" / "simulated.h5ad")
    assert louvain.shape == (11 * CELLS_PER_TYPE, 765)
    assert set(louvain.obs["cell_type"]) == {str(i) for i in range(11)}
    awkward = ad.read_h5ad(workdir / "results" / "awkward" / "simulated" / "simulated.h5ad")
    assert set(awkward.obs["cell_type"]) == set(AWKWARD_TYPES)
    assert awkward.obs["cell_type"].value_counts().eq(CELLS_PER_TYPE).all()
    assert list(awkward.var_names) == list(awkward_cells.var_names)
    summary = pd.read_csv(workdir / "results" / "awkward" / "qc" / "summary.tsv", sep="\t")
    assert set(summary["cell_type"]) == set(AWKWARD_TYPES)
    # The first dataset's results were neither rerun nor touched.
    assert {path: path.stat().st_mtime for path in first_run} == first_run
    assert sorted(p.name for p in (workdir / "results").iterdir() if p.is_dir()) == [
        "awkward", "pbmc68k_reduced", "pbmc68k_reduced_louvain"]
    # The run's datasets' overall tables in one, by metric.
    compared = pd.read_csv(workdir / "results" / "overall_by_dataset.tsv", sep="\t")
    assert (workdir / "results" / "overall_by_dataset.png").stat().st_size > 10_000
    assert list(compared["dataset"][:2]) == ["pbmc68k_reduced_louvain", "awkward"]
    for name, rows in compared.groupby("dataset"):
        own = pd.read_csv(workdir / "results" / name / "evaluation" / "overall.tsv", sep="\t")
        assert rows.drop(columns="dataset").reset_index(drop=True).equals(own[rows.columns.drop("dataset")]), name



def test_a_dataset_entry_overrides_settings_for_its_own_results(workdir):
    """A dataset's own seed and sections, merged key by key into the top-level ones, for its jobs only."""
    snakemake(workdir, *QUICK_RUN)  # the comparison table back to this run's one dataset, after other tests'
    assert planned_jobs(workdir, *QUICK_RUN, write_config(workdir / "same.yaml", {
        "datasets": {"pbmc68k_reduced": {"train": {"epochs": EPOCHS}}}})) == {}  # the quick run's own value
    assert planned_jobs(workdir, *QUICK_RUN, write_config(workdir / "own_cells.yaml", {
        "datasets": {"pbmc68k_reduced": {"simulate": {"cells_per_type": CELLS_PER_TYPE + 1}}}})) == {
        "simulate": 1, "original_table": 1, "simulated_10x": 1, "qc": 1, "evaluate": 1, "compare_datasets": 1, "all": 1}

    embedded = yaml.safe_load((workdir / "config" / "config.yaml").read_text())["datasets"]["pbmc68k_reduced"]
    overlay = write_config(workdir / "strict.yaml", {
        "dataset": ["pbmc68k_reduced", "strict"],
        "datasets": {"strict": {**embedded, "seed": 2, "filter": {"min_cells_per_gene": 50},
                                "image": {"side": 32, "test_fraction": 0.5}, "simulate": {"write_10x": False}}},
    })
    # Its sources are the first dataset's: it reads that dataset's downloads, not copies of its own.
    assert "download" not in planned_jobs(workdir, *QUICK_RUN, overlay)
    snakemake(workdir, "results/strict/images/images.h5ad", *QUICK_RUN, overlay)
    assert not (workdir / "resources" / "datasets" / "strict").exists()
    real = ad.read_h5ad(workdir / "results" / "pbmc68k_reduced" / "filtered.h5ad")
    strict = ad.read_h5ad(workdir / "results" / "strict" / "filtered.h5ad")
    detected_in = np.asarray((real.X > 0).sum(axis=0)).ravel()
    assert list(strict.var_names) == list(real.var_names[detected_in >= 50]) and strict.n_obs == real.n_obs
    store = ad.read_h5ad(workdir / "results" / "strict" / "images" / "images.h5ad", backed="r")
    assert dict(store.uns["image"]) == {"gene_order": "correlation", "scaling": "log1p_gene_max", "seed": 2,
                                        "side": 32, "test_fraction": 0.5}
    # Nothing of the first dataset reruns; the new one trains with the top-level settings and writes no 10x folder.
    assert planned_jobs(workdir, *QUICK_RUN, overlay) == {
        "train": 1, "simulate": 1, "original_table": 1, "qc": 1, "evaluate": 1, "compare_datasets": 1, "all": 1}
    for folder in ("results", "logs", "benchmarks"):
        shutil.rmtree(workdir / folder / "strict")


def test_a_dataset_without_cell_types_is_typed_by_the_clusters_of_its_cells(workdir):
    cells = random_counts(300, 120, ["T", "B", "NK"], seed=5)
    write_tarball(workdir / "unlabelled.tar.gz", cells, v3=True)
    overlay = write_config(workdir / "unlabelled.yaml", {
        "dataset": "unlabelled",
        "datasets": {"unlabelled": {"format": "10x_tarball", "matrix": {"source": "unlabelled.tar.gz"},
                                    "cluster": {"resolution": 0.5}, "filter": {"min_cells_per_type": 20}}},
    })
    assert planned_jobs(workdir, *QUICK_RUN, overlay)["cluster"] == 1
    snakemake(workdir, "results/unlabelled/filtered.h5ad", *QUICK_RUN, overlay)
    clusters = pd.read_csv(workdir / "results" / "unlabelled" / "clusters.tsv", sep="\t", dtype=str)
    filtered = ad.read_h5ad(workdir / "results" / "unlabelled" / "filtered.h5ad")
    assert list(filtered.obs_names) == list(clusters["barcode"]) == list(cells.obs_names)
    assert list(filtered.obs["cell_type"].astype(str)) == list(clusters["cluster"])
    assert filtered.obs["cell_type"].cat.categories.size == 3
    assert "clustering 300 cells (Leiden, resolution 0.5, seed 0)" in (
        workdir / "logs" / "unlabelled" / "cluster.log").read_text()
    # A changed resolution clusters again; the default seed's other datasets plan nothing new.
    again = write_config(workdir / "unlabelled_again.yaml", {"datasets": {"unlabelled": {"cluster": {"resolution": 2}}}})
    assert {"cluster", "filter"} <= set(planned_jobs(workdir, *QUICK_RUN, overlay, again))
    # A cluster is left out by its number, which YAML reads as an integer.
    without = write_config(workdir / "unlabelled_without.yaml", {"datasets": {"unlabelled": {"exclude_types": [2]}}})
    snakemake(workdir, "results/unlabelled/filtered.h5ad", *QUICK_RUN, overlay, without)
    kept = ad.read_h5ad(workdir / "results" / "unlabelled" / "filtered.h5ad")
    assert set(kept.obs["cell_type"].astype(str)) == {"0", "1"}
    assert kept.n_obs == (clusters["cluster"] != "2").sum()
    for folder in ("results", "logs", "benchmarks", "resources/datasets"):
        shutil.rmtree(workdir / folder / "unlabelled")


@pytest.mark.parametrize("entry, message", [
    ({"label_column": "louvain", "cluster": {}}, "give label_column (where its cell types are) or cluster (Leiden "
                                                 "clusters of its cells as the cell types), not both"),
    ({}, "give label_column (where its cell types are) or cluster (Leiden clusters of its cells as the cell types), "
         "one of the two"),
    # A 10x matrix without either: the schema would only say that it needs an annotation.
    ({"format": "10x_tarball", "matrix": {"source": "resources/embedded/pbmc68k_reduced_filtered_gene_bc_matrices.tar.gz"}},
     "give label_column (where its cell types are) or cluster (Leiden clusters of its cells as the cell types), "
     "one of the two"),
    ({"cluster": {}, "annotation": {"source": "resources/embedded/pbmc68k_reduced_barcodes_annotation.tsv"}},
     "cluster types its cells by their clusters, so its annotation would go unread"),
    ({"cluster": {"resolution": 0}}, "0 is less than or equal to the minimum of 0"),
])
def test_a_dataset_is_typed_by_a_label_column_or_by_clusters(workdir, entry, message):
    overlay = write_config(workdir / "typed.yaml", {"dataset": "typed", "datasets": {"typed": {
        "format": "h5ad", "matrix": {"source": "resources/embedded/pbmc68k_reduced_counts.h5ad"}, **entry}}})
    result = snakemake(workdir, "--dry-run", "--configfile", "config/config.yaml", overlay, check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr


@pytest.mark.parametrize("top, own, message", [
    ({}, {"train": {"epoch": 5}}, "config: dataset pbmc68k_reduced's own settings: Error validating config file."
                                  "\nValidationError: Additional properties are not allowed ('epoch' was unexpected)"),
    ({}, {"simulate": {"cells_per_type": {}}}, "config: dataset pbmc68k_reduced's own settings"),
    ({}, {"simulate": {"latent": "prior"}}, "config: dataset pbmc68k_reduced: simulate.library_sizes 'paired' takes"),
    # The top-level total and the dataset's own mix: refused, not the mix silently ignored.
    ({"simulate": {"cells": 500}}, {"simulate": {"cells_per_type": {"CD19+ B": 5}}},
     "config: dataset pbmc68k_reduced: simulate.cells (500 cells"),
])
def test_a_dataset_entrys_own_settings_are_checked_before_any_job(workdir, top, own, message):
    overlay = write_config(workdir / "own.yaml", {**top, "datasets": {"pbmc68k_reduced": own}})
    result = snakemake(workdir, "--dry-run", *QUICK_RUN, overlay, check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr


def test_missing_local_source_fails_before_any_job(workdir):
    overlay = write_config(workdir / "missing.yaml", {
        "dataset": "absent",
        "datasets": {"absent": {"format": "h5ad", "matrix": {"source": "nowhere/cells.h5ad"}, "label_column": "x"}},
    })
    result = snakemake(workdir, "--dry-run", "--configfile", "config/config.yaml", overlay, check=False)
    assert result.returncode != 0
    assert "dataset absent: matrix source nowhere/cells.h5ad does not exist" in result.stdout + result.stderr


def test_runs_from_another_directory_with_the_example_data_it_ships(workdir, tmp_path):
    # As a deployed workflow runs: the user's directory holds the config only.
    shutil.copytree(workdir / "config", tmp_path / "config")
    snakemake(workdir, "--directory", str(tmp_path), "results/pbmc68k_reduced/filtered.h5ad")
    filtered = ad.read_h5ad(tmp_path / "results" / "pbmc68k_reduced" / "filtered.h5ad")
    shipped = ad.read_h5ad(workdir / "results" / "pbmc68k_reduced" / "filtered.h5ad")
    assert list(filtered.obs_names) == list(shipped.obs_names) and (filtered.X != shipped.X).nnz == 0
    assert (tmp_path / "resources" / "datasets" / "pbmc68k_reduced" / "matrix.tar.gz").is_file()



def test_runs_as_a_module_of_another_workflow_with_its_own_settings(workdir, tmp_path):
    """Snakemake's module system, as a catalog workflow is deployed: the user's Snakefile and config only."""
    shutil.copytree(workdir / "config", tmp_path / "config")
    (tmp_path / "Snakefile").write_text(f"""configfile: "config/config.yaml"


module cvaesim:
    snakefile:
        "{workdir / 'Snakefile'}"
    config:
        config


use rule * from cvaesim
""")
    own = write_config(tmp_path / "own.yaml", {"datasets": {"pbmc68k_reduced": {"filter": {"min_cells_per_gene": 50}}}})
    snakemake(tmp_path, "results/pbmc68k_reduced/filtered.h5ad", "--configfile", "config/config.yaml", own)
    filtered = ad.read_h5ad(tmp_path / "results" / "pbmc68k_reduced" / "filtered.h5ad")
    shipped = ad.read_h5ad(workdir / "results" / "pbmc68k_reduced" / "filtered.h5ad")
    detected_in = np.asarray((shipped.X > 0).sum(axis=0)).ravel()
    assert list(filtered.var_names) == list(shipped.var_names[detected_in >= 50])
    assert planned_jobs(tmp_path, "--configfile", "config/config.yaml", own) == {
        "reshape": 1, "train": 1, "simulate": 1, "original_table": 1, "simulated_10x": 1, "qc": 1, "evaluate": 1,
        "compare_datasets": 1, "all": 1}

def test_a_source_under_the_home_directory_may_be_written_with_a_tilde(workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    cells = random_counts(60, 40, AWKWARD_TYPES, seed=6)
    (tmp_path / "data").mkdir()
    cells.write_h5ad(tmp_path / "data" / "cells.h5ad")
    overlay = write_config(workdir / "tilde.yaml", {
        "dataset": "at_home",
        "datasets": {"at_home": {"format": "h5ad", "matrix": {"source": "~/data/cells.h5ad"},
                                 "label_column": "cell_type"}},
    })
    snakemake(workdir, "results/at_home/filtered.h5ad", "--configfile", "config/config.yaml", overlay)
    filtered = ad.read_h5ad(workdir / "results" / "at_home" / "filtered.h5ad")
    assert list(filtered.obs_names) == list(cells.obs_names) and filtered.X.sum() == cells.X.sum()


def test_a_cell_ranger_folder_is_a_source_and_other_folders_are_refused_before_any_job(workdir, tmp_path):
    cells = random_counts(60, 40, AWKWARD_TYPES, seed=5)
    with tarfile.open(write_tarball(tmp_path / "cells.tar.gz", cells, folder="filtered_feature_bc_matrix",
                                    v3=True)) as archive:
        archive.extractall(workdir / "outs", filter="data")
    write_annotation(workdir / "outs.tsv", cells)
    overlay = write_config(workdir / "folders.yaml", {
        "dataset": "from_folder",
        "datasets": {
            "from_folder": {"format": "10x_tarball", "matrix": {"source": "outs"},
                            "annotation": {"source": "outs.tsv"}, "label_column": "celltype"},
            "folder_as_h5ad": {"format": "h5ad", "matrix": {"source": "outs"}, "label_column": "celltype"},
            "zarr_as_h5ad": {"format": "h5ad", "matrix": {"source": "cells.zarr"}, "label_column": "cell_type"},
        },
    })
    snakemake(workdir, "results/from_folder/filtered.h5ad", "--configfile", "config/config.yaml", overlay)
    filtered = ad.read_h5ad(workdir / "results" / "from_folder" / "filtered.h5ad")
    # Every cell, with every count (the filter drops only genes never detected).
    assert list(filtered.obs_names) == list(cells.obs_names)
    assert filtered.X.sum() == cells.X.sum()
    result = refused_before_any_job(workdir, overlay, "folder_as_h5ad", "dataset folder_as_h5ad: matrix source outs "
                                    "is a folder; only a 10x_tarball matrix may be a folder")
    assert "zarr" not in result.stdout + result.stderr
    # AnnData's other on-disk format is a folder too: the error says how to make it an .h5ad.
    if importlib.util.find_spec("zarr") is None:
        pytest.skip("zarr is not installed (anndata 0.12 brings it, 0.11 does not): no zarr store to refuse")
    cells.write_zarr(workdir / "cells.zarr")
    refused_before_any_job(workdir, overlay, "zarr_as_h5ad", "matrix source cells.zarr is a folder; only a "
                           "10x_tarball matrix may be a folder (of matrix.mtx, barcodes, genes or features); it is a "
                           "zarr store: write it as an .h5ad with anndata.read_zarr(store)")


def test_ftp_and_bucket_addresses_are_refused_before_any_job_with_their_https_address(workdir):
    overlay = write_config(workdir / "schemes.yaml", {"datasets": {
        "geo_ftp": {"format": "counts_table", "label_column": "celltype",
                    "matrix": {"source": "ftp://ftp.ncbi.nlm.nih.gov/geo/series/GSE1nnn/GSE1/suppl/GSE1_counts.csv.gz"},
                    "annotation": {"source": "https://example.org/annotation.tsv"}},
        "bucket": {"format": "h5ad", "label_column": "cell_type", "matrix": {"source": "s3://lab-data/cells.h5ad"}},
    }})
    refused_before_any_job(workdir, overlay, "geo_ftp", "dataset geo_ftp: matrix source ftp://ftp.ncbi.nlm.nih.gov/"
                           "geo/series/GSE1nnn/GSE1/suppl/GSE1_counts.csv.gz: the download job reads https://, http://, "
                           "file:// addresses or local paths, not ftp://; a public file there is mostly also at "
                           "https://ftp.ncbi.nlm.nih.gov/geo/series/GSE1nnn/GSE1/suppl/GSE1_counts.csv.gz")
    refused_before_any_job(workdir, overlay, "bucket", "not s3://; a public file there is mostly also at "
                           "https://lab-data.s3.amazonaws.com/cells.h5ad")


def test_pinning_a_download_s_digest_reruns_nothing_and_a_pin_that_differs_is_refused(workdir):
    # The shipped config pins the embedded files' digests; unpinned, pinned again, nothing reruns (before, the
    # digest was a setting of the download, and pinning it after a first run, as its .sha256 record invites, ran
    # the download and everything after it again).
    embedded = {"pbmc68k_reduced": {"matrix": {"sha256": None}, "annotation": {"sha256": None}}}
    assert planned_jobs(workdir, *QUICK_RUN, write_config(workdir / "unpinned.yaml", {"datasets": embedded})) == {}
    assert planned_jobs(workdir, *QUICK_RUN) == {}
    # A pin that is not what was downloaded is refused when the workflow loads, naming the record.
    wrong = {"pbmc68k_reduced": {"annotation": {"sha256": "0" * 64}}}
    record = (workdir / "resources" / "datasets" / "pbmc68k_reduced" / "annotation.tsv.sha256").read_text().split()[0]
    refused_before_any_job(workdir, write_config(workdir / "wrong_pin.yaml", {"datasets": wrong}), "pbmc68k_reduced",
                           f"dataset pbmc68k_reduced: annotation.sha256 is {'0' * 64}, but resources/datasets/"
                           f"pbmc68k_reduced/annotation.tsv was downloaded with SHA-256 {record}")
    # A variant of the dataset shares its downloads, and so its pins: one that pins another digest is refused.
    embedded = yaml.safe_load((workdir / "config" / "config.yaml").read_text())["datasets"]["pbmc68k_reduced"]
    variant = {**embedded, "seed": 3, "annotation": {"source": embedded["annotation"]["source"]}}
    overlay = write_config(workdir / "variant.yaml", {"dataset": "variant", "datasets": {"variant": variant}})
    jobs = planned_jobs(workdir, *QUICK_RUN, overlay)
    assert jobs["filter"] == 1
    assert "download" not in jobs
    variant["matrix"] = {**embedded["matrix"], "sha256": "0" * 64}
    refused_before_any_job(workdir, write_config(workdir / "variant.yaml", {"datasets": {"variant": variant}}),
                           "variant", "config: datasets pbmc68k_reduced and variant share the download of their "
                           f"matrix ({embedded['matrix']['source']}) but pin different SHA-256 digests")
    # Before a download, the job checks the pin: a file that is not the pinned one is not kept.
    entry = {"format": "h5ad", "matrix": {"source": str(EMBEDDED_H5AD), "sha256": "0" * 64}, "label_column": "louvain"}
    overlay = write_config(workdir / "pinned_new.yaml", {"datasets": {"pinned_new": entry}})
    result = snakemake(workdir, "results/pinned_new/filtered.h5ad", *QUICK_RUN, overlay, check=False)
    assert result.returncode != 0 and "SHA-256 mismatch" in result.stdout + result.stderr
    assert not (workdir / "resources" / "datasets" / "pinned_new" / "matrix.h5ad").exists()


def refused_before_any_job(workdir: Path, overlay: Path, dataset: str, message: str) -> subprocess.CompletedProcess:
    """The dry run for ``dataset`` with the ``overlay`` config fails, saying ``message``."""
    result = snakemake(workdir, "--dry-run", "--configfile", "config/config.yaml", overlay,
                       "--config", f"dataset={dataset}", check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr
    return result


def test_the_sample_key_reads_one_geo_sample_from_a_folder_or_a_raw_tar_of_either_format(workdir, tmp_path):
    samples = {"GSM1_": random_counts(30, 40, ["T", "B"], seed=6), "GSM2_": random_counts(50, 40, AWKWARD_TYPES, seed=7)}
    with tarfile.open(workdir / "GSE1_RAW.tar", "w") as raw:
        for prefix, cells in samples.items():
            with tarfile.open(write_tarball(tmp_path / f"{prefix}.tar", cells, folder="", v3=True, prefix=prefix,
                                            compression="")) as one:
                for member in one:
                    raw.addfile(member, one.extractfile(member))
                one.extractall(workdir / "GSE1", filter="data")
    with tarfile.open(workdir / "GSE2_RAW.tar", "w") as raw:  # each sample's Cell Ranger HDF5 file
        for prefix, cells in samples.items():
            raw.add(write_10x_h5(tmp_path / f"{prefix}.h5", cells), arcname=f"{prefix}filtered_feature_bc_matrix.h5")
    for sample in ("GSM1", "GSM2"):
        write_annotation(workdir / f"{sample}.tsv", samples[f"{sample}_"])
    entry = {"format": "10x_tarball", "annotation": {"source": "GSM2.tsv"}, "label_column": "celltype",
             "sample": "GSM2"}
    # Two entries reading two samples of one archive on the web, their downloads running side by side.
    server = Server({"/GSE2_RAW.tar": (workdir / "GSE2_RAW.tar").read_bytes()})
    server.delay_seconds = 2
    web = {f"web_{sample}": {**entry, "format": "10x_h5", "matrix": {"source": f"{server.url}/GSE2_RAW.tar"},
                             "annotation": {"source": f"{sample}.tsv"}, "sample": sample} for sample in ("GSM1", "GSM2")}
    overlay = write_config(workdir / "geo.yaml", {"dataset": ["geo_folder", "geo_tar"], "datasets": {**web,
        "geo_folder": {**entry, "matrix": {"source": "GSE1"}},
        "geo_tar": {**entry, "matrix": {"source": "GSE1_RAW.tar"}},
        "geo_h5": {**entry, "format": "10x_h5", "matrix": {"source": "GSE2_RAW.tar"}},
        # The one sample's files, each by its own address (local paths here), as GEO lists them.
        "geo_files": {**entry, "matrix": {"source": [f"GSE1/GSM2_{name}.gz" for name in
                                                     ("matrix.mtx", "barcodes.tsv", "features.tsv")]}},
        "geo_h5ad": {"format": "h5ad", "matrix": {"source": "GSE1_RAW.tar"}, "label_column": "celltype",
                     "sample": "GSM2"},
        "annotation_files": {**entry, "matrix": {"source": "GSE1"}, "annotation": {"source": ["GSM2.tsv"] * 2}}}})
    try:
        snakemake(workdir, "results/geo_folder/filtered.h5ad", "results/geo_tar/filtered.h5ad",
                  "results/geo_h5/filtered.h5ad", "results/geo_files/filtered.h5ad", "results/web_GSM1/filtered.h5ad",
                  "results/web_GSM2/filtered.h5ad", "--configfile", "config/config.yaml", overlay)
    finally:
        server.close()
    for name, sample in [("geo_folder", "GSM2_"), ("geo_tar", "GSM2_"), ("geo_h5", "GSM2_"), ("geo_files", "GSM2_"),
                         ("web_GSM1", "GSM1_"), ("web_GSM2", "GSM2_")]:
        filtered = ad.read_h5ad(workdir / "results" / name / "filtered.h5ad")
        assert list(filtered.obs_names) == list(samples[sample].obs_names)
        assert filtered.X.sum() == samples[sample].X.sum()
    # The archive was downloaded once, and is kept for entries reading its other samples.
    assert [request["path"] for request in server.requests] == ["/GSE2_RAW.tar"]
    assert [path.name for path in (workdir / "resources" / "downloads").glob("GSE2_RAW.tar.*[0-9a-f]")]
    # The key belongs to the formats whose sources may hold several matrices: for an h5ad, refused at the start.
    refused_before_any_job(workdir, overlay, "geo_h5ad", "dataset geo_h5ad: sample picks one of several matrices in "
                           "a 10x_tarball or 10x_h5 source (a folder or archive); its h5ad source holds one")
    refused_before_any_job(workdir, overlay, "annotation_files", "dataset annotation_files: annotation source is a "
                           "list of files; only a 10x_tarball matrix may be given as its files")


def test_invalid_config_is_refused_with_the_key(workdir):
    overlay = write_config(workdir / "invalid.yaml", {"simulate": {"count_sampling": "gaussian"}})
    result = snakemake(workdir, "--dry-run", "--configfile", "config/config.yaml", overlay, check=False)
    assert result.returncode != 0
    assert "gaussian" in result.stdout + result.stderr
    twice = write_config(workdir / "twice.yaml", {"dataset": ["pbmc68k_reduced", "pbmc68k_reduced"]})
    result = snakemake(workdir, "--dry-run", "--configfile", "config/config.yaml", twice, check=False)
    assert result.returncode != 0
    assert "config: dataset lists pbmc68k_reduced more than once" in result.stdout + result.stderr
    # Snakemake's merge would keep the default 100 in place of an empty mapping.
    empty = write_config(workdir / "empty.yaml", {"simulate": {"cells_per_type": {}}})
    result = snakemake(workdir, "--dry-run", "--configfile", "config/config.yaml", empty, check=False)
    assert result.returncode != 0
    assert f"config: {empty}: simulate.cells_per_type is an empty mapping" in result.stdout + result.stderr


@pytest.mark.parametrize("settings, message", [
    ({"simulate": {"count_sampling": "negative_binomial"}},
     "simulate.count_sampling 'negative_binomial' needs the dispersions learned with train.reconstruction_loss"),
    ({"simulate": {"library_sizes": "decoded"}}, "simulate.library_sizes 'decoded' needs train.reconstruction_loss"),
    ({"simulate": {"calibration": "type_moments", "count_sampling": "round"}},
     "simulate.calibration 'type_moments' draws its own negative binomial in place of"),
    ({"train": {"reconstruction_loss": "mse"}, "image": {"scaling": "log1p_cp10k_gene_max"},
      "simulate": {"library_sizes": "decoded"}},
     "simulate.library_sizes 'decoded' cannot be used with image.scaling 'log1p_cp10k_gene_max'"),
    ({"simulate": {"library_sizes": "paired", "latent": "prior"}},
     "simulate.library_sizes 'paired' takes the library size of the training cell whose posterior"),
    ({"train": {"reconstruction_loss": "mse", "count_split": 0.5}}, "train.count_split splits each cell's counts"),
    ({"image": {"side": 30}}, "image.side 30 must be a multiple of train.strides squared (4)"),
    ({"simulate": {"cells": 500, "cells_per_type": {"CD19+ B": 5}}},
     "simulate.cells (500 cells split as the real cells are) and a simulate.cells_per_type mapping each say"),
])
def test_settings_a_job_would_refuse_are_refused_before_training(workdir, settings, message):
    overlay = write_config(workdir / "mismatch.yaml", {"train": {"reconstruction_loss": "multinomial"}, **settings})
    result = snakemake(workdir, "--dry-run", "--configfile", "config/config.yaml", overlay, check=False)
    assert result.returncode != 0 and message in result.stdout + result.stderr


def test_broken_annotation_fails_clearly_and_leaves_no_output(workdir):
    cells = random_counts(40, 30, ["T", "B"], seed=2)
    write_tarball(workdir / "unmatched.tar.gz", cells)
    cells.obs_names = [name.replace("-1", "-9") for name in cells.obs_names]
    write_annotation(workdir / "unmatched.tsv", cells)
    overlay = write_config(workdir / "unmatched.yaml", {
        "dataset": "unmatched",
        "datasets": {"unmatched": {"format": "10x_tarball", "matrix": {"source": "unmatched.tar.gz"},
                                   "annotation": {"source": "unmatched.tsv"}, "label_column": "celltype"}},
    })
    result = snakemake(workdir, *QUICK_RUN, overlay, check=False)
    assert result.returncode != 0
    assert "none of its 40 labelled barcodes is in" in result.stdout + result.stderr
    assert not (workdir / "results" / "unmatched" / "filtered.h5ad").exists()
    assert not list((workdir / "results" / "unmatched").glob("*.h5ad"))


def test_10x_h5_dataset_is_filtered_and_needs_an_annotation(workdir):
    cells = random_counts(60, 40, AWKWARD_TYPES, seed=3)
    write_10x_h5(workdir / "cells.h5", cells, antibodies=2)
    write_annotation(workdir / "cells.tsv", cells)
    entry = {"format": "10x_h5", "matrix": {"source": "cells.h5"}, "label_column": "celltype"}
    unlabelled = write_config(workdir / "unlabelled.yaml", {"dataset": "h5cells", "datasets": {"h5cells": entry}})
    result = snakemake(workdir, "--dry-run", "--configfile", "config/config.yaml", unlabelled, check=False)
    assert result.returncode != 0 and "annotation" in result.stdout + result.stderr
    labelled = write_config(workdir / "labelled.yaml", {"dataset": "h5cells", "datasets": {
        "h5cells": {**entry, "annotation": {"source": "cells.tsv"}}}})
    snakemake(workdir, "results/h5cells/filtered.h5ad", "--configfile", "config/config.yaml", labelled)
    filtered = ad.read_h5ad(workdir / "results" / "h5cells" / "filtered.h5ad")
    assert filtered.n_obs == 60 and not filtered.var_names.str.startswith("ADT").any()
    assert set(filtered.obs["cell_type"]) == set(AWKWARD_TYPES)


def test_a_text_count_table_or_an_unlabelled_h5ad_is_labelled_by_its_annotation(workdir):
    """GEO's most common layout, a gzipped genes x cells CSV, and an .h5ad without labels: the cell types in a
    separate table."""
    cells = random_counts(60, 40, AWKWARD_TYPES, seed=5)
    table = pd.DataFrame(cells.X.toarray().T, index=cells.var_names, columns=cells.obs_names)
    table.to_csv(workdir / "GSE1_counts.csv.gz")
    ad.AnnData(cells.X, obs=pd.DataFrame(index=cells.obs_names), var=cells.var).write_h5ad(workdir / "plain.h5ad")
    write_loom(workdir / "cells.loom", cells, label_attribute="Clusters")
    write_annotation(workdir / "cells.tsv", cells)
    entry = {"format": "counts_table", "matrix": {"source": "GSE1_counts.csv.gz"}, "annotation": {"source": "cells.tsv"},
             "label_column": "celltype"}
    # Refused at the start: a table without its annotation, or with a sample (a table holds one matrix).
    for name, broken, message in [
            ("unlabelled", {key: value for key, value in entry.items() if key != "annotation"},
             "'annotation' is a required property"),
            ("sampled", {**entry, "sample": "GSM1"}, "its counts_table source holds one")]:
        refused_before_any_job(workdir, write_config(workdir / f"{name}.yaml", {"datasets": {name: broken}}), name,
                               message)
    overlay = write_config(workdir / "table.yaml", {"datasets": {
        "table": entry, "plain": {**entry, "format": "h5ad", "matrix": {"source": "plain.h5ad"}},
        "pure": {**entry, "exclude_types": [AWKWARD_TYPES[0]]},
        # A loom file labelled by its own column attribute, and by the annotation table.
        "loomed": {"format": "loom", "matrix": {"source": "cells.loom"}, "label_column": "Clusters"},
        "loom_annotated": {**entry, "format": "loom", "matrix": {"source": "cells.loom"}}}})
    snakemake(workdir, *(f"results/{name}/filtered.h5ad" for name in ("table", "plain", "pure", "loomed",
                                                                       "loom_annotated")),
              "--configfile", "config/config.yaml", overlay)
    for name in ("table", "plain", "loomed", "loom_annotated"):
        filtered = ad.read_h5ad(workdir / "results" / name / "filtered.h5ad")
        assert list(filtered.obs_names) == list(cells.obs_names)
        assert list(filtered.var_names) == list(cells.var_names)
        assert (filtered.X != cells.X).nnz == 0
        assert list(filtered.obs["cell_type"]) == list(cells.obs["cell_type"])
    # A dataset's exclude_types leaves those cells out (doublets, unassigned calls).
    pure = ad.read_h5ad(workdir / "results" / "pure" / "filtered.h5ad")
    assert list(pure.obs_names) == list(cells.obs_names[cells.obs["cell_type"] != AWKWARD_TYPES[0]])


def test_lint_format_and_report(workdir):
    lint = snakemake(workdir, "--lint", check=False)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "Lints for" not in lint.stdout + lint.stderr
    snakefmt = shutil.which("snakefmt", path=str(Path(sys.executable).parent))
    formatting = subprocess.run([snakefmt, "--check", "."], cwd=workdir, capture_output=True, text=True)
    assert formatting.returncode == 0, formatting.stderr
    # A dataset's own settings (here the quick run's values again, so nothing reruns) are listed with its cells.
    own = write_config(workdir / "own_report.yaml", {"datasets": {"pbmc68k_reduced": {"qc": {"max_real_cells": 400}}}})
    snakemake(workdir, *QUICK_RUN, own, "--report", "report.html")
    html = (workdir / "report.html").read_text(errors="replace")
    assert "umap.png" in html and "history.png" in html
    assert (f"<li>pbmc68k_reduced: {CELLS_PER_TYPE} cells per cell type; "
            '<tt class=\\"docutils literal\\">qc.max_real_cells</tt>: 400.</li>') in html


def test_original_preset_runs_the_original_design_end_to_end(tmp_path):
    """The README's command for the original design, with a few epochs, in a fresh copy."""
    from cvaesim.steps import load_model

    root = copy_repository(tmp_path / "repo")
    few = write_config(root / "few.yaml", {"train": {"epochs": 3}, "simulate": {"cells_per_type": 20},
                                           "qc": {"max_real_cells": 200}})
    snakemake(root, "--configfile", "config/config.yaml", "config/presets/original.yaml", few)
    results = root / "results" / "pbmc68k_reduced"
    store = ad.read_h5ad(results / "images" / "images.h5ad", backed="r")
    assert store.uns["image"]["scaling"] == "global_max" and store.uns["image"]["gene_order"] == "matrix"
    assert store.var["pixel"].tolist() == list(range(store.n_vars))  # genes row by row, in matrix order
    model = load_model(str(results / "model" / "cvae.keras"))
    assert model.latent_dim == 2 and model.reconstruction_loss == "mse"
    simulated = ad.read_h5ad(results / "simulated" / "simulated.h5ad")
    assert dict(simulated.uns["simulation"]) == {"seed": 0, "count_sampling": "round", "library_sizes": "decoded",
                                                 "latent": "prior", "calibration": "none"}
    assert simulated.shape == (10 * 20, 765) and simulated.X.dtype == np.int32
    overall = pd.read_csv(results / "evaluation" / "overall.tsv", sep="\t", index_col="metric")
    assert overall.loc[["rf_auc", "mmd"], "cvae"].notna().all()
    assert list(overall.columns) == ["cvae", "nb", "poisson", "real_vs_real"]  # no training cells by default
    assert (results / "qc" / "summary.tsv").exists()
