"""Benchmark: how much the realism metrics move between draws from the same trained model.

A finished run (``results/<name>/`` with its model, posteriors, image store, filtered
matrix and simulated cells) is simulated again with other seeds, the simulation settings
read from its ``simulated.h5ad`` unless given here; each draw is scored as the ``evaluate``
rule does (same evaluation seed, so the test cells, the control and the baselines stay fixed and only
the simulated cells change). Draws of the negative-binomial baseline with other seeds are
scored the same way, in the model's place. Prints, per overall metric, the mean, standard
deviation and range over the draws of each, and in how many paired draws the model is
closer to the real cells than the baseline. With ``--training-cells``, samples of the real
training cells (as many of each type as simulated, all of a type with fewer) are scored in
the model's place too: what handing back the training data scores, the floor of the distances
that any simulator fitted on those cells can hope to reach on these test cells.

    .venv/bin/python perf/realism_noise.py results/pbmc68k_reduced --draws 5 --training-cells
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cvaesim  # noqa: F401  (first: it sets TensorFlow's CPU options before TensorFlow loads)

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp
import yaml

from cvaesim.evaluation import EvaluationSettings, baseline, evaluate, overall_table, training_sample
from cvaesim.choices import CALIBRATIONS, LIBRARY_SIZES
from cvaesim.steps import simulate

# Closer to the real cells: nearer the real cells' own value for these, higher for marker
# agreement, lower for the distances.
TOWARD_CONTROL = {"fidelity_accuracy", "memorisation_ratio"}
HIGHER_IS_BETTER = {"marker_correlation", "marker_overlap"}


def score(real: ad.AnnData, is_test: np.ndarray, simulated: ad.AnnData, settings: EvaluationSettings) -> pd.DataFrame:
    """The evaluate rule's overall table: the cells scored in the ``cvae`` column."""
    return overall_table(evaluate(real, is_test, simulated, settings).metrics)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="results/<name> of a finished run")
    parser.add_argument("--draws", type=int, default=5)
    parser.add_argument("--first-seed", type=int, default=1000, help="simulation seeds: this and the next ones")
    parser.add_argument("--config", type=Path, default=Path("config/config.yaml"), help="for the evaluate settings")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--library-sizes", choices=LIBRARY_SIZES, help="default: the run's")
    parser.add_argument("--calibration", choices=CALIBRATIONS, help="default: the run's")
    parser.add_argument("--training-cells", action="store_true",
                        help="also score samples of the training cells (the floor of the distances)")
    arguments = parser.parse_args()
    if arguments.draws < 2:
        parser.error("--draws: at least 2, for a standard deviation")
    run = arguments.run
    recorded = ad.read_h5ad(run / "simulated" / "simulated.h5ad", backed="r")
    simulation = dict(recorded.uns["simulation"])
    for name in ("library_sizes", "calibration"):
        simulation[name] = getattr(arguments, name) or simulation[name]
    cells_per_type = int(recorded.obs["cell_type"].value_counts().max())
    recorded.file.close()
    real = ad.read_h5ad(run / "filtered.h5ad")
    split = ad.read_h5ad(run / "images" / "images.h5ad", backed="r").obs["split"]
    is_test = (split == "test").to_numpy()
    # Each source is scored in the model's place: the evaluation's own training-cell column would
    # be the same sample at every draw.
    settings = EvaluationSettings(**{**yaml.safe_load(arguments.config.read_text())["evaluate"],
                                     "training_cells": False}, seed=int(simulation["seed"]), n_jobs=arguments.threads)
    labels = real.obs["cell_type"].astype(str).to_numpy()
    train, train_labels = sp.csr_matrix(real.X)[~is_test], labels[~is_test]

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for draw in range(arguments.draws):
            seed = arguments.first_seed + draw
            output = Path(scratch) / f"draw{draw}.h5ad"
            started = time.perf_counter()
            simulate(str(run / "model" / "cvae.keras"), str(run / "images" / "images.h5ad"), str(output),
                     cells_per_type, seed, 256, simulation["count_sampling"], simulation["library_sizes"],
                     simulation["latent"], str(run / "model" / "posteriors.npz"), simulation["calibration"],
                     origins=simulation.get("origins", "independent"))  # runs from before the key drew independently
            simulated = ad.read_h5ad(output)
            plan = simulated.obs["cell_type"].astype(str).value_counts().to_dict()
            model_scores = score(real, is_test, simulated, settings)
            control = model_scores["real_vs_real"]  # the same at every draw: it never sees the simulated cells
            rows.append(model_scores["cvae"].rename(("model", seed)))
            nb_cells = baseline(train, train_labels, plan, "nb", seed)
            rows.append(score(real, is_test, nb_cells, settings)["cvae"].rename(("nb", seed)))
            if arguments.training_cells:
                copies = training_sample(train, train_labels, plan, seed)
                rows.append(score(real, is_test, copies, settings)["cvae"].rename(("training cells", seed)))
            print(f"draw {draw + 1}/{arguments.draws} (seed {seed}): {time.perf_counter() - started:.1f} s", flush=True)
    table = pd.DataFrame(rows, index=pd.MultiIndex.from_tuples([row.name for row in rows]))
    print(f"\n{run}: {simulation}; {arguments.draws} draws each, evaluation seed {settings.seed}")
    columns = ["model", "nb", *(["training cells"] if arguments.training_cells else [])]
    print(f"{'metric':28s} " + " ".join(f"{name + ' mean ± sd [min, max]':34s}" for name in columns)
          + " model closer than nb")
    for metric in table.columns:
        model, nb = table.loc["model", metric].to_numpy(), table.loc["nb", metric].to_numpy()
        if metric in HIGHER_IS_BETTER:
            closer = int(np.sum(model > nb))
        else:
            target = control[metric] if metric in TOWARD_CONTROL else 0.5 if metric == "rf_auc" else 0.0
            closer = int(np.sum(np.abs(model - target) < np.abs(nb - target)))
        summaries = (table.loc[name, metric].to_numpy() for name in columns)
        print(f"{metric:28s} " + " ".join(f"{values.mean():.4f} ± {values.std(ddof=1):.4f} "
                                          f"[{values.min():.4f}, {values.max():.4f}]  " for values in summaries)
              + f" {closer}/{len(model)}")


if __name__ == "__main__":
    main()
