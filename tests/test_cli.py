"""On-demand simulation from the command line, in every output format."""

import csv
import gzip
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scanpy as sc

from cvaesim.cli import main
from cvaesim.plans import cell_plan
from cvaesim.io import TENX_OUTPUT_FILES
from cvaesim.images import build_image_store
from cvaesim.model import ConditionalConvVAE
from cvaesim.simulation import Posteriors, simulate
from cvaesim import InputError, steps, training, writers
from cvaesim.steps import load_model

from conftest import AWKWARD_TYPES, random_counts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    cells = random_counts(120, 50, AWKWARD_TYPES)
    cells.obs["cell_type"] = pd.Categorical(cells.obs["cell_type"])
    store = build_image_store(cells, None, "log1p_gene_max", 0.4, seed=0)
    store.write_h5ad(folder / "images.h5ad")
    cells.write_h5ad(folder / "filtered.h5ad")  # the real cells, for scoring
    ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, seed=0).save(folder / "cvae.keras")
    return folder


def run(trained, *arguments):
    return main(["simulate", "--model", str(trained / "cvae.keras"), "--store", str(trained / "images.h5ad"),
                 *arguments])


# 23 per type: one append to the file; 700 per type: more cells than one append takes.
@pytest.mark.parametrize(("per_type", "batch_size"), [(23, 5), (700, 256)])
def test_h5ad_is_written_batch_by_batch_and_matches_in_memory_simulation(trained, tmp_path, per_type, batch_size):
    output = tmp_path / "cells.h5ad"
    assert run(trained, "--output", str(output), "--cells-per-type", str(per_type), "--batch-size", str(batch_size),
               "--seed", "3") == 0
    written = ad.read_h5ad(output)
    assert written.shape == (4 * per_type, 50)
    assert written.obs["cell_type"].value_counts().eq(per_type).all()
    store = ad.read_h5ad(trained / "images.h5ad", backed="r")
    plan = dict.fromkeys(store.obs["cell_type"].cat.categories, per_type)
    expected = simulate(load_model(str(trained / "cvae.keras")), store, plan, seed=3, batch_size=batch_size,
                        latent="posterior", calibration="type_moments", library_sizes="paired")
    assert (written.X != expected.X).nnz == 0
    assert list(written.obs_names) == list(expected.obs_names)
    assert written.uns["simulation"]["seed"] == 3
    assert written.uns["simulation"]["calibration"] == "type_moments"
    assert written.uns["simulation"]["library_sizes"] == "paired"
    assert written.uns["simulation"]["origins"] == "balanced"
    independent = tmp_path / "independent.h5ad"
    assert run(trained, "--output", str(independent), "--cells-per-type", str(per_type), "--batch-size",
               str(batch_size), "--seed", "3", "--origins", "independent") == 0
    expected = simulate(load_model(str(trained / "cvae.keras")), store, plan, seed=3, batch_size=batch_size,
                        latent="posterior", calibration="type_moments", library_sizes="paired", origins="independent")
    assert (ad.read_h5ad(independent).X != expected.X).nnz == 0


def test_prior_draws_resample_library_sizes_unless_told_otherwise(trained, tmp_path, capsys):
    output = tmp_path / "prior.h5ad"
    assert run(trained, "--output", str(output), "--cells-per-type", "5", "--latent", "prior") == 0
    assert ad.read_h5ad(output).uns["simulation"]["library_sizes"] == "resampled"
    refused = tmp_path / "refused.h5ad"
    assert run(trained, "--output", str(refused), "--latent", "prior", "--library-sizes", "paired") == 2
    assert "they need posterior latent draws" in capsys.readouterr().err
    assert not refused.exists()


def test_10x_folder_reads_back_with_scanpy(trained, tmp_path):
    output = tmp_path / "tenx"
    assert run(trained, "--output", str(output), "--cell-type", f"{AWKWARD_TYPES[0]}=9",
               "--cell-type", f"{AWKWARD_TYPES[3]}=4", "--batch-size", "4") == 0
    read = sc.read_10x_mtx(output)
    assert read.shape == (13, 50)
    labels = pd.read_csv(output / "cell_types.tsv", sep="\t")
    assert labels["cell_type"].value_counts().to_dict() == {AWKWARD_TYPES[0]: 9, AWKWARD_TYPES[3]: 4}
    assert list(labels["barcode"]) == list(read.obs_names)
    h5ad = tmp_path / "same.h5ad"
    run(trained, "--output", str(h5ad), "--cell-type", f"{AWKWARD_TYPES[0]}=9", "--cell-type",
        f"{AWKWARD_TYPES[3]}=4", "--batch-size", "4")
    assert np.array_equal(read.X.toarray(), ad.read_h5ad(h5ad).X.toarray())


def test_the_workflows_10x_folder_holds_the_simulated_h5ad_cell_for_cell(tmp_path, monkeypatch):
    # Types in runs that recur (A A A B A) and runs longer than a batch: the order and labels must survive.
    cells = random_counts(5, 30, ["A"])
    cells.obs["cell_type"] = pd.Categorical(["A", "A", "A", "B", "A"])
    cells.obs_names = [f"simulated_{i}" for i in range(5)]
    cells.var["gene_ids"] = [f"ENSG{i:05d}" for i in range(30)]
    assert [(batch.shape[0], label) for batch, label in writers.cell_type_batches(cells, size=2)] == [
        (2, "A"), (1, "A"), (1, "B"), (1, "A")]
    cells.write_h5ad(tmp_path / "simulated.h5ad")
    steps.simulated_10x(str(tmp_path / "simulated.h5ad"), str(tmp_path / "simulated_10x"))
    read = sc.read_10x_mtx(tmp_path / "simulated_10x", var_names="gene_symbols")
    assert np.array_equal(read.X.toarray(), cells.X.toarray())
    assert list(read.obs_names) == list(cells.obs_names) and list(read.var_names) == list(cells.var_names)
    assert list(read.var["gene_ids"]) == list(cells.var["gene_ids"])
    labels = pd.read_csv(tmp_path / "simulated_10x" / "cell_types.tsv", sep="\t")
    assert list(labels["barcode"]) == list(cells.obs_names)
    assert list(labels["cell_type"]) == ["A", "A", "A", "B", "A"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["simulated.h5ad", "simulated_10x"]
    # Written again at another time, the same bytes: gzip's header records no time of writing.
    monkeypatch.setattr(gzip.time, "time", lambda: 2_000_000_000.0)
    steps.simulated_10x(str(tmp_path / "simulated.h5ad"), str(tmp_path / "again"))
    for name in ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz", "cell_types.tsv"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "simulated_10x" / name).read_bytes(), name


def test_an_output_is_replaced_only_where_it_is_an_output_of_the_same_kind(trained, tmp_path, capsys):
    tenx = tmp_path / "tenx"
    matrices = []
    for seed in ("1", "2"):  # a rerun into the same folder replaces it
        assert run(trained, "--output", str(tenx), "--cells", "30", "--seed", seed) == 0
        assert sorted(path.name for path in tenx.iterdir()) == sorted(TENX_OUTPUT_FILES)
        matrices.append(sc.read_10x_mtx(tenx).X.toarray())
    assert not np.array_equal(*matrices)
    assert run(trained, "--output", str(tmp_path / "seed2.h5ad"), "--cells", "30", "--seed", "2") == 0
    assert np.array_equal(matrices[1], ad.read_h5ad(tmp_path / "seed2.h5ad").X.toarray())
    (tmp_path / "seed2.h5ad").unlink()
    assert [path.name for path in tmp_path.iterdir()] == ["tenx"]
    # Refused before simulating: a folder with files of the user's, a file as a 10x folder, a folder as a file.
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    (tmp_path / "cells.h5ad").mkdir()
    (tmp_path / "afile").write_text("keep")
    for output, problem in [("mine", "mine: a folder holding other files than a 10x output's (notes.txt); give a new "
                                     "or empty folder"),
                            ("cells.h5ad", "cells.h5ad: is a folder; the h5ad output is a file"),
                            ("afile", "afile: is a file; a 10x output is a folder")]:
        assert run(trained, "--output", str(tmp_path / output), "--format",
                   "h5ad" if output.endswith(".h5ad") else "10x") == 2
        assert problem in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and (tmp_path / "afile").read_text() == "keep"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile", "cells.h5ad", "mine", "tenx"]


def test_a_table_too_large_is_refused_before_simulating(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(writers, "MAX_TABLE_ENTRIES", 1_000)  # 50 genes: 20 cells fit, 21 do not
    store, model = str(trained / "images.h5ad"), str(trained / "cvae.keras")
    assert run(trained, "--output", str(tmp_path / "cells.h5"), "--cells", "21") == 2
    assert "21 cells x 50 genes is too large for the original's dense table" in capsys.readouterr().err
    # The workflow's simulate rule, when its original_table rule will follow: 4 types x 6 cells.
    output = tmp_path / "simulated.h5ad"
    with pytest.raises(InputError, match="simulate.write_table is true, but 24 cells x 50 genes is too large.*"
                                         "or lower simulate.cells_per_type"):
        steps.simulate(model, store, str(output), cells_per_type=6, seed=0, batch_size=8, count_sampling="poisson",
                       library_sizes="resampled", write_table=True)
    assert not output.exists()
    steps.simulate(model, store, str(output), cells_per_type=6, seed=0, batch_size=8, count_sampling="poisson",
                   library_sizes="resampled", write_table=False)
    with pytest.raises(InputError, match="too large"):
        steps.original_table(str(output), str(tmp_path / "table.h5"))
    assert not (tmp_path / "table.h5").exists()
    steps.simulate(model, store, str(tmp_path / "five.h5ad"), cells_per_type=5, seed=0, batch_size=8,
                   count_sampling="poisson", library_sizes="resampled", write_table=True)
    steps.original_table(str(tmp_path / "five.h5ad"), str(tmp_path / "table.h5"))
    assert pd.read_hdf(tmp_path / "table.h5", "simulated").shape == (20, 51)


def test_the_workflow_simulates_a_total_in_the_real_proportions(trained, tmp_path, caplog):
    store, model = str(trained / "images.h5ad"), str(trained / "cvae.keras")
    real = ad.read_h5ad(trained / "images.h5ad").obs["cell_type"].value_counts()
    for total in (40, 3):  # 3: fewer cells than types, so some are left out
        output = tmp_path / f"total_{total}.h5ad"
        with caplog.at_level("INFO"):
            steps.simulate(model, store, str(output), cells_per_type=100, cells=total, seed=0, batch_size=8,
                           count_sampling="poisson", library_sizes="resampled")
        simulated = ad.read_h5ad(output).obs["cell_type"].value_counts()
        assert simulated.sum() == total
        for name, n in simulated.items():
            assert abs(n - total * real[name] / real.sum()) < 1
    assert f"simulate.cells = 3 leaves out {len(real) - 3} cell types too rare" in caplog.text


def test_table_and_proportional_totals(trained, tmp_path):
    output = tmp_path / "cells.h5"
    assert run(trained, "--output", str(output), "--cells", "50") == 0
    table = pd.read_hdf(output, "simulated")
    assert len(table) == 50 and table.columns[-1] == "cell_type"
    real = ad.read_h5ad(trained / "images.h5ad").obs["cell_type"].value_counts()
    expected = cell_plan(list(real.index), real.to_dict(), 100, 50, asked_by="--cells")
    assert table["cell_type"].value_counts().to_dict() == {k: v for k, v in expected.items() if v}
    for name, n in expected.items():
        assert abs(n - 50 * real[name] / real.sum()) < 1


def test_the_simulate_rule_takes_a_number_per_named_cell_type(trained, tmp_path):
    store, model = str(trained / "images.h5ad"), str(trained / "cvae.keras")
    settings = dict(seed=0, batch_size=8, count_sampling="poisson", library_sizes="resampled")
    steps.simulate(model, store, str(tmp_path / "mix.h5ad"), {AWKWARD_TYPES[1]: 7, AWKWARD_TYPES[2]: 0}, **settings)
    assert ad.read_h5ad(tmp_path / "mix.h5ad").obs["cell_type"].value_counts()[lambda n: n > 0].to_dict() == {
        AWKWARD_TYPES[1]: 7}
    misspelt = AWKWARD_TYPES[1].upper()
    with pytest.raises(InputError, match=re.escape(f"simulate.cells_per_type: unknown cell types [{misspelt!r}] "
                                                   f"(did you mean {AWKWARD_TYPES[1]!r}?); the cell types are")):
        steps.simulate(model, store, str(tmp_path / "typo.h5ad"), {misspelt: 7}, **settings)
    with pytest.raises(InputError, match="simulate.cells_per_type: no cells asked for: every number is 0"):
        steps.simulate(model, store, str(tmp_path / "none.h5ad"), {AWKWARD_TYPES[1]: 0}, **settings)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mix.h5ad"]


def test_the_train_rule_refuses_a_simulation_its_model_could_not_make_before_training(trained, tmp_path,
                                                                                    monkeypatch):
    def training_started(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(training, "train", training_started)
    monkeypatch.setattr(writers, "MAX_TABLE_ENTRIES", 1_000)  # 50 genes: 20 cells fit, 21 do not
    outputs = {name: str(tmp_path / name) for name in ("cvae.keras", "history.tsv", "history.png", "posteriors.npz")}
    misspelt = AWKWARD_TYPES[1].upper()
    for simulation, message in [
        ({"cells_per_type": {misspelt: 7}, "cells": None, "write_table": False},
         f"simulate.cells_per_type: unknown cell types [{misspelt!r}] (did you mean {AWKWARD_TYPES[1]!r}?)"),
        ({"cells_per_type": 5, "cells": 21, "write_table": True},
         "simulate.write_table is true, but 21 cells x 50 genes is too large"),
    ]:
        with pytest.raises(InputError, match=re.escape(message)):
            steps.train(str(trained / "images.h5ad"), outputs["cvae.keras"], outputs["history.tsv"],
                        outputs["history.png"], settings={}, seed=0, posteriors=outputs["posteriors.npz"],
                        simulation=simulation)
    assert list(tmp_path.iterdir()) == []
    # What the store's types allow gets as far as the training.
    with pytest.raises(AssertionError, match="training started"):
        steps.train(str(trained / "images.h5ad"), outputs["cvae.keras"], outputs["history.tsv"],
                    outputs["history.png"], settings={}, seed=0,
                    simulation={"cells_per_type": {AWKWARD_TYPES[1]: 7}, "cells": None, "write_table": True})


@pytest.mark.parametrize("suffix", [".h5ad", ""])
def test_the_known_truth_is_written_beside_the_cells_as_the_rule_writes_it(trained, tmp_path, suffix):
    output = tmp_path / f"cells{suffix}"
    assert run(trained, "--output", str(output), "--cells-per-type", "30", "--seed", "2", "--batch-size", "8",
               "--expected", str(tmp_path / "truth.tsv")) == 0
    truth = pd.read_csv(tmp_path / "truth.tsv", sep="\t")
    steps.simulate(str(trained / "cvae.keras"), str(trained / "images.h5ad"), str(tmp_path / "rule.h5ad"), 30,
                   seed=2, batch_size=8, count_sampling="poisson", library_sizes="paired", latent="posterior",
                   calibration="type_moments", expected=str(tmp_path / "rule.tsv"))
    assert truth.equals(pd.read_csv(tmp_path / "rule.tsv", sep="\t"))
    assert list(truth["cell_type"].unique()) == sorted(AWKWARD_TYPES)  # the store's order, names read back whole
    assert truth.groupby("cell_type")["gene"].count().eq(50).all()
    assert np.allclose(truth.groupby("cell_type")["mean_per_10k"].sum(), 1e4)


def test_a_truth_file_that_would_replace_a_folder_or_the_cells_is_refused_before_simulating(trained, tmp_path,
                                                                                          capsys):
    (tmp_path / "folder").mkdir()
    for expected, problem in ((tmp_path / "folder", "is a folder"), (tmp_path / "cells.h5ad", "is the --output")):
        assert run(trained, "--output", str(tmp_path / "cells.h5ad"), "--expected", str(expected)) == 2
        assert f"--expected {expected}: {problem}; give a new .tsv file" in capsys.readouterr().err
    assert [path.name for path in tmp_path.iterdir()] == ["folder"]


def test_a_plan_names_cell_types_as_the_labels_are_written():
    # YAML reads Louvain clusters' names (0, 1, ...) as numbers; the labels are strings.
    assert cell_plan(["0", "1", "10"], {}, {0: 5, 10: 2}, None, asked_by="x") == {"0": 5, "10": 2}
    assert cell_plan(["A", "B"], {"A": 30, "B": 10}, 100, None, asked_by="x") == {"A": 100, "B": 100}
    assert cell_plan(["A", "B"], {"A": 30, "B": 10}, 100, 8, asked_by="x") == {"A": 6, "B": 2}


def test_posteriors_beside_the_model_are_used(trained, tmp_path, capsys):
    model = load_model(str(trained / "cvae.keras"))
    store = ad.read_h5ad(trained / "images.h5ad")
    with_posteriors = tmp_path / "model"
    with_posteriors.mkdir()
    (with_posteriors / "cvae.keras").write_bytes((trained / "cvae.keras").read_bytes())
    posteriors = Posteriors.of_training_cells(model, store)
    # Recognisable posteriors: every z_mean far out, so the decoded cells show where z came from.
    Posteriors(posteriors.cells, posteriors.z_mean + 50, posteriors.z_log_var).save(with_posteriors / "posteriors.npz")
    arguments = ["simulate", "--store", str(trained / "images.h5ad"), "--cells-per-type", "20", "--seed", "1"]
    assert main([*arguments, "--model", str(with_posteriors / "cvae.keras"), "--output", str(tmp_path / "a.h5ad")]) == 0
    assert main([*arguments, "--model", str(trained / "cvae.keras"), "--output", str(tmp_path / "b.h5ad")]) == 0
    assert (ad.read_h5ad(tmp_path / "a.h5ad").X != ad.read_h5ad(tmp_path / "b.h5ad").X).nnz > 0
    elsewhere = tmp_path / "elsewhere.npz"
    (with_posteriors / "posteriors.npz").rename(elsewhere)
    assert main([*arguments, "--model", str(with_posteriors / "cvae.keras"), "--posteriors", str(elsewhere),
                 "--output", str(tmp_path / "c.h5ad")]) == 0
    assert (ad.read_h5ad(tmp_path / "a.h5ad").X != ad.read_h5ad(tmp_path / "c.h5ad").X).nnz == 0
    assert main([*arguments, "--model", str(trained / "cvae.keras"), "--posteriors", str(tmp_path / "none.npz"),
                 "--output", str(tmp_path / "d.h5ad")]) == 2
    assert "none.npz: no such file" in capsys.readouterr().err


def test_bad_requests_are_clear_errors(trained, tmp_path, capsys):
    assert run(trained, "--output", str(tmp_path / "x.h5ad"), "--cell-type", "NK cells=3") == 2
    assert "unknown cell types ['NK cells']" in capsys.readouterr().err
    assert run(trained, "--output", str(tmp_path / "x.h5ad"), "--cell-type", "no number") == 2
    assert "expected NAME=NUMBER" in capsys.readouterr().err
    assert main(["simulate", "--model", str(tmp_path / "absent.keras"), "--store", str(trained / "images.h5ad"),
                 "--output", str(tmp_path / "x.h5ad")]) == 2
    assert "absent.keras: no such file" in capsys.readouterr().err
    # A suffix that names no format would have become a folder named cells.csv.
    assert run(trained, "--output", str(tmp_path / "cells.csv")) == 2
    assert "cells.csv: the output format follows the suffix" in capsys.readouterr().err
    assert run(trained, "--output", str(tmp_path / "x.h5ad"), "--cell-type", "B cell (memory) #2=0") == 2
    assert "no cells asked for" in capsys.readouterr().err
    for option in ("--cells", "--cells-per-type", "--batch-size"):
        with pytest.raises(SystemExit):
            run(trained, "--output", str(tmp_path / "x.h5ad"), option, "0")
        assert f"argument {option}: must be at least 1, not 0" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_store_the_model_was_not_trained_on_is_refused_naming_it(trained, tmp_path, capsys):
    cells = random_counts(60, 50, ["B", "T", "NK"], seed=3)
    cells.obs["cell_type"] = pd.Categorical(cells.obs["cell_type"])
    build_image_store(cells, None, "log1p_gene_max", 0.4, seed=0).write_h5ad(tmp_path / "other.h5ad")
    cells.write_h5ad(tmp_path / "filtered.h5ad")
    earlier = ad.read_h5ad(trained / "images.h5ad")
    del earlier.obs["total_counts"]  # a key that stores of earlier versions lack
    earlier.write_h5ad(tmp_path / "earlier.h5ad")
    for store, problem in [
        ("earlier.h5ad", "earlier.h5ad: an image store written by an earlier version of the workflow (no "
                         "obs['total_counts']); rerun it from the reshape rule (snakemake --forcerun reshape)"),
        ("other.h5ad", "other.h5ad: image side 8, cell types 3, but the model was trained on a store with "
                       "image side 8, cell types 4; give the images.h5ad it was trained on"),
        ("filtered.h5ad", "filtered.h5ad: not an image store written by the reshape rule (no var['pixel'], "
                          "var['scale'], obs['split'], obs['total_counts'], uns['image'])"),
    ]:
        assert main(["simulate", "--model", str(trained / "cvae.keras"), "--store", str(tmp_path / store),
                     "--output", str(tmp_path / "x.h5ad")]) == 2
        assert problem in capsys.readouterr().err
    assert not (tmp_path / "x.h5ad").exists()


def test_a_file_that_is_no_whole_model_or_store_is_refused_naming_it(trained, tmp_path, capsys):
    # Keras itself called a cut-off .keras file "not found".
    whole = (trained / "cvae.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "folder.keras").mkdir()
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:
        archive.writestr("config.json", "{}")
    for name, problem in [
        ("cut.keras", "cut.keras: a damaged or cut-off .keras file"),
        ("folder.keras", "folder.keras: a folder, not a trained model"),
        ("other.keras", "other.keras: a zip archive without model.weights.h5, so not a model saved by Keras"),
    ]:
        assert main(["simulate", "--model", str(tmp_path / name), "--store", str(trained / "images.h5ad"),
                     "--output", str(tmp_path / "x.h5ad")]) == 2
        assert problem in capsys.readouterr().err
        with pytest.raises(InputError, match=re.escape(problem)):  # the simulate rule's way in
            load_model(str(tmp_path / name))
    # h5py's own error for a store names no file.
    store = (trained / "images.h5ad").read_bytes()
    (tmp_path / "cut.h5ad").write_bytes(store[: len(store) // 2])
    with h5py.File(tmp_path / "matrix.h5", "w") as h5:  # HDF5, but no AnnData (as a 10x matrix is not)
        h5.create_group("matrix")
    for name, problem in [
        ("cut.h5ad", "cut.h5ad: not readable as an AnnData .h5ad file, as an image store is (Unable to "
                     "synchronously open file (truncated file"),
        ("cut.keras", "cut.keras: not readable as an AnnData .h5ad file, as an image store is"),
        ("matrix.h5", "matrix.h5: not readable as an AnnData .h5ad file, as an image store is (Unable to "
                      "synchronously open object (object 'obs' doesn't exist))"),
        ("folder.keras", "folder.keras: a folder, not an image store"),
    ]:
        assert main(["simulate", "--model", str(trained / "cvae.keras"), "--store", str(tmp_path / name),
                     "--output", str(tmp_path / "x.h5ad")]) == 2
        assert problem in capsys.readouterr().err
    (tmp_path / "history.tsv").write_text("epoch\tloss\n1\t3.5\n")
    for path in (tmp_path / "history.tsv", trained / "images.h5ad"):
        with pytest.raises(InputError, match=f"{path.name}: not a trained model"):
            load_model(str(path))
    assert not (tmp_path / "x.h5ad").exists()



def test_evaluate_scores_cells_from_the_command_line_as_the_rule_does(trained, tmp_path, capsys):
    cells = tmp_path / "cells.h5ad"
    assert run(trained, "--output", str(cells), "--cells-per-type", "15") == 0
    real, store = str(trained / "filtered.h5ad"), str(trained / "images.h5ad")
    scores = tmp_path / "scores"
    assert main(["evaluate", "--real", real, "--store", store, "--simulated", str(cells), "--output", str(scores),
                 "--seed", "2", "--repeats", "2", "--training-cells", "--max-cells-per-type", "40"]) == 0
    assert sorted(path.name for path in scores.iterdir()) == sorted(steps.EVALUATION_FILES.values())
    # The evaluate rule's step with the same settings writes the same tables.
    rule = {name: str(tmp_path / "rule" / file) for name, file in steps.EVALUATION_FILES.items()}
    steps.evaluate(real, store, str(cells), rule, {"repeats": 2, "training_cells": True, "max_cells_per_type": 40},
                   seed=2)
    for name in ("overall", "metrics", "json", "confusion"):
        assert (scores / steps.EVALUATION_FILES[name]).read_bytes() == Path(rule[name]).read_bytes(), name
    overall = pd.read_csv(scores / "overall.tsv", sep="\t", index_col="metric")
    assert list(overall.columns) == ["cvae", "nb", "poisson", "training_cells", "real_vs_real"]

    # Cells of another gene set or of unknown types are refused, naming the file.
    fewer_genes = ad.read_h5ad(cells)[:, :40].copy()
    fewer_genes.write_h5ad(tmp_path / "fewer_genes.h5ad")
    renamed = ad.read_h5ad(cells)
    renamed.obs["cell_type"] = "Platelet"
    renamed.write_h5ad(tmp_path / "renamed.h5ad")
    assert run(trained, "--output", str(tmp_path / "table.h5"), "--cells-per-type", "5") == 0
    (tmp_path / "images.h5ad").write_bytes((trained / "images.h5ad").read_bytes())  # scaled values, not counts
    capsys.readouterr()
    for simulated, message in [("fewer_genes.h5ad", "fewer_genes.h5ad: 10 of the 50 genes of"),
                               ("renamed.h5ad", "renamed.h5ad: cell types ['Platelet'] are not among those of"),
                               ("table.h5", "table.h5: not a readable .h5ad file ("),
                               ("images.h5ad", "images.h5ad: X holds non-integer values (e.g. "),
                               ("missing.h5ad", "missing.h5ad: no such file or folder")]:
        assert main(["evaluate", "--real", real, "--store", store, "--simulated", str(tmp_path / simulated),
                     "--output", str(tmp_path / f"{simulated}_scores")]) == 2
        assert message in capsys.readouterr().err, simulated
        assert not (tmp_path / f"{simulated}_scores" / "overall.tsv").exists()

def test_evaluate_scores_another_simulators_cells_as_it_scores_its_own(trained, tmp_path, capsys):
    """Cells as R simulators leave them: counts stored as doubles, genes in another order beside others, and
    the types in a column of another name."""
    cells = tmp_path / "cells.h5ad"
    assert run(trained, "--output", str(cells), "--cells-per-type", "15") == 0
    real, store = str(trained / "filtered.h5ad"), str(trained / "images.h5ad")
    own = ad.read_h5ad(cells)
    genes = np.random.default_rng(0).permutation(own.n_vars)
    other = ad.AnnData(np.hstack([own.X.toarray()[:, genes], np.ones((own.n_obs, 3))]).astype(np.float64),
                       obs=pd.DataFrame({"Group": own.obs["cell_type"].astype(str).to_numpy()}, index=own.obs_names),
                       var=pd.DataFrame(index=[*own.var_names[genes], "extra1", "extra2", "extra3"]))
    other.write_h5ad(tmp_path / "other.h5ad")
    common = ["--real", real, "--store", store, "--seed", "1", "--max-cells-per-type", "40"]
    assert main(["evaluate", *common, "--simulated", str(cells), "--output", str(tmp_path / "own_scores")]) == 0
    assert main(["evaluate", *common, "--simulated", str(tmp_path / "other.h5ad"), "--label-column", "Group",
                 "--output", str(tmp_path / "other_scores")]) == 0
    # Log-normalised values in X beside the counts in a layer, and expected counts (each off by less than 0.5).
    logged = other.copy()
    logged.layers["counts"] = other.X
    logged.X = np.log1p(other.X / other.X.sum(axis=1, keepdims=True) * 1e4)
    logged.write_h5ad(tmp_path / "logged.h5ad")
    expected = other.copy()
    expected.X = np.where(other.X > 0, other.X + np.random.default_rng(1).uniform(-0.4, 0.4, other.shape), 0)
    expected.write_h5ad(tmp_path / "expected.h5ad")
    for simulated, options in [("logged", ["--counts-layer", "counts"]), ("expected", ["--round-counts"])]:
        assert main(["evaluate", *common, "--simulated", str(tmp_path / f"{simulated}.h5ad"), "--label-column",
                     "Group", *options, "--output", str(tmp_path / f"{simulated}_scores")]) == 0
    for simulated in ("other", "logged", "expected"):
        for name in ("overall.tsv", "metrics.tsv", "metrics.json", "confusion.tsv"):
            assert ((tmp_path / "own_scores" / name).read_bytes()
                    == (tmp_path / f"{simulated}_scores" / name).read_bytes()), (simulated, name)
    # What cannot be scored so is refused, naming the file and the option that would read it.
    normalised = other.copy()
    normalised.X = normalised.X / normalised.X.sum(axis=1, keepdims=True)
    normalised.write_h5ad(tmp_path / "normalised.h5ad")
    other[:, 2:].copy().write_h5ad(tmp_path / "fewer.h5ad")
    capsys.readouterr()
    for simulated, label_column, message in [
        ("other.h5ad", "cell_type", "other.h5ad: obs has no label column 'cell_type'; its columns are 'Group' "
                                    "(the dataset's label_column, or evaluate's --label-column, names it)"),
        ("normalised.h5ad", "Group", "normalised.h5ad: X holds non-integer values (e.g. "),
        ("logged.h5ad", "Group", "logged.h5ad: X holds non-integer values (e.g. "),
        ("logged.h5ad", "Group", "'counts' of this file holds integer counts: name it as the dataset's counts_layer "
                                 "(or evaluate's --counts-layer)"),
        ("expected.h5ad", "Group", "the dataset's round_counts: true, or evaluate's --round-counts"),
        ("fewer.h5ad", "Group", f"fewer.h5ad: 2 of the 50 genes of {real} are missing (e.g. "
                                f"{own.var_names[genes[0]]!r}, {own.var_names[genes[1]]!r})"),
    ]:
        assert main(["evaluate", *common, "--simulated", str(tmp_path / simulated), "--label-column", label_column,
                     "--output", str(tmp_path / f"{simulated}_scores")]) == 2
        assert message in capsys.readouterr().err, simulated
        assert not (tmp_path / f"{simulated}_scores" / "overall.tsv").exists()


def test_evaluate_reads_simulated_cells_in_any_format_a_dataset_may_have(trained, tmp_path, capsys, caplog):
    """A 10x folder (cvaesim's own, typed by its cell_types.tsv) and a genes x cells table as R's write.csv
    leaves one, typed by a table of another column name, score as the same cells in an .h5ad do."""
    real, store = str(trained / "filtered.h5ad"), str(trained / "images.h5ad")
    assert run(trained, "--output", str(tmp_path / "cells.h5ad"), "--cells-per-type", "15") == 0
    assert run(trained, "--output", str(tmp_path / "tenx"), "--cells-per-type", "15") == 0
    own = ad.read_h5ad(tmp_path / "cells.h5ad")
    # R: write.csv(counts) (genes x cells, an empty first header) and write.csv(data.frame(Group = types)).
    pd.DataFrame(own.X.toarray().T, index=own.var_names, columns=own.obs_names).to_csv(
        tmp_path / "counts.csv", index_label="", quoting=csv.QUOTE_NONNUMERIC)
    pd.DataFrame({"Group": own.obs["cell_type"].astype(str).to_numpy()}, index=own.obs_names).to_csv(
        tmp_path / "groups.csv", index_label="", quoting=csv.QUOTE_NONNUMERIC)
    common = ["--real", real, "--store", store, "--seed", "1", "--max-cells-per-type", "40"]
    assert main(["evaluate", *common, "--simulated", str(tmp_path / "cells.h5ad"),
                 "--output", str(tmp_path / "h5ad_scores")]) == 0
    assert main(["evaluate", *common, "--simulated", str(tmp_path / "tenx"),
                 "--output", str(tmp_path / "tenx_scores")]) == 0
    assert main(["evaluate", *common, "--simulated", str(tmp_path / "counts.csv"), "--annotation",
                 str(tmp_path / "groups.csv"), "--label-column", "Group", "--output", str(tmp_path / "csv_scores")]) == 0
    for name in ("overall.tsv", "metrics.tsv", "metrics.json", "confusion.tsv"):
        expected = (tmp_path / "h5ad_scores" / name).read_bytes()
        assert (tmp_path / "tenx_scores" / name).read_bytes() == expected, name
        assert (tmp_path / "csv_scores" / name).read_bytes() == expected, name

    # Without types, or with types of other cells, refused naming what was given (not a packed copy).
    untyped = tmp_path / "untyped"
    shutil.copytree(tmp_path / "tenx", untyped)
    (untyped / "cell_types.tsv").unlink()
    pd.DataFrame({"barcode": [f"other_{i}" for i in range(own.n_obs)], "cell_type": "T cell"}).to_csv(
        tmp_path / "others.tsv", sep="\t", index=False)
    capsys.readouterr()
    for simulated, extra, message in [
        ("untyped", [], "untyped: a 10x_tarball matrix carries no cell types; give a table of them (--annotation)"),
        ("counts.csv", [], "counts.csv: a counts_table matrix carries no cell types"),
        ("untyped", ["--annotation", str(tmp_path / "others.tsv")], f"none of its {own.n_obs} labelled barcodes is in {untyped} "),
        ("counts.csv", ["--format", "h5ad"], "counts.csv: not a readable .h5ad file ("),
    ]:
        output = tmp_path / f"refused_{simulated}"
        assert main(["evaluate", *common, "--simulated", str(tmp_path / simulated), *extra,
                     "--output", str(output)]) == 2
        error = capsys.readouterr().err
        assert message in error and ".tar.gz" not in error, (simulated, error)
        assert not (output / "overall.tsv").exists()
    # A table that types some of the cells: the others are left out, saying so.
    pd.read_csv(tmp_path / "tenx" / "cell_types.tsv", sep="\t")[::2].to_csv(tmp_path / "half.tsv", sep="\t",
                                                                             index=False)
    with caplog.at_level("WARNING"):
        assert main(["evaluate", *common, "--simulated", str(untyped), "--annotation", str(tmp_path / "half.tsv"),
                     "--output", str(tmp_path / "half_scores")]) == 0
    assert f"{own.n_obs // 2} of {own.n_obs} cells in {untyped} have no label and are dropped" in caplog.text


def test_simulate_takes_the_threads_it_is_given_and_the_same_cells_come_out(trained, tmp_path):
    assert run(trained, "--output", str(tmp_path / "here.h5ad"), "--cells-per-type", "20") == 0
    limited = subprocess.run([sys.executable, "-m", "cvaesim.cli", "simulate", "--model", str(trained / "cvae.keras"),
                              "--store", str(trained / "images.h5ad"), "--output", str(tmp_path / "one.h5ad"),
                              "--cells-per-type", "20", "--threads", "1"], capture_output=True, text=True)
    assert limited.returncode == 0, limited.stderr
    assert "could not be limited" not in limited.stderr
    here, one = ad.read_h5ad(tmp_path / "here.h5ad"), ad.read_h5ad(tmp_path / "one.h5ad")
    assert (here.X != one.X).nnz == 0 and here.obs.equals(one.obs)


def test_help_and_refused_requests_come_without_loading_tensorflow(trained, tmp_path):
    # TensorFlow takes seconds to load; the command line loads it only to simulate.
    def run(arguments: list[str]) -> subprocess.CompletedProcess:
        script = ("import sys\nfrom cvaesim.cli import main\n"
                  f"try:\n    code = main({arguments!r})\nexcept SystemExit as exit:\n    code = exit.code\n"
                  "print(code, 'tensorflow' in sys.modules)\n")
        return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)

    (tmp_path / "m.keras").touch()
    (tmp_path / "s.h5ad").touch()
    paths = ["--model", "m.keras", "--store", "s.h5ad"]
    result = run(["simulate", "--help"])
    assert result.stdout.split()[-2:] == ["0", "False"] and "--cells-per-type" in result.stdout
    result = run(["evaluate", "--help"])
    assert result.stdout.split()[-2:] == ["0", "False"] and "--training-cells" in result.stdout
    result = run(["simulate", *paths, "--output", "o.h5ad", "--cells", "0"])
    assert result.stdout.split() == ["2", "False"] and "--cells: must be at least 1, not 0" in result.stderr
    result = run(["simulate", *paths, "--output", "cells.csv"])
    assert result.stdout.split() == ["2", "False"] and "'.csv' is none of them" in result.stderr
    result = run(["simulate", "--model", "absent.keras", "--store", "s.h5ad", "--output", "o.h5ad"])
    assert result.stdout.split() == ["2", "False"] and "absent.keras: no such file" in result.stderr
    result = run(["simulate", *paths, "--output", "o.h5ad"])
    assert result.stdout.split() == ["2", "False"] and "m.keras: not a trained model" in result.stderr
    # A cell type the model does not know, or a table too large, is told before the model loads.
    model = ["--model", str(trained / "cvae.keras"), "--store", str(trained / "images.h5ad")]
    result = run(["simulate", *model, "--output", "o.h5ad", "--cell-type", "Platelet=5"])
    assert result.stdout.split() == ["2", "False"] and "--cell-type: unknown cell types ['Platelet']" in result.stderr
    result = run(["simulate", *model, "--output", "o.h5", "--cells-per-type", "2000000"])
    assert result.stdout.split() == ["2", "False"] and "too large for the original's dense table" in result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["m.keras", "s.h5ad"]
