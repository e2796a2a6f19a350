"""Diagnosis: where the real-versus-simulated forests tell the cells apart.

For a finished run (``results/<name>/``), per cell type with enough test cells, as the
``evaluate`` rule scores them (its PCA space, fitted per source on as many real test as compared
cells of each type, the cells it scores; its seeded forests): the forest AUC on all components, on blocks of components (1-5, 6-10,
11-20, 21-30), and on two per-cell numbers alone (log library size, detected genes); and the
compared cells' variance on each block relative to the real test cells'. The same for a sample
of the real training cells in the model's place (what handing back the training data scores).
Prints one table; no file is written.

    .venv/bin/python perf/forest_diagnosis.py results/pbmc68k_reduced
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cvaesim  # noqa: F401  (first: it sets TensorFlow's CPU options before TensorFlow loads)

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cvaesim.evaluation import EvaluationSettings, Space, forest_auc, log_normalise, training_sample

BLOCKS = {"1-5": slice(0, 5), "6-10": slice(5, 10), "11-20": slice(10, 20), "21-30": slice(20, 30)}


def per_cell_numbers(counts: sp.csr_matrix) -> np.ndarray:
    return np.c_[np.log1p(np.asarray(counts.sum(axis=1)).ravel()), np.diff(counts.indptr)]


def diagnose(test: sp.csr_matrix, test_labels: np.ndarray, compared: sp.csr_matrix, compared_labels: np.ndarray,
             settings: EvaluationSettings) -> pd.DataFrame:
    test_normalised, compared_normalised = log_normalise(test), log_normalise(compared)
    space = Space(test_normalised, test_labels, compared_normalised, compared_labels, settings.n_components,
                  settings.seed, settings.max_cells_per_type)
    real_pcs, compared_pcs = space.project(test_normalised), space.project(compared_normalised)
    real_numbers, compared_numbers = per_cell_numbers(test), per_cell_numbers(compared)
    rows = []
    for cell_type in sorted(set(test_labels)):
        in_real, in_compared = test_labels == cell_type, compared_labels == cell_type
        if min(in_real.sum(), in_compared.sum()) < settings.min_cells:
            continue
        real_rows, compared_rows = space.rows[cell_type]  # the cells the rule scores
        a, b = real_pcs[real_rows], compared_pcs[compared_rows]
        row = {"cell_type": cell_type, "cells a side": len(real_rows), "AUC all": forest_auc(a, b, settings),
               "AUC library+detected": forest_auc(real_numbers[real_rows], compared_numbers[compared_rows],
                                                  settings)}
        for name, block in BLOCKS.items():
            row[f"AUC {name}"] = forest_auc(a[:, block], b[:, block], settings)
        for name, block in BLOCKS.items():
            row[f"var {name}"] = float(np.mean(b[:, block].var(axis=0) / a[:, block].var(axis=0)))
        rows.append(row)
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="results/<name>/ of a finished run")
    parser.add_argument("--seed", type=int, default=0, help="the evaluation's seed (the run's `seed`)")
    arguments = parser.parse_args()
    real = ad.read_h5ad(arguments.run / "filtered.h5ad")
    is_test = (ad.read_h5ad(arguments.run / "images" / "images.h5ad", backed="r").obs["split"] == "test").to_numpy()
    simulated = ad.read_h5ad(arguments.run / "simulated" / "simulated.h5ad")
    settings = EvaluationSettings(seed=arguments.seed)
    labels = real.obs["cell_type"].astype(str).to_numpy()
    counts = sp.csr_matrix(real.X)
    test, train = counts[is_test], counts[~is_test]
    plan = simulated.obs["cell_type"].astype(str).value_counts().to_dict()
    copies = training_sample(train, labels[~is_test], plan, settings.seed)
    sources = {"model": (sp.csr_matrix(simulated.X), simulated.obs["cell_type"].astype(str).to_numpy()),
               "training cells": (sp.csr_matrix(copies.X), copies.obs["cell_type"].to_numpy())}
    tables = [diagnose(test, labels[is_test], compared, compared_labels, settings).assign(source=source)
              for source, (compared, compared_labels) in sources.items()]
    table = pd.concat(tables).set_index(["source", "cell_type"])
    with pd.option_context("display.width", 250, "display.max_columns", 20):
        print(table.round(3).to_string())


if __name__ == "__main__":
    main()
