"""One function per workflow rule: read the rule's inputs, call the library, write its outputs.

Scripts in ``scripts/`` only unpack ``snakemake`` and call these, so tests run the same code.
Every output is written to a temporary file and renamed, so a failed step leaves none.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import anndata as ad
import pandas as pd

from . import InputError
from .clustering import leiden_clusters
from .download import container_problem, fetch, sha256_of
from .filtering import FilterThresholds, attach_labels, check_labels_are_types, filter_cells_and_genes
from .formats import FORMATS, detected_format, model_file_problem
from .images import build_image_store, layout_table
from .io import (IMAGE_STORE, atomic_output, open_h5ad, read_10x_h5, read_10x_tarball, read_h5ad_counts,
                 read_loom_counts, write_h5ad)
from .tables import read_annotation, read_counts_table

log = logging.getLogger(__name__)

# The formats whose cells may carry their labels (an .h5ad's obs column, a loom file's column attribute).
LABELLED_READERS = {"h5ad": read_h5ad_counts, "loom": read_loom_counts}


def download(source: str, output: str, sha256: str | None = None, sample: str | None = None) -> None:
    """Fetch a dataset's file to ``output`` (``resources/datasets/<name>/<file>``), keeping whole web downloads
    that entries pick samples of in ``resources/downloads/``, shared by all entries."""
    fetch(source, output, sha256, check=functools.partial(container_problem, name=Path(output).name, sample=sample),
          sample=sample, kept_downloads=Path(output).absolute().parents[2] / "downloads")


def filter_dataset(
    matrix: str,
    output: str,
    format: str,
    label_column: str,
    annotation: str | None = None,
    barcode_column: str = "barcodes",
    counts_layer: str | None = None,
    thresholds: dict | None = None,
    round_counts: bool = False,
    sample: str | None = None,
    exclude_types: Sequence[str] = (),
) -> None:
    """Labelled, filtered integer counts as a sparse ``.h5ad`` with ``obs['cell_type']`` (from the annotation
    table where there is one, else from an .h5ad's ``label_column``); ``round_counts`` rounds non-integer
    counts (see ``matrix_checks.integer_counts``); ``sample`` names the matrix to read of a tarball's several
    (see ``archives.chosen_matrix``); cells labelled one of ``exclude_types`` are left out."""
    adata = read_labelled(matrix, format, label_column, annotation, barcode_column, counts_layer, round_counts, sample)
    check_labels_are_types(adata.obs["cell_type"].dropna(), label_column, annotation or matrix)
    filtered = filter_cells_and_genes(adata, FilterThresholds(**(thresholds or {})), annotation or matrix,
                                      exclude_types)
    log.info("%d cell types: %s", filtered.obs["cell_type"].cat.categories.size,
             ", ".join(f"{name}: {n}" for name, n in filtered.obs["cell_type"].value_counts(sort=False).items()))
    write_h5ad(filtered, output)


def read_labelled(matrix: str, format: str, label_column: str, annotation: str | None = None,
                  barcode_column: str = "barcodes", counts_layer: str | None = None, round_counts: bool = False,
                  sample: str | None = None) -> ad.AnnData:
    """A dataset's counts with its cells' types in ``obs['cell_type']``: from the ``annotation`` table where
    there is one, else from an .h5ad's obs column or a loom file's column attribute ``label_column``."""
    if format not in FORMATS:
        raise InputError(f"{matrix}: unknown format {format!r}; choose one of {FORMATS}")
    if format in LABELLED_READERS and annotation is None:  # its cells carry their labels
        return LABELLED_READERS[format](matrix, label_column, counts_layer, round_counts)
    if annotation is None:
        raise InputError(f"{matrix}: a {format} matrix needs an annotation file with the cell types")
    labels = read_annotation(annotation, barcode_column, label_column)
    return attach_labels(read_counts(matrix, format, round_counts, sample, counts_layer, labels.index), labels,
                         matrix, annotation)


def read_counts(matrix: str, format: str, round_counts: bool, sample: str | None, counts_layer: str | None,
                barcodes: Sequence[str] = ()) -> ad.AnnData:
    """A dataset's counts without labels; ``barcodes`` (an annotation's) tell a count table's cells from its genes."""
    if format == "10x_tarball":
        return read_10x_tarball(matrix, round_counts, sample)
    if format == "10x_h5":
        return read_10x_h5(matrix, round_counts)
    if format == "counts_table":
        return read_counts_table(matrix, barcodes, round_counts)
    return LABELLED_READERS[format](matrix, None, counts_layer, round_counts)


def cluster(matrix: str, output: str, format: str, resolution: float, seed: int, counts_layer: str | None = None,
            thresholds: dict | None = None, round_counts: bool = False, sample: str | None = None) -> None:
    """An annotation table (columns ``barcode``, ``cluster``) typing a dataset's cells by their Leiden clusters,
    for a dataset that has no cell types: the cells that pass the filter's cell and gene thresholds, clustered
    (see ``clustering.leiden_clusters``); the filter then reads it as the dataset's annotation."""
    if format not in FORMATS:
        raise InputError(f"{matrix}: unknown format {format!r}; choose one of {FORMATS}")
    counts = read_counts(matrix, format, round_counts, sample, counts_layer)
    counts.obs["cell_type"] = "unclustered"
    # The type threshold is the filter's, which drops clusters too small once the cells are typed; the cells are
    # clustered on all their genes, as top_genes chooses the genes to simulate.
    cells = filter_cells_and_genes(counts, replace(FilterThresholds(**(thresholds or {})), min_cells_per_type=1,
                                                   top_genes=None), matrix)
    clusters = leiden_clusters(cells, resolution, seed, matrix)
    with atomic_output(output) as temporary:
        pd.DataFrame({"barcode": cells.obs_names, "cluster": clusters}).to_csv(temporary, sep="\t", index=False)


def reshape(filtered: str, store: str, layout: str, side: int | None, scaling: str,
            test_fraction: float, seed: int, side_multiple: int = 4, gene_order: str = "matrix") -> None:
    """The image store (scaled values, layout, split) and its layout as a TSV."""
    images = build_image_store(ad.read_h5ad(filtered), side, scaling, test_fraction, seed, side_multiple, gene_order)
    counts = images.obs.groupby("cell_type", observed=False)["split"].value_counts().unstack()
    log.info("image side %d, scaling %s; cells per split:\n%s", images.uns["image"]["side"], scaling, counts)
    with atomic_output(layout) as temporary:
        layout_table(images).to_csv(temporary, sep="\t", index=False)
    write_h5ad(images, store)


def train(store: str, model_path: str, history_tsv: str, history_plot: str, settings: dict, seed: int,
          posteriors: str | None = None, simulation: dict | None = None, threads: int | None = None) -> None:
    """Checkpoints go to ``<model folder>/checkpoint/`` each epoch; a rerun after a kill resumes there.

    ``posteriors``: where to save the training cells' posteriors, for simulations to draw from.
    ``simulation``: the simulate settings that will use this model (``cells_per_type``, ``cells``,
    ``write_table``), checked against the store's cell types before training, so that a misspelt type
    fails in seconds rather than after hours of training. ``threads``: the cores TensorFlow may use.
    """
    from .plots import plot_history
    from .simulation import Posteriors
    from .training import TrainingSettings, collapse_warning, train as fit, use_threads

    # The run is identified by what determines it: settings (less the epoch count, so that
    # raising it continues training), seed and the store's content.
    identity = {key: value for key, value in settings.items() if key != "epochs"}
    fingerprint = hashlib.sha256(
        json.dumps([identity, seed, sha256_of(Path(store))], sort_keys=True).encode()
    ).hexdigest()
    images = ad.read_h5ad(store)
    if simulation is not None:
        simulation_plan(images, **simulation)
    if threads is not None:
        use_threads(threads)
    model, history = fit(images, TrainingSettings(**settings), seed,
                         checkpoint=Path(model_path).parent / "checkpoint", fingerprint=fingerprint)
    with atomic_output(model_path) as temporary:
        model.save(temporary)
    if posteriors is not None:
        with atomic_output(posteriors) as temporary:
            Posteriors.of_training_cells(model, images, seed=seed).save(temporary)
    with atomic_output(history_tsv) as temporary:
        history.to_csv(temporary, sep="\t", index=False)
    with atomic_output(history_plot) as temporary:
        plot_history(history, temporary, collapse_warning(history))


def load_model(path: str):
    if problem := model_file_problem(path):
        raise InputError(f"{path}: {problem}")
    import keras

    from . import model  # noqa: F401  registers the custom classes for deserialisation

    return keras.models.load_model(path, compile=False)


def simulate(model_path: str, store: str, output: str, cells_per_type: int | dict[str, int], seed: int,
             batch_size: int, count_sampling: str, library_sizes: str, latent: str = "prior",
             posteriors: str | None = None, calibration: str = "none", write_table: bool = False,
             cells: int | None = None, origins: str = "balanced", expected: str | None = None,
             threads: int | None = None) -> None:
    """``cells_per_type`` cells of every cell type the model knows (or, where it maps type names to numbers,
    of the types it names), or ``cells`` in all split across the types as the real cells are, as a sparse
    ``.h5ad``; with ``expected``, also what their counts were drawn around, per type and gene, as a TSV
    (:class:`~cvaesim.simulation.ExpectedExpression`).

    ``write_table``: the original_table rule will turn these cells into a dense table, so refuse
    now, before simulating, a number of cells that table cannot hold. ``threads``: the cores TensorFlow may use.
    """
    from .simulation import ExpectedExpression, Simulator
    from .training import use_threads
    from .writers import write_expected, write_h5ad as write_stream

    if threads is not None:
        use_threads(threads)
    meta = ad.read_h5ad(store, backed="r")
    plan = simulation_plan(meta, cells_per_type, cells, write_table)
    simulator = Simulator(load_model(model_path), meta, batch_size, count_sampling, library_sizes, latent, posteriors,
                          calibration, origins)
    meta.file.close()
    if cells is not None:
        left_out = [name for name in simulator.cell_types if name not in plan]
        if left_out:
            log.warning("simulate.cells = %d leaves out %d cell types too rare for one cell in that many: %s",
                        cells, len(left_out), ", ".join(left_out))
    log.info("simulating %d cells: %s", sum(plan.values()), ", ".join(f"{name}: {n}" for name, n in plan.items()))
    truth = ExpectedExpression(simulator.var.index) if expected else None
    write_stream(simulator.batches(plan, seed, truth), simulator.var, simulator.cell_types, simulator.settings(seed),
                 output)
    if truth is not None:
        write_expected(truth.table(), expected)


def simulation_plan(images: ad.AnnData, cells_per_type: int | dict[str, int], cells: int | None,
                    write_table: bool) -> dict[str, int]:
    """How many cells of each of the image store's cell types the simulate settings ask for; refuses
    unknown types, and a number of cells the original's dense table cannot hold where one is wanted."""
    from .plans import store_cell_plan
    from .writers import table_problem

    plan = store_cell_plan(images.obs["cell_type"], cells_per_type, cells, asked_by="simulate.cells_per_type")
    if write_table and (problem := table_problem(sum(plan.values()), images.n_vars)):
        raise InputError(f"simulate.write_table is true, but {problem}; set simulate.write_table: false "
                         f"(the .h5ad is written either way) or lower simulate.{'cells_per_type' if cells is None else 'cells'}")
    return plan


def original_table(simulated: str, output: str) -> None:
    """The original's HDF5 table (pandas, key ``simulated``): gene columns and a ``cell_type`` column."""
    from .writers import write_table

    write_table(ad.read_h5ad(simulated), output)


def simulated_10x(simulated: str, output: str) -> None:
    """The simulated cells as a 10x v3 folder with their cell types, for tools that read Cell Ranger's
    output (Seurat's ``Read10X``, ``scanpy.read_10x_mtx``, DropletUtils)."""
    from .writers import cell_type_batches, write_10x

    cells = ad.read_h5ad(simulated)
    write_10x(cell_type_batches(cells), cells.var, output)
    log.info("wrote %d cells x %d genes to %s", cells.n_obs, cells.n_vars, output)


def qc(real: str, simulated: str, outputs: dict, seed: int, max_real_cells: int, n_markers: int) -> None:
    """QC metrics, violins, joint PCA/UMAP and markers of real versus simulated cells."""
    from . import qc as scqc

    combined = scqc.combine(ad.read_h5ad(real), ad.read_h5ad(simulated), max_real_cells, seed)
    scqc.add_qc_metrics(combined)
    normalised = scqc.embed(combined, seed)
    markers = scqc.marker_table(normalised, n_markers)
    tables = {
        "summary": scqc.qc_summary(combined),
        "markers": markers,
        "marker_overlap": scqc.marker_overlap(markers),
    }
    for name, table in tables.items():
        with atomic_output(outputs[name]) as temporary:
            table.to_csv(temporary, sep="\t", index=False)
    figures = {
        "violins": lambda path: scqc.plot_violins(combined, path),
        "pca": lambda path: scqc.plot_embedding(normalised, "pca", path),
        "umap": lambda path: scqc.plot_embedding(normalised, "umap", path),
        "marker_dotplot": lambda path: scqc.plot_markers(normalised, markers, path),
    }
    for name, draw in figures.items():
        with atomic_output(outputs[name]) as temporary:
            draw(temporary)


# The evaluate rule's outputs, by the names steps.evaluate writes them under (the command line's file names).
EVALUATION_FILES = {"overall": "overall.tsv", "metrics": "metrics.tsv", "json": "metrics.json",
                    "confusion": "confusion.tsv", "per_type": "per_type.png", "mean_variance": "mean_variance.png"}


def evaluate(real: str, store: str, simulated: str, outputs: dict, settings: dict, seed: int, threads: int = 1,
             label_column: str = "cell_type", simulated_format: str | None = None, annotation: str | None = None,
             barcode_column: str = "barcode", counts_layer: str | None = None, round_counts: bool = False) -> None:
    """Realism metrics of the simulated cells against the held-out test cells, with baselines and control.

    The simulated cells may come from another simulator (see ``read_simulated`` for the formats): their counts
    whole numbers of any type (R writes doubles), their genes those of the real cells in any order (or more: the
    others are left out)."""
    from .evaluation import EvaluationSettings, evaluate as score, overall_table
    from .plots import plot_mean_variance, plot_per_type

    cell_split = open_h5ad(store, *IMAGE_STORE).obs
    if "split" not in cell_split:
        raise InputError(f"{store}: not an image store (no split of the cells into training and test cells); "
                         f"give the images.h5ad the reshape rule wrote")
    split = cell_split["split"]
    counts = open_h5ad(real, "a dataset's filtered cells", "the filtered.h5ad the filter rule wrote", backed=None)
    if not split.index.equals(counts.obs_names):
        raise InputError(f"{store}: its cells are not those of {real}; rerun the reshape rule")
    if counts.X.dtype.kind not in "iu":  # the filter writes integer counts
        raise InputError(f"{real}: holds no counts (its values are {counts.X.dtype}, as an image store's scaled "
                         f"values are); give the filter rule's filtered.h5ad")
    cells = comparable_cells(read_simulated(simulated, simulated_format, label_column, annotation, barcode_column,
                                            counts_layer, round_counts), simulated, counts, real)
    result = score(counts, (split == "test").to_numpy(), cells,
                   EvaluationSettings(**settings, seed=seed, n_jobs=threads))
    tables = {"metrics": result.metrics, "confusion": result.confusion,
              "overall": overall_table(result.metrics).reset_index()}
    for name, table in tables.items():
        with atomic_output(outputs[name]) as temporary:
            table.to_csv(temporary, sep="\t", index=False, float_format="%.6g")
    with atomic_output(outputs["json"]) as temporary:
        temporary.write_text(json.dumps({
            "overall": overall_table(result.metrics).to_dict(),
            "per_type": result.metrics.to_dict(orient="records"),
            "cells": result.cells.to_dict(orient="index"),
        }, indent=1, default=float))
    with atomic_output(outputs["per_type"]) as temporary:
        plot_per_type(result.metrics, temporary, result.cells)
    with atomic_output(outputs["mean_variance"]) as temporary:
        plot_mean_variance(result.gene_statistics, temporary)


def read_simulated(simulated: str, format: str | None, label_column: str, annotation: str | None,
                   barcode_column: str, counts_layer: str | None = None, round_counts: bool = False) -> ad.AnnData:
    """Simulated cells with their types in ``obs['cell_type']``, read as a dataset is (see ``read_labelled``):
    from an .h5ad or loom file (types in its ``label_column``) or, as other simulators leave them, from any
    format a dataset may have, typed by the ``annotation`` table's ``label_column``.

    ``format`` None: told by the file's bytes, a folder being a 10x matrix folder, whose ``cell_types.tsv`` (as
    ``cvaesim simulate`` writes one) is its annotation unless another is given."""
    path = Path(simulated)
    if not path.exists():
        raise InputError(f"{simulated}: no such file or folder")
    if format is None:
        format = "10x_tarball" if path.is_dir() else (detected_format(path) or (None,))[0] or "h5ad"
    if path.is_dir() and annotation is None and (path / "cell_types.tsv").is_file():
        annotation = str(path / "cell_types.tsv")
    if annotation is None and format not in LABELLED_READERS:
        raise InputError(f"{simulated}: a {format} matrix carries no cell types; give a table of them (--annotation)")
    if path.is_dir() and format != "10x_tarball":
        raise InputError(f"{simulated}: a folder, which is read as a 10x matrix folder (format 10x_tarball), "
                         f"not as {format}")
    return read_labelled(simulated, format, label_column, annotation, barcode_column, counts_layer, round_counts)


def comparable_cells(cells: ad.AnnData, simulated: str, counts: ad.AnnData, real: str) -> ad.AnnData:
    """The simulated ``cells`` (integer counts, typed in ``obs['cell_type']``, as ``read_simulated`` gives them)
    over the real cells' genes, in their order; refused, naming the file, where they lack genes or have types the
    real cells lack."""
    missing = counts.var_names.difference(cells.var_names, sort=False)
    if len(missing):
        raise InputError(f"{simulated}: {len(missing)} of the {counts.n_vars} genes of {real} are missing (e.g. "
                         f"{', '.join(map(repr, missing[:3]))}); simulated cells are scored over the real cells' genes")
    if not cells.var_names.equals(counts.var_names):
        log.info("%s: %d genes taken in the order of %s, of its %d", simulated, counts.n_vars, real, cells.n_vars)
        cells = cells[:, counts.var_names].copy()
        cells.X.sort_indices()  # as the cells' own order leaves them, so that every sum adds in the same order
    unknown = sorted(set(cells.obs["cell_type"].astype(str)) - set(counts.obs["cell_type"].astype(str)))
    if unknown:
        raise InputError(f"{simulated}: cell types {unknown} are not among those of {real}")
    return cells


def compare_datasets(overall_tables: Sequence[str], datasets: Sequence[str], outputs: dict) -> None:
    """The selected datasets' overall realism tables in one, by metric (columns the sources scored in any),
    and as a figure."""
    from .evaluation import datasets_table
    from .plots import plot_by_dataset

    if len(overall_tables) != len(datasets):
        raise ValueError(f"{len(overall_tables)} overall tables for {len(datasets)} datasets")
    tables = {}
    for name, path in zip(datasets, overall_tables):
        table = pd.read_csv(path, sep="\t")
        if not {"metric", "cvae"} <= set(table.columns) or "cell_type" in table.columns:
            raise InputError(f"{path}: not an overall realism table (columns {', '.join(table.columns)}); "
                             f"rerun the evaluate rule")
        tables[name] = table
    log.info("the overall tables of %d datasets in one: %s", len(tables), ", ".join(tables))
    compared = datasets_table(tables)
    with atomic_output(outputs["table"]) as temporary:
        compared.to_csv(temporary, sep="\t", index=False, float_format="%.6g")
    with atomic_output(outputs["figure"]) as temporary:
        plot_by_dataset(compared, temporary)
