"""How realistic simulated cells are: the field's measures, per cell type and overall.

Simulated cells are compared with the held-out real **test** cells (never the training
cells) on log1p(CP10k) data projected on principal components fitted, for each comparison,
on both compared sides in equal numbers of each cell type: components fitted on one side only follow that
side's own noise and make the two sides look more different than they are.
Every measure comes with its real-versus-real control (two random halves of the test
cells), and two naive per-type baselines are scored beside the model: counts drawn
independently per gene from a Poisson, or from a negative binomial fitted by moments,
around the mean profile of the type's training cells, with library sizes resampled from them.
A sample of the training cells themselves is scored too (``training_cells``): what handing back
the training data scores, i.e. the best any simulator fitted on them can reach against these test
cells on each distance (the real-versus-real halves are smaller, so their distances are larger).
With ``repeats``, the scores of the matched cells (forest AUC, MMD, memorisation) are averaged over as
many matched samples, each with its own space and forest: a type with few test cells is otherwise scored
on one small sample of its simulated cells, and its score moves with that sample. The control's halves
are drawn again for each further sample, so that its scores are averaged over as many draws as the others.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import NamedTuple

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
from joblib.externals.loky import get_reusable_executor
from scipy.stats import ks_2samp, pearsonr
from sklearn.decomposition import PCA
from sklearn.ensemble import RandomForestClassifier
from sklearn.metrics import confusion_matrix, roc_auc_score
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.neighbors import KNeighborsClassifier, NearestNeighbors

from .counts import draw_counts
from .images import log_normalise

log = logging.getLogger(__name__)

CONTROL = "real_vs_real"
TRAINING = "training_cells"
SOURCES = ("cvae", "nb", "poisson", TRAINING, CONTROL)  # the overall tables' column order
MAX_PCA_GENES = 2_000
BASELINE_BLOCK = 256  # cells drawn at a time by the baselines
PROPERTIES = ["library_size", "detected_genes", "cell_fraction_zeros", "gene_mean_log2cpm", "gene_variance_log2cpm",
              "gene_fraction_zeros"]
METRICS = ("rf_auc", "mmd", "fidelity_accuracy", "marker_correlation", "marker_overlap",
           *(f"ks_{name}" for name in PROPERTIES), "memorisation_ratio")


@dataclass(frozen=True)
class EvaluationSettings:
    max_cells_per_type: int = 250  # per side and type (as many on each): forest, MMD, memorisation; markers
    n_components: int = 30
    n_trees: int = 100
    n_markers: int = 20
    min_cells: int = 10  # types with fewer real test cells get no per-type score
    seed: int = 0
    n_jobs: int = 1  # cores: the scoring and n_jobs - 1 processes fitting forests beside it
    training_cells: bool = False  # score a sample of the training cells too (one more source's time)
    # Matched samples (each with its own PCA, forest and folds) that the forest AUC, MMD and memorisation ratio
    # are averaged over: with a few dozen test cells of a type, one sample's scores move with the seed.
    repeats: int = 1


def repeat_seeds(settings: EvaluationSettings) -> list[int]:
    """The seed of each matched sample: the first is the evaluation's own, so one repeat scores as before."""
    further = np.random.SeedSequence([settings.seed, 1]).generate_state(settings.repeats - 1)
    return [settings.seed, *(int(seed) for seed in further)]


def stratified_half(labels: np.ndarray, seed: int) -> np.ndarray:
    """A random half of each type's cells (an odd one on either side at random), for the control's further
    repeats: each side then holds at least as many of a type as the first repeat's smaller side, so every type
    scored there is scored in every repeat."""
    rng = np.random.default_rng(seed)
    half = np.zeros(len(labels), dtype=bool)
    for name in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == name))
        half[members[:(len(members) + rng.integers(2)) // 2]] = True
    return half


def baseline(counts: sp.csr_matrix, labels: np.ndarray, plan: dict[str, int], kind: str, seed: int) -> ad.AnnData:
    """Naive per-type simulator: independent genes around the type's mean profile, resampled libraries."""
    rng = np.random.default_rng(seed)
    blocks, names = [], []
    for cell_type, n_cells in plan.items():
        of_type = counts[labels == cell_type].astype(np.float64)
        libraries = np.asarray(of_type.sum(axis=1)).ravel()
        drawn_libraries = rng.choice(libraries, size=n_cells)
        profile = np.asarray(of_type.sum(axis=0)).ravel() / max(libraries.sum(), 1)
        dispersion = None
        if kind == "nb":
            # Size r from the moments of the type's counts: var = mu + mu^2 / r; Poisson where var <= mu.
            mu = np.asarray(of_type.mean(axis=0)).ravel()
            excess = np.asarray(of_type.multiply(of_type).mean(axis=0)).ravel() - mu**2 - mu
            dispersion = np.full(len(mu), np.inf)
            overdispersed = (excess > 1e-12) & (profile > 0)
            dispersion[overdispersed] = mu[overdispersed] ** 2 / excess[overdispersed]
        # Sparse draws a block at a time: PBMC68k-size plans would not fit as dense arrays.
        for start in range(0, n_cells, BASELINE_BLOCK):
            totals = drawn_libraries[start:start + BASELINE_BLOCK]
            profiles = np.broadcast_to(profile, (len(totals), len(profile)))
            blocks.append(draw_counts(profiles, totals, "negative_binomial" if kind == "nb" else "poisson", rng,
                                      dispersion))
        names.extend([cell_type] * n_cells)
    return ad.AnnData(X=sp.vstack(blocks, format="csr"),
                      obs=pd.DataFrame({"cell_type": names}, index=[f"{kind}_{i}" for i in range(len(names))]))


def training_sample(counts: sp.csr_matrix, labels: np.ndarray, plan: dict[str, int], seed: int) -> ad.AnnData:
    """Training cells standing in for a simulator: ``plan[type]`` of each type (all, where it has fewer),
    drawn without replacement: repeated cells would be told apart by the forest as copies."""
    rng = np.random.default_rng(seed)
    chosen = []
    for cell_type, n_cells in plan.items():
        members = np.flatnonzero(labels == cell_type)
        chosen.append(rng.choice(members, size=min(n_cells, len(members)), replace=False))
    rows = np.concatenate(chosen)
    return ad.AnnData(X=counts[rows], obs=pd.DataFrame({"cell_type": labels[rows]},
                                                       index=[f"{TRAINING}_{i}" for i in range(len(rows))]))


def mmd(x: np.ndarray, y: np.ndarray, bandwidths: np.ndarray) -> float:
    """Unbiased squared MMD with a sum of RBF kernels, one bandwidth set for every block."""
    def kernel(a, b):
        distances = (a**2).sum(1)[:, None] + (b**2).sum(1)[None, :] - 2 * a @ b.T
        return sum(np.exp(-np.maximum(distances, 0) / (2 * h**2)) for h in bandwidths)

    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    n, m = len(x), len(y)
    return float((kxx.sum() - np.trace(kxx)) / (n * (n - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def forest_auc(real: np.ndarray, simulated: np.ndarray, settings: EvaluationSettings) -> float:
    """Cross-validated AUC of a random forest telling real from simulated cells (0.5: indistinguishable)."""
    features = np.vstack([real, simulated])
    target = np.r_[np.zeros(len(real)), np.ones(len(simulated))]
    # Unshuffled folds bias the AUC; fewer than 5 folds only where a side has fewer than 5 cells
    # (evaluate.min_cells allows 4), so that every fold holds cells of both sides.
    folds = StratifiedKFold(n_splits=min(5, len(real), len(simulated)), shuffle=True, random_state=settings.seed)
    forest = RandomForestClassifier(n_estimators=settings.n_trees, random_state=settings.seed)
    scores = cross_val_predict(forest, features, target, cv=folds, method="predict_proba")[:, 1]
    return float(roc_auc_score(target, scores))


class Forests:
    """Real-vs-simulated forests, fitted while the scoring goes on: forests of small trees spend most
    of their time in Python, so ``n_jobs - 1`` worker processes fit them (the scoring keeps the last
    core), and those not yet started when the scoring ends are fitted here. Each forest is seeded, so
    the AUCs do not depend on where it was fitted."""

    def __init__(self, settings: EvaluationSettings):
        self.settings = settings
        self.workers = get_reusable_executor(max_workers=settings.n_jobs - 1) if settings.n_jobs > 1 else None
        self.pending = []  # (key, future or None, real, simulated, settings)

    def add(self, key, real: np.ndarray, simulated: np.ndarray, seed: int) -> None:
        """A forest and its folds seeded by ``seed`` (each repeat's own)."""
        settings = replace(self.settings, seed=seed)
        future = self.workers.submit(forest_auc, real, simulated, settings) if self.workers else None
        self.pending.append((key, future, real, simulated, settings))

    def aucs(self) -> list[tuple]:
        """(key, AUC) of every forest, in the order added."""
        fitted_here = {}
        # The workers take the forests from the front of the queue, this process from the back,
        # until it meets one that a worker has started.
        for index in reversed(range(len(self.pending))):
            _, future, real, simulated, settings = self.pending[index]
            if future is not None and not future.cancel():
                break
            fitted_here[index] = forest_auc(real, simulated, settings)
        return [(key, fitted_here[index] if index in fitted_here else future.result())
                for index, (key, future, *_) in enumerate(self.pending)]


def subsample(n: int, limit: int, rng: np.random.Generator) -> np.ndarray:
    return np.sort(rng.choice(n, size=limit, replace=False)) if n > limit else np.arange(n)


def properties(counts: sp.csr_matrix) -> dict[str, np.ndarray]:
    """SimBench's per-cell and per-gene data properties."""
    counts = sp.csr_matrix(counts)
    n_cells, n_genes = counts.shape
    detected = np.diff(counts.indptr)
    cpm = sp.csr_matrix(sp.diags(1e6 / np.maximum(np.asarray(counts.sum(axis=1)).ravel(), 1)) @ counts)
    cpm.data = np.log2(cpm.data + 1)
    mean = np.asarray(cpm.mean(axis=0)).ravel()
    return {
        "library_size": np.asarray(counts.sum(axis=1)).ravel(),
        "detected_genes": detected,
        "cell_fraction_zeros": 1 - detected / n_genes,
        "gene_mean_log2cpm": mean,
        "gene_variance_log2cpm": np.asarray(cpm.multiply(cpm).mean(axis=0)).ravel() - mean**2,
        "gene_fraction_zeros": 1 - np.bincount(counts.indices, minlength=n_genes) / max(n_cells, 1),
    }


def top_markers(view: ad.AnnData, n_markers: int, max_cells_per_type: int, seed: int) -> dict[str, list[str]]:
    """Each type's top Wilcoxon markers against the rest, ranked once for every type, on at most
    ``max_cells_per_type`` cells of each type (so that PBMC68k's 27,000 test cells stay quick)."""
    from .qc import wilcoxon_markers

    rng = np.random.default_rng(seed)
    labels = view.obs["cell_type"].to_numpy()
    types, sizes = np.unique(labels, return_counts=True)
    groups = [name for name, size in zip(types, sizes) if size >= 2]
    if len(types) < 2 or not groups:
        return {}
    keep = np.concatenate([members[subsample(len(members), max_cells_per_type, rng)]
                           for members in (np.flatnonzero(labels == name) for name in types)])
    ranked = view[np.sort(keep)].copy()
    names = wilcoxon_markers(ranked, groups, n_markers)
    return {name: list(names[name]) for name in groups}


def marker_scores(real: ad.AnnData, simulated: ad.AnnData, real_tops: dict, simulated_tops: dict,
                  cell_type: str) -> dict[str, float]:
    """Correlation of mean expression over the real top markers, and the overlap of top markers."""
    if cell_type not in real_tops or cell_type not in simulated_tops:
        return {}
    genes = real_tops[cell_type]
    real_mean = np.asarray(real[real.obs["cell_type"] == cell_type][:, genes].X.mean(axis=0)).ravel()
    sim_mean = np.asarray(simulated[simulated.obs["cell_type"] == cell_type][:, genes].X.mean(axis=0)).ravel()
    correlation = pearsonr(real_mean, sim_mean).statistic if np.std(sim_mean) > 0 else np.nan
    return {"marker_correlation": float(correlation),
            "marker_overlap": len(set(genes) & set(simulated_tops[cell_type])) / len(genes)}


def labelled_view(normalised: sp.csr_matrix, labels: np.ndarray, genes: pd.Index) -> ad.AnnData:
    """Log-normalised cells with their types, for marker ranking."""
    return ad.AnnData(X=normalised, var=pd.DataFrame(index=genes),
                      # categorical already: anndata would convert it, logging "storing 'cell_type' as categorical"
                      obs=pd.DataFrame({"cell_type": pd.Categorical(labels)}, index=[str(i) for i in range(len(labels))]))


class Space:
    """PCA of log1p(CP10k) fitted on the cells to be scored: of each cell type as many real as
    compared cells (at most ``max_per_type``, and 5,000 on each side in all), on the ``MAX_PCA_GENES``
    genes most variable among them (all genes of a smaller panel); takes normalised cells.
    ``rows[type]`` holds the (real, compared) rows it was fitted on, which are the ones to score.

    Matching the types keeps the space the same whatever mix of types was simulated: with all the
    compared cells, a type simulated far beyond its real share would pull components its way.
    Scoring exactly the cells it was fitted on keeps the two sides alike: the minor components
    carry more of the variance of the cells they were fitted on than of other cells, so scoring
    every real test cell of a small type (all in the fit) against its 100 simulated cells (a dozen
    in the fit) let the forests tell fitted from unfitted cells (docs/record.md, thirteenth session).
    """

    def __init__(self, real: sp.csr_matrix, real_labels: np.ndarray, compared: sp.csr_matrix,
                 compared_labels: np.ndarray, n_components: int, seed: int, max_per_type: int | None = None):
        rng = np.random.default_rng(seed)
        if not np.isin(compared_labels, real_labels).any():  # no type in common: match the numbers only
            real_labels, compared_labels = np.zeros(len(real_labels)), np.zeros(len(compared_labels))
        members = {name: (np.flatnonzero(real_labels == name), np.flatnonzero(compared_labels == name))
                   for name in np.unique(real_labels)}
        sizes = {name: min(len(r), len(c), max_per_type or len(r)) for name, (r, c) in members.items()}
        shrink = min(1.0, 5_000 / max(sum(sizes.values()), 1))
        self.rows = {}
        for name, (real_members, compared_members) in members.items():
            each = int(sizes[name] * shrink)
            self.rows[name] = (real_members[subsample(len(real_members), each, rng)],
                               compared_members[subsample(len(compared_members), each, rng)])
        fit_on = sp.vstack([real[np.concatenate([r for r, _ in self.rows.values()])],
                            compared[np.concatenate([c for _, c in self.rows.values()])]], format="csr")
        # As scanpy's workflows do: the components come from the variable genes, and the fit
        # on PBMC68k's 20,387 genes would take most of the evaluation's time.
        variance = np.asarray(fit_on.multiply(fit_on).mean(axis=0)).ravel() - np.asarray(fit_on.mean(axis=0)).ravel() ** 2
        self.genes = np.sort(np.argsort(-variance, kind="stable")[:MAX_PCA_GENES])
        n_components = max(2, min(n_components, fit_on.shape[0] - 1, len(self.genes) - 1))
        self.pca = PCA(n_components=n_components, svd_solver="arpack", random_state=seed).fit(fit_on[:, self.genes])

    def project(self, normalised: sp.csr_matrix) -> np.ndarray:
        return self.pca.transform(normalised[:, self.genes])


class MatchedSample(NamedTuple):
    """One repeat's matched cells of a comparison: its space and every cell's coordinates in it."""

    space: Space
    real_pcs: np.ndarray
    compared_pcs: np.ndarray
    train_pcs: np.ndarray
    nearest_train: NearestNeighbors


@dataclass
class Evaluation:
    metrics: pd.DataFrame  # source, cell_type ("overall" too), metric, value
    confusion: pd.DataFrame  # source, conditioned_type, predicted_type, cells
    gene_statistics: dict[str, tuple[np.ndarray, np.ndarray]]  # source -> per-gene mean and variance of log2 CPM
    # Per cell type: real training and test cells and simulated cells. A type's scores rest on as
    # many cells as its smaller side has, and a type learnt from few cells can be simulated poorly,
    # so the report shows them beside the scores.
    cells: pd.DataFrame  # index cell_type; columns training, test, simulated


def evaluate(real: ad.AnnData, is_test: np.ndarray, simulated: ad.AnnData, settings: EvaluationSettings) -> Evaluation:
    """Score the simulated cells, the two baselines, the training cells and the real-versus-real control."""
    rng = np.random.default_rng(settings.seed)
    real_labels = real.obs["cell_type"].astype(str).to_numpy()
    counts = sp.csr_matrix(real.X)
    test, train = counts[is_test], counts[~is_test]
    test_labels, train_labels = real_labels[is_test], real_labels[~is_test]
    plan = simulated.obs["cell_type"].astype(str).value_counts().to_dict()
    sources = {"cvae": simulated}
    for kind in ("poisson", "nb"):
        sources[kind] = baseline(train, train_labels, plan, kind, settings.seed)
    # The control: one random half of the test cells stands in for a simulator, the other half is "real".
    half = rng.permutation(len(test_labels)) < len(test_labels) // 2

    test_normalised, train_normalised = log_normalise(test), log_normalise(train)

    real_view = labelled_view(test_normalised, test_labels, real.var_names)
    real_tops = top_markers(real_view, settings.n_markers, settings.max_cells_per_type, settings.seed)
    control_view = real_view[~half]
    control_tops = top_markers(control_view, settings.n_markers, settings.max_cells_per_type, settings.seed)
    rows, confusion = [], []
    test_properties = properties(test)
    gene_statistics = {"real test cells": (test_properties["gene_mean_log2cpm"],
                                           test_properties["gene_variance_log2cpm"])}
    entries = {name: (sp.csr_matrix(cells.X), cells.obs["cell_type"].astype(str).to_numpy())
               for name, cells in sources.items()}
    entries[CONTROL] = (test[half], test_labels[half])
    if settings.training_cells:  # last: the other sources' random draws stay as without it
        copies = training_sample(train, train_labels, plan, settings.seed)
        entries[TRAINING] = (sp.csr_matrix(copies.X), copies.obs["cell_type"].to_numpy())
    reference = {source: (test, test_labels) for source in entries}
    reference[CONTROL] = (test[~half], test_labels[~half])
    real_properties_of = {}  # (reference, cell type) -> properties: the three simulators share the test cells
    # A type too rare for a test cell is still trained on and simulated: it is named among the unscored, and the
    # confusion matrix keeps its cells and the cells called it.
    named = set(test_labels) | set(train_labels) | set(plan)
    known = [name for name in real.obs["cell_type"].astype("category").cat.categories if name in named]
    types = known + sorted(named - set(known))  # the data's own order (see filtering.type_order)
    sizes = {cell_type: (int((test_labels == cell_type).sum()), plan.get(cell_type, 0)) for cell_type in types}
    unscored = {cell_type: pair for cell_type, pair in sizes.items() if min(pair) < settings.min_cells}
    if unscored:
        log.warning("%s of %d cell types get no score: fewer than evaluate.min_cells = %d real test cells or "
                    "simulated cells (%s)%s", "all" if len(unscored) == len(types) else len(unscored), len(types),
                    settings.min_cells, "; ".join(f"{name}: {test} test and {simulated} simulated"
                                                  for name, (test, simulated) in unscored.items()),
                    "; every metric is NaN" if len(unscored) == len(types) else "")
    # A classifier trained on one type calls every cell that type, and markers need a type to rank against.
    several_types = len(set(train_labels)) > 1
    if not several_types:
        log.warning("one cell type in the training cells: cell-type fidelity and marker agreement are not defined "
                    "(NaN)")
    forests = Forests(settings)
    seeds = repeat_seeds(settings)
    further_halves = [stratified_half(test_labels, seed) for seed in seeds[1:]]  # the control's, after the first
    for source, (source_counts, source_labels) in entries.items():
        source_normalised = test_normalised[half] if source == CONTROL else log_normalise(source_counts)
        real_normalised = test_normalised[~half] if source == CONTROL else test_normalised
        real_counts, real_type_labels = reference[source]
        reference_name = CONTROL if source == CONTROL else "test"
        # Each repeat's (real, real labels, compared, compared labels): the control's halves differ by repeat.
        sides = [(real_normalised, real_type_labels, source_normalised, source_labels)] * len(seeds)
        if source == CONTROL:
            sides[1:] = [(test_normalised[~h], test_labels[~h], test_normalised[h], test_labels[h])
                         for h in further_halves]
        samples = []
        for seed, (real_side, real_side_labels, compared_side, compared_side_labels) in zip(seeds, sides):
            space = Space(real_side, real_side_labels, compared_side, compared_side_labels, settings.n_components,
                          seed, settings.max_cells_per_type)
            train_pcs = space.project(train_normalised)
            samples.append(MatchedSample(space, space.project(real_side), space.project(compared_side), train_pcs,
                                         NearestNeighbors(n_neighbors=1).fit(train_pcs)))
        if several_types:  # every compared cell is classified: the first space serves
            classifier = KNeighborsClassifier(n_neighbors=5).fit(samples[0].train_pcs, train_labels)
            predicted = classifier.predict(samples[0].compared_pcs)
            matrix = confusion_matrix(source_labels, predicted, labels=types)
            for i, conditioned in enumerate(types):
                for j, called in enumerate(types):
                    confusion.append((source, conditioned, called, int(matrix[i, j])))
        if source != CONTROL:
            whole = properties(source_counts)
            gene_statistics[source] = (whole["gene_mean_log2cpm"], whole["gene_variance_log2cpm"])
        source_view = labelled_view(source_normalised, source_labels, real.var_names)
        source_tops = top_markers(source_view, settings.n_markers, settings.max_cells_per_type, settings.seed)
        reference_view, reference_tops = (control_view, control_tops) if source == CONTROL else (real_view, real_tops)
        for cell_type in types:
            in_real, in_source = real_type_labels == cell_type, source_labels == cell_type
            if in_real.sum() < settings.min_cells or in_source.sum() < settings.min_cells:
                continue
            discrepancies, ratios = [], []
            for seed, matched in zip(seeds, samples):
                real_rows, source_rows = matched.space.rows[cell_type]  # as many of each side, all in the fit
                a, b = matched.real_pcs[real_rows], matched.compared_pcs[source_rows]
                # Distances to the nearest training cell, for the sampled cells only: a median needs no more.
                real_distance, source_distance = (matched.nearest_train.kneighbors(cells)[0].ravel()
                                                  for cells in (a, b))
                sample = a[subsample(len(a), 500, rng)]
                pairwise = np.sqrt(np.maximum(((sample[:, None, :] - sample[None, :, :]) ** 2).sum(-1), 0))
                bandwidths = np.median(pairwise[pairwise > 0]) * np.array([0.5, 1.0, 2.0, 4.0])
                forests.add((source, cell_type), a, b, seed)
                discrepancies.append(mmd(a, b, bandwidths))
                ratios.append(np.median(source_distance) / max(np.median(real_distance), 1e-12))
            scores = {
                "mmd": float(np.mean(discrepancies)),
                "fidelity_accuracy": float(np.mean(predicted[in_source] == cell_type)) if several_types else np.nan,
                "memorisation_ratio": float(np.mean(ratios)),
            }
            if (reference_name, cell_type) not in real_properties_of:
                real_properties_of[reference_name, cell_type] = properties(real_counts[in_real])
            real_properties = real_properties_of[reference_name, cell_type]
            source_properties = properties(source_counts[in_source])
            for name in PROPERTIES:
                scores[f"ks_{name}"] = float(ks_2samp(real_properties[name], source_properties[name]).statistic)
            scores.update(marker_scores(reference_view, source_view, reference_tops, source_tops, cell_type))
            rows.extend((source, cell_type, metric, value) for metric, value in scores.items())
        log.info("scored %s", source)
    aucs = forests.aucs()
    by_type = {}  # a type's forests, one per repeat, in the order the types were scored
    for key, auc in aucs:
        by_type.setdefault(key, []).append(auc)
    rows.extend((source, cell_type, "rf_auc", float(np.mean(values)))
                for (source, cell_type), values in by_type.items())
    log.info("fitted %d forests", len(aucs))
    metrics = pd.DataFrame(rows, columns=["source", "cell_type", "metric", "value"])
    weights = pd.Series(test_labels).value_counts(normalize=True)
    per_type = metrics[metrics["cell_type"] != "overall"].copy()
    per_type["weight"] = per_type["cell_type"].map(weights)
    overall = pd.DataFrame([(source, "overall", metric, np.average(group["value"], weights=group["weight"]))
                            for (source, metric), group in per_type.dropna(subset=["value"])
                            .groupby(["source", "metric"])], columns=metrics.columns)
    metrics = pd.concat([metrics, overall], ignore_index=True)
    cells = pd.DataFrame({"training": pd.Series(train_labels).value_counts(),
                          "test": pd.Series(test_labels).value_counts(), "simulated": pd.Series(plan, dtype=int)})
    cells = cells.reindex(types).fillna(0).astype(int).rename_axis("cell_type")
    return Evaluation(metrics, pd.DataFrame(confusion, columns=["source", "conditioned_type", "predicted_type", "cells"]),
                      gene_statistics, cells)


def overall_table(metrics: pd.DataFrame) -> pd.DataFrame:
    """One row per metric: the model, the baselines and the real-versus-real control side by side."""
    overall = metrics[metrics["cell_type"] == "overall"].pivot(index="metric", columns="source", values="value")
    # Every metric and simulator has its row and column, NaN where no cell type could be scored.
    scored = set(metrics["source"])
    sources = [name for name in SOURCES if name != TRAINING or name in scored]
    return overall.reindex(index=pd.Index(sorted(METRICS), name="metric"), columns=pd.Index(sources, name="source"))


def datasets_table(overall_tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Several datasets' overall tables in one, a row per metric and dataset (the datasets of a metric
    together, in the order given), for comparing datasets, settings or seeds side by side."""
    if not overall_tables:
        raise ValueError("no dataset's overall table to compare")
    stacked = pd.concat({name: table.set_index("metric") for name, table in overall_tables.items()},
                        names=["dataset", "metric"]).reset_index()
    stacked = stacked.sort_values("metric", kind="stable")  # stable: a metric's datasets stay in the order given
    sources = [name for name in SOURCES if name in stacked.columns]
    return stacked[["metric", "dataset", *sources]].reset_index(drop=True)
