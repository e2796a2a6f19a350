import warnings
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cvaesim.evaluation import (CONTROL, METRICS, TRAINING, EvaluationSettings, Space, baseline, evaluate, forest_auc,
                                mmd, overall_table, properties, repeat_seeds, training_sample)
from cvaesim.plots import plot_per_type

from conftest import random_counts

TYPES = ["T cell", "B cell", "CD14+ Monocyte"]


def test_mmd_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(300, 5)), rng.normal(size=(300, 5))
    bandwidths = np.array([0.5, 1, 2, 4]) * 3.0
    same, shifted = mmd(x, y, bandwidths), mmd(x, y + 1.0, bandwidths)
    assert abs(same) < 0.01 and shifted > 10 * abs(same)


def test_forest_auc_is_half_for_one_distribution_and_one_for_disjoint():
    rng = np.random.default_rng(1)
    settings = EvaluationSettings(n_trees=50)
    assert abs(forest_auc(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)), settings) - 0.5) < 0.1
    assert forest_auc(rng.normal(size=(200, 4)), rng.normal(size=(200, 4)) + 5, settings) > 0.99


def test_forest_auc_of_four_cells_a_side_uses_four_folds_without_warnings():
    # evaluate.min_cells allows 4 cells: 5 stratified folds would leave a fold without a real cell.
    rng = np.random.default_rng(0)
    settings = EvaluationSettings(n_trees=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert forest_auc(rng.normal(size=(4, 3)), rng.normal(size=(30, 3)) + 10, settings) == 1.0


def test_the_pca_space_keeps_the_real_cells_mix_of_types_whatever_was_simulated():
    """A type simulated far beyond its real share must not take the components over."""
    rng = np.random.default_rng(3)
    real = np.zeros((100, 4))
    real[:90, 0] = rng.normal(size=90)  # the common type varies along gene 0
    real[90:, 1] = rng.normal(size=10)  # the rare one along gene 1
    simulated = np.zeros((1000, 4))
    simulated[:100, 0] = rng.normal(size=100)
    simulated[100:, 1] = 5 * rng.normal(size=900)  # 900 cells of the rare type, and more spread
    labels = np.array(["common"] * 90 + ["rare"] * 10)
    simulated_labels = np.array(["common"] * 100 + ["rare"] * 900)
    space = Space(sp.csr_matrix(real), labels, sp.csr_matrix(simulated), simulated_labels, 2, seed=0)
    assert space.pca.n_samples_ == 200  # 90 + 10 of each side
    assert np.argmax(np.abs(space.pca.components_[0])) == 0
    # With no type in common, as many cells of each side.
    elsewhere = Space(sp.csr_matrix(real), labels, sp.csr_matrix(simulated), np.array(["other"] * 1000), 2, seed=0)
    assert elsewhere.pca.n_samples_ == 200


def test_cells_of_the_real_distribution_score_as_real_however_few_the_test_cells():
    # 12 real test cells against 340 "simulated" cells drawn from the same distribution. Scoring
    # every simulated cell in a space fitted on all 12 test cells and only 12 simulated ones let
    # the forest tell fitted from unfitted cells: AUC 0.96, MMD 0.18, memorisation ratio 0.52.
    cells = random_counts(400, 200, ["T cell"], seed=3)
    real, simulated = cells[:60].copy(), cells[60:].copy()
    simulated.obs_names = [f"sim_{i}" for i in range(simulated.n_obs)]
    result = evaluate(real, np.arange(60) < 12, simulated, EvaluationSettings(n_trees=100, n_components=30))
    model = overall_table(result.metrics)["cvae"]
    assert model["rf_auc"] < 0.65 and model["mmd"] < 0.06 and 0.8 < model["memorisation_ratio"] < 1.25


def test_baselines_follow_type_profiles_and_library_sizes():
    cells = random_counts(600, 40, TYPES, seed=2)
    labels = cells.obs["cell_type"].to_numpy()
    for kind in ("poisson", "nb"):
        simulated = baseline(cells.X, labels, {"T cell": 400, "B cell": 5}, kind, seed=0)
        assert simulated.shape == (405, 40) and simulated.X.dtype == np.int32
        real_t = cells.X[labels == "T cell"].toarray()
        sim_t = simulated.X[:400].toarray()
        assert np.corrcoef(real_t.mean(axis=0), sim_t.mean(axis=0))[0, 1] > 0.95
        assert abs(sim_t.sum(axis=1).mean() / real_t.sum(axis=1).mean() - 1) < 0.1
    # The negative binomial keeps the overdispersion a Poisson loses.
    nb = baseline(cells.X, labels, {"T cell": 2000}, "nb", seed=0).X.toarray()
    poisson = baseline(cells.X, labels, {"T cell": 2000}, "poisson", seed=0).X.toarray()
    assert nb.var(axis=0).sum() > 1.3 * poisson.var(axis=0).sum()
    # ... and matches the real cells' per-gene variance, which the fit by moments aims at.
    real_t = cells.X[labels == "T cell"].toarray()
    expressed = real_t.mean(axis=0) > 1
    assert 0.8 < np.median(nb.var(axis=0)[expressed] / real_t.var(axis=0)[expressed]) < 1.25
    assert np.median(poisson.var(axis=0)[expressed] / real_t.var(axis=0)[expressed]) < 0.8


def test_properties_of_a_known_matrix():
    counts = sp.csr_matrix(np.array([[0, 2, 0, 2], [1, 0, 0, 0]]))
    found = properties(counts)
    assert found["library_size"].tolist() == [4, 1]
    assert found["detected_genes"].tolist() == [2, 1]
    assert found["cell_fraction_zeros"].tolist() == [0.5, 0.75]
    assert found["gene_fraction_zeros"].tolist() == [0.5, 0.5, 1.0, 0.5]


@pytest.fixture(scope="module")
def scored():
    real = random_counts(900, 60, TYPES, seed=3)
    is_test = np.random.default_rng(0).random(900) < 0.4
    copies = real[~is_test][:300].copy()  # a "simulator" that hands back training cells
    copies.obs_names = [f"copy_{i}" for i in range(copies.n_obs)]
    settings = EvaluationSettings(n_trees=30, n_components=10, n_markers=5, training_cells=True)
    return real, is_test, copies, settings, evaluate(real, is_test, copies, settings)


def test_datasets_overall_tables_are_compared_metric_by_metric(scored, tmp_path, monkeypatch):
    from cvaesim import InputError
    from cvaesim.steps import compare_datasets

    metrics = scored[-1].metrics
    with_floor = overall_table(metrics).reset_index()
    without_floor = overall_table(metrics[metrics["source"] != TRAINING]).reset_index()
    without_floor[["cvae", "nb"]] += 1  # another dataset's scores
    paths = []
    for name, table in (("a.tsv", without_floor), ("b.tsv", with_floor)):
        table.to_csv(tmp_path / name, sep="\t", index=False, float_format="%.6g")
        paths.append(str(tmp_path / name))
    monkeypatch.setattr("cvaesim.plots.plt.close", lambda figure: None)  # keep the figure to read its axes
    compare_datasets(paths, ["zeta", "alpha"], {"table": str(tmp_path / "compared.tsv"),
                                                "figure": str(tmp_path / "compared.png")})
    axes = plt.gcf().axes
    shown = [tick.get_text() for tick in axes[-1].get_xticklabels()]
    sources = axes[0].get_legend_handles_labels()[1]
    plt.close("all")
    assert shown == ["zeta", "alpha"] and sources == ["cvae", "nb", "poisson", CONTROL, TRAINING]
    assert (tmp_path / "compared.png").stat().st_size > 10_000
    compared = pd.read_csv(tmp_path / "compared.tsv", sep="\t")
    assert list(compared.columns) == ["metric", "dataset", "cvae", "nb", "poisson", TRAINING, CONTROL]
    assert list(compared["metric"]) == [metric for metric in sorted(METRICS) for _ in range(2)]
    assert list(compared["dataset"]) == ["zeta", "alpha"] * len(METRICS)  # in the order given, not sorted
    for name, table in (("zeta", without_floor), ("alpha", with_floor)):
        rows = compared[compared["dataset"] == name].set_index("metric")
        assert np.allclose(rows["cvae"], table.set_index("metric")["cvae"], rtol=1e-5, equal_nan=True), name
    assert compared.loc[compared["dataset"] == "zeta", TRAINING].isna().all()
    assert compared.loc[compared["dataset"] == "alpha", TRAINING].notna().any()

    metrics.to_csv(tmp_path / "metrics.tsv", sep="\t", index=False)  # the per-type table, not the overall one
    with pytest.raises(InputError, match=r"metrics.tsv: not an overall realism table \(columns source, cell_type"):
        compare_datasets([paths[0], str(tmp_path / "metrics.tsv")], ["zeta", "alpha"],
                         {"table": str(tmp_path / "bad.tsv"), "figure": str(tmp_path / "bad.png")})
    assert not (tmp_path / "bad.tsv").exists() and not (tmp_path / "bad.png").exists()

def test_evaluation_scores_every_source_type_and_metric(scored):
    real, is_test, copies, settings, result = scored
    metrics = result.metrics
    assert set(metrics["source"]) == {"cvae", "poisson", "nb", TRAINING, CONTROL}
    assert set(metrics["cell_type"]) == {*TYPES, "overall"}
    assert set(metrics["metric"]) == set(METRICS)
    overall = overall_table(metrics)
    assert list(overall.columns) == ["cvae", "nb", "poisson", TRAINING, CONTROL]
    for metric in ("rf_auc", "mmd", "fidelity_accuracy", "marker_correlation", "marker_overlap", "memorisation_ratio",
                   "ks_library_size", "ks_gene_mean_log2cpm"):
        assert overall.loc[metric].notna().all(), metric
    assert abs(overall.loc["rf_auc", CONTROL] - 0.5) < 0.15
    # Copies of training cells sit on training cells: the memorisation ratio says so.
    assert overall.loc["memorisation_ratio", "cvae"] < 0.2 < overall.loc["memorisation_ratio", CONTROL]
    assert overall.loc["memorisation_ratio", TRAINING] == 0.0  # each is its own nearest training cell
    confusion = result.confusion
    assert confusion[confusion["source"] == "cvae"]["cells"].sum() == copies.n_obs
    # The cells behind each type's scores, for the report.
    labels = real.obs["cell_type"].astype(str)
    assert result.cells["training"].to_dict() == labels[~is_test].value_counts().to_dict()
    assert result.cells["test"].to_dict() == labels[is_test].value_counts().to_dict()
    assert result.cells["simulated"].to_dict() == copies.obs["cell_type"].astype(str).value_counts().to_dict()



def test_cell_types_are_scored_listed_and_plotted_in_the_data_order(tmp_path, monkeypatch):
    real = random_counts(300, 30, TYPES, seed=7)
    real.obs["cell_type"] = pd.Categorical(real.obs["cell_type"], categories=TYPES)  # not alphabetical
    is_test = np.arange(300) % 2 == 0
    simulated = real[~is_test].copy()
    simulated.obs_names = [f"sim_{i}" for i in range(simulated.n_obs)]
    result = evaluate(real, is_test, simulated, EvaluationSettings(n_trees=10, n_components=5, n_markers=5))
    assert list(result.cells.index) == TYPES
    per_type = result.metrics[result.metrics["cell_type"] != "overall"]
    assert list(dict.fromkeys(per_type["cell_type"])) == TYPES
    assert list(dict.fromkeys(result.confusion["conditioned_type"])) == TYPES
    monkeypatch.setattr("cvaesim.plots.plt.close", lambda figure: None)  # keep the figure to read its axis
    plot_per_type(result.metrics, tmp_path / "per_type.png", result.cells)
    shown = [tick.get_text().split("\n")[0] for tick in plt.gcf().axes[-1].get_xticklabels()]
    plt.close("all")
    assert shown == TYPES

def test_too_few_cells_to_score_any_type_give_nan_metrics_and_say_why(tmp_path, caplog):
    # A first try on a small subset: no type has evaluate.min_cells test cells.
    real = random_counts(40, 30, TYPES, seed=5)
    is_test = np.arange(40) % 3 == 0
    simulated = real[~is_test].copy()
    simulated.obs_names = [f"sim_{i}" for i in range(simulated.n_obs)]
    settings = EvaluationSettings(n_trees=10, n_components=5, n_markers=5)
    with caplog.at_level("WARNING"):
        result = evaluate(real, is_test, simulated, settings)
    assert "all of 3 cell types get no score: fewer than evaluate.min_cells = 10" in caplog.text
    assert "every metric is NaN" in caplog.text
    overall = overall_table(result.metrics)
    assert list(overall.index) == sorted(METRICS) and list(overall.columns) == ["cvae", "nb", "poisson", CONTROL]
    assert overall.isna().all().all()
    plot_per_type(result.metrics, tmp_path / "per_type.png", result.cells)
    assert (tmp_path / "per_type.png").stat().st_size > 0
    # With a lower threshold the same cells are scored.
    lower = evaluate(real, is_test, simulated, EvaluationSettings(**{**settings.__dict__, "min_cells": 4}))
    assert overall_table(lower.metrics).loc[["mmd", "rf_auc"], "cvae"].notna().all()


def test_a_type_with_no_test_cell_is_named_unscored_and_kept_in_the_confusion_matrix(caplog):
    # A type of one or two cells lands wholly in the training split, yet it is trained on and simulated.
    real = random_counts(300, 30, TYPES, seed=6)
    labels = real.obs["cell_type"].astype(str).to_numpy()
    is_test = np.arange(300) % 2 == 0
    rare = np.flatnonzero((labels == "B cell") & ~is_test)[:2]
    labels[(labels == "B cell")] = "T cell"
    labels[rare] = "Rare cell"
    real.obs["cell_type"] = labels
    simulated = real[~is_test].copy()
    simulated.obs_names = [f"sim_{i}" for i in range(simulated.n_obs)]
    with caplog.at_level("WARNING"):
        result = evaluate(real, is_test, simulated, EvaluationSettings(n_trees=10, n_components=5, n_markers=5))
    assert "1 of 3 cell types get no score" in caplog.text
    assert "Rare cell: 0 test and 2 simulated" in caplog.text
    confusion = result.confusion[result.confusion["source"] == "cvae"]
    assert confusion["cells"].sum() == simulated.n_obs
    assert "Rare cell" in set(confusion["conditioned_type"]) and "Rare cell" in set(confusion["predicted_type"])
    assert set(result.metrics.loc[result.metrics["cell_type"] != "overall", "cell_type"]) == {"T cell",
                                                                                             "CD14+ Monocyte"}


def test_one_cell_type_leaves_fidelity_and_markers_undefined_and_says_so(caplog):
    real = random_counts(60, 30, ["T cell"], seed=2)
    is_test = np.arange(60) % 2 == 0
    simulated = real[~is_test].copy()
    simulated.obs_names = [f"sim_{i}" for i in range(simulated.n_obs)]
    with warnings.catch_warnings(), caplog.at_level("WARNING"):
        warnings.simplefilter("error")  # scikit-learn's "A single label was found" among them
        warnings.simplefilter("ignore", DeprecationWarning)  # anndata 0.13's own, under pandas 3
        result = evaluate(real, is_test, simulated, EvaluationSettings(n_trees=10, n_components=5, n_markers=5))
    assert "one cell type in the training cells: cell-type fidelity and marker agreement are not defined" in caplog.text
    overall = overall_table(result.metrics)
    assert overall.loc[["fidelity_accuracy", "marker_correlation", "marker_overlap"]].isna().all().all()
    assert overall.loc[["rf_auc", "mmd", "ks_library_size"], "cvae"].notna().all()


def test_training_cells_are_sampled_per_type_without_repeats():
    cells = random_counts(200, 20, TYPES, seed=4)
    labels = cells.obs["cell_type"].to_numpy()
    available = {name: int((labels == name).sum()) for name in TYPES}
    plan = {TYPES[0]: 10, TYPES[1]: available[TYPES[1]] + 50}  # more than the type has: all of them
    # A first column holding each cell's row number tells which cells were copied.
    numbered = sp.hstack([sp.csr_matrix(np.arange(len(labels))[:, None]), sp.csr_matrix(cells.X)], format="csr")
    copies = training_sample(numbered, labels, plan, seed=0)
    assert copies.obs["cell_type"].value_counts().to_dict() == {TYPES[0]: 10, TYPES[1]: available[TYPES[1]]}
    rows = copies.X[:, 0].toarray().ravel()
    assert (copies.X != numbered[rows]).nnz == 0
    assert (labels[rows] == copies.obs["cell_type"].to_numpy()).all()
    assert len(set(rows)) == len(rows)


def test_training_cells_are_scored_last_and_leave_the_other_sources_unchanged(scored):
    real, is_test, copies, settings, result = scored
    without = evaluate(real, is_test, copies, EvaluationSettings(**{**settings.__dict__, "training_cells": False}))
    assert TRAINING not in set(without.metrics["source"])
    kept = result.metrics[result.metrics["source"] != TRAINING].reset_index(drop=True)
    pd.testing.assert_frame_equal(kept, without.metrics)


def test_evaluation_is_deterministic_for_a_seed(scored):
    real, is_test, copies, settings, result = scored
    again = evaluate(real, is_test, copies, settings)
    pd.testing.assert_frame_equal(result.metrics, again.metrics)


def test_forests_fitted_in_worker_processes_give_the_same_metrics(scored):
    real, is_test, copies, settings, result = scored
    assert settings.n_jobs == 1  # every forest fitted in this process
    beside = evaluate(real, is_test, copies, EvaluationSettings(**{**settings.__dict__, "n_jobs": 3}))
    pd.testing.assert_frame_equal(result.metrics, beside.metrics)


def test_repeats_average_the_matched_scores_over_samples_each_scored_as_one_evaluation_at_its_seed():
    # About 50 test cells of each type against 100 "simulated" ones of the same distribution: each matched sample
    # takes other simulated cells.
    cells = random_counts(700, 40, TYPES, seed=4)
    real, simulated = cells[:400].copy(), cells[400:].copy()
    is_test = np.random.default_rng(1).random(400) < 0.4
    simulated.obs_names = [f"sim_{i}" for i in range(simulated.n_obs)]
    settings = EvaluationSettings(n_trees=20, n_components=8, n_markers=5, repeats=3)
    seeds = repeat_seeds(settings)
    assert seeds[0] == settings.seed and len(set(seeds)) == 3
    averaged = evaluate(real, is_test, simulated, settings).metrics
    singles = [evaluate(real, is_test, simulated, replace(settings, repeats=1, seed=seed)).metrics for seed in seeds]
    repeated = ["rf_auc", "mmd", "memorisation_ratio"]
    for metric in repeated:
        def values(metrics):
            chosen = metrics[(metrics["source"] == "cvae") & (metrics["metric"] == metric)]
            return chosen.set_index("cell_type")["value"].drop("overall")
        each = pd.concat([values(single) for single in singles], axis=1)
        assert (each.nunique(axis=1) == 3).all(), metric  # three different samples of the simulated cells
        np.testing.assert_allclose(values(averaged), each.mean(axis=1), rtol=1e-12, err_msg=metric)
    # Everything else is the evaluation's own seed's: as a single evaluation scores it.
    others = ~averaged["metric"].isin(repeated)
    pd.testing.assert_frame_equal(averaged[others].reset_index(drop=True),
                                  singles[0][~singles[0]["metric"].isin(repeated)].reset_index(drop=True))


def test_the_control_draws_new_halves_of_each_type_for_each_further_repeat(monkeypatch):
    import cvaesim.evaluation as evaluation

    cells = random_counts(300, 30, TYPES, seed=5)
    real, simulated = cells[:200].copy(), cells[200:].copy()
    simulated.obs_names = [f"sim_{i}" for i in range(simulated.n_obs)]
    is_test = np.random.default_rng(2).random(200) < 0.5
    fitted = []  # each space's (real side, its labels, compared side, its labels)

    class RecordingSpace(Space):
        def __init__(self, real_side, real_labels, compared_side, compared_labels, *rest):
            fitted.append((real_side, real_labels, compared_side, compared_labels))
            super().__init__(real_side, real_labels, compared_side, compared_labels, *rest)

    monkeypatch.setattr(evaluation, "Space", RecordingSpace)

    def control_sides(repeats):
        fitted.clear()
        evaluate(real, is_test, simulated, EvaluationSettings(n_trees=10, n_components=8, n_markers=5, repeats=repeats))
        # The control's spaces are the ones fitted on fewer real cells than there are test cells.
        return [entry for entry in fitted if entry[0].shape[0] < is_test.sum()]

    (single,), repeated = control_sides(1), control_sides(3)
    assert len(repeated) == 3
    assert all((first != second).nnz == 0 for first, second in zip(single[::2], repeated[0][::2]))  # as one repeat
    for later in repeated[1:]:
        for name in TYPES:  # half of each type on either side
            assert abs((later[1] == name).sum() - (later[3] == name).sum()) <= 1
    compared = [entry[2] for entry in repeated]
    assert all(a.shape != b.shape or (a != b).nnz > 0 for i, a in enumerate(compared) for b in compared[i + 1:])
