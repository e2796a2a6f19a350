"""Experiment: does a cell type score worse when the model saw fewer of its cells?

On a finished run (``results/<name>/``, default settings), keeps only ``--keep`` of one cell
type's training cells (a seeded sample; its test cells and every other cell stay), trains the
default model on that store with the run's settings, simulates as the run did (posterior draws,
paired libraries, type-mean calibration, Poisson), and scores the type as ``perf/forest_diagnosis.py``
does: forest AUC on all components and the simulated cells' variance on components 11-30
relative to the test cells'. The image scaling and gene order stay those of the full store
(fitted on all training cells); the model never trains on the dropped cells. Prints one line
per type: the run's own model and the reduced one, and the real training cells in a simulator's
place (the evaluate rule's floor) with and without the dropped cells.

    .venv/bin/python perf/fewer_training_cells.py results/pbmc68k_reduced --cell-type Dendritic --keep 20
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import cvaesim  # noqa: F401  (first: it sets TensorFlow's CPU options before TensorFlow loads)

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from cvaesim.evaluation import EvaluationSettings, training_sample
from cvaesim.simulation import Posteriors, simulate
from cvaesim.training import TrainingSettings, train

sys.path.insert(0, str(Path(__file__).parent))
from forest_diagnosis import diagnose  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def score(real: ad.AnnData, is_test: np.ndarray, simulated: ad.AnnData, seed: int) -> pd.DataFrame:
    labels = real.obs["cell_type"].astype(str).to_numpy()
    table = diagnose(sp.csr_matrix(real.X)[is_test], labels[is_test], sp.csr_matrix(simulated.X),
                     simulated.obs["cell_type"].astype(str).to_numpy(), EvaluationSettings(seed=seed))
    table["var 11-30"] = (table["var 11-20"] + table["var 21-30"]) / 2
    return table.set_index("cell_type")[["cells a side", "AUC all", "var 11-30"]]


def copies_of(real: ad.AnnData, is_test: np.ndarray, plan: dict[str, int], seed: int) -> ad.AnnData:
    """Real training cells in a simulator's place, as the evaluate rule's floor samples them."""
    labels = real.obs["cell_type"].astype(str).to_numpy()
    return training_sample(sp.csr_matrix(real.X)[~is_test], labels[~is_test], plan, seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--cell-type", required=True)
    parser.add_argument("--keep", type=int, required=True, help="training cells of the type to keep")
    parser.add_argument("--seed", type=int, default=0, help="the run's seed")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "config.yaml")
    arguments = parser.parse_args()
    config = yaml.safe_load(arguments.config.read_text())
    real = ad.read_h5ad(arguments.run / "filtered.h5ad")
    store = ad.read_h5ad(arguments.run / "images" / "images.h5ad")
    of_type = (store.obs["cell_type"] == arguments.cell_type).to_numpy()
    training_rows = np.flatnonzero(of_type & (store.obs["split"] == "train").to_numpy())
    rng = np.random.default_rng(arguments.seed)
    dropped = rng.choice(training_rows, size=len(training_rows) - arguments.keep, replace=False)
    keep = np.ones(store.n_obs, dtype=bool)
    keep[dropped] = False
    print(f"{arguments.cell_type}: {arguments.keep} of {len(training_rows)} training cells kept", flush=True)

    reduced_store, reduced_real = store[keep].copy(), real[keep].copy()
    model, _ = train(reduced_store, TrainingSettings(**config["train"]), arguments.seed)
    simulation = config["simulate"]
    with tempfile.TemporaryDirectory() as folder:
        posteriors = Path(folder) / "posteriors.npz"
        Posteriors.of_training_cells(model, reduced_store, seed=arguments.seed).save(posteriors)
        plan = dict.fromkeys(reduced_store.obs["cell_type"].cat.categories, simulation["cells_per_type"])
        simulated = simulate(model, reduced_store, plan, arguments.seed, simulation["batch_size"],
                             simulation["count_sampling"], simulation["library_sizes"], simulation["latent"],
                             posteriors, simulation["calibration"], simulation["origins"])
    is_test = (store.obs["split"] == "test").to_numpy()
    reduced = f" ({arguments.cell_type}: {arguments.keep})"
    scores = {
        "model": score(real, is_test, ad.read_h5ad(arguments.run / "simulated" / "simulated.h5ad"), arguments.seed),
        f"model{reduced}": score(reduced_real, is_test[keep], simulated, arguments.seed),
        "training cells": score(real, is_test, copies_of(real, is_test, plan, arguments.seed), arguments.seed),
        f"training cells{reduced}": score(reduced_real, is_test[keep],
                                          copies_of(reduced_real, is_test[keep], plan, arguments.seed), arguments.seed),
    }
    table = pd.concat(scores, axis=1)
    with pd.option_context("display.width", 200):
        print(table.round(3).to_string())


if __name__ == "__main__":
    main()
