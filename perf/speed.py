"""Benchmark: the original's way against the workflow's, side by side, at PBMC68k size (side 144).

Simulation: the original model called once per cell (the original's way) against the
workflow's default model (multinomial, latent 16, gene offsets) with batched decoding, z drawn from the
posteriors of PBMC68k's number of training cells (computed once beforehand, as the train rule
does; that time is printed apart), in cells per second including the Poisson draw and
writing a sparse .h5ad.
Training: the original model on the whole matrix densified as float64, batch 32 (the
original's way) against the workflow's default model on streaming batches of 32 (with the
counts its loss needs), in cells per second and peak resident memory. Weights are untrained.

Each measurement runs in its own process, so each peak memory is its own.

    .venv/bin/python perf/speed.py [--train-cells 8192] [--simulated-cells 20000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import cvaesim  # noqa: F401  (first: it sets TensorFlow's CPU options before TensorFlow loads)

SIDE = 144
N_GENES = 20_387
N_TYPES = 11
TRAINING_CELLS = 41_147  # PBMC68k's training split
DETECTED_PER_CELL = 800


def store(n_cells: int, seed: int = 0):
    """An image store of PBMC68k's shape and sparsity, with random scaled values."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    indptr = np.arange(n_cells + 1) * DETECTED_PER_CELL
    indices = np.concatenate([np.sort(rng.choice(N_GENES, DETECTED_PER_CELL, replace=False)) for _ in range(n_cells)])
    values = sp.csr_matrix((rng.random(indptr[-1], dtype=np.float32), indices, indptr), shape=(n_cells, N_GENES))
    types = [f"type {i}" for i in range(N_TYPES)]
    obs = pd.DataFrame({"cell_type": pd.Categorical(rng.choice(types, n_cells), categories=types),
                        "split": pd.Categorical(["train"] * n_cells, categories=["train", "test"]),
                        "total_counts": rng.integers(500, 5000, n_cells)}, index=[str(i) for i in range(n_cells)])
    var = pd.DataFrame({"pixel": np.arange(N_GENES), "scale": np.full(N_GENES, np.log1p(50.0))},
                       index=[f"GENE{i}" for i in range(N_GENES)])
    result = ad.AnnData(X=values, obs=obs, var=var)
    result.uns["image"] = {"side": SIDE, "scaling": "log1p_gene_max"}
    return result


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def original_model():
    from cvaesim.model import ConditionalConvVAE

    return ConditionalConvVAE(image_side=SIDE, n_cell_types=N_TYPES, seed=0)


def workflow_model():
    """The model of the workflow's default configuration."""
    from cvaesim.model import ConditionalConvVAE

    return ConditionalConvVAE(image_side=SIDE, n_cell_types=N_TYPES, seed=0, latent_dim=16,
                              reconstruction_loss="multinomial", n_genes=N_GENES, gene_offsets=True)


def simulate_original(n_cells: int) -> dict:
    """One predict call per cell, rounding with the original's constant, kept in memory as a dense table."""
    decoder = original_model().decoder
    rng = np.random.default_rng(0)
    label = np.eye(N_TYPES, dtype=np.float32)[:1]
    started = time.perf_counter()
    rows = [np.floor(decoder.predict([rng.normal(1, 2, (1, 2)).astype(np.float32), label], verbose=0)
                     .reshape(-1)[:N_GENES] * 260) for _ in range(n_cells)]
    np.stack(rows)
    return {"cells": n_cells, "seconds": time.perf_counter() - started}


def simulate_workflow(n_cells: int, store_path: Path) -> dict:
    """From an image store on disk, read as the simulate rule and the CLI read it (backed)."""
    import anndata as ad

    from cvaesim.simulation import Posteriors, Simulator
    from cvaesim.writers import write_h5ad

    meta = ad.read_h5ad(store_path, backed="r")
    model = workflow_model()
    # Once per trained model, by the train rule: not part of any simulation.
    started = time.perf_counter()
    posteriors = Posteriors.of_training_cells(model, meta)
    posteriors_seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        simulator = Simulator(model, meta, batch_size=256, latent="posterior", posteriors=posteriors)
        plan = {name: n_cells // N_TYPES for name in simulator.cell_types}
        started = time.perf_counter()
        written = write_h5ad(simulator.batches(plan, 0), simulator.var, simulator.cell_types, {}, Path(folder) / "s.h5ad")
        seconds = time.perf_counter() - started
    return {"cells": written, "seconds": seconds, "posteriors_seconds": posteriors_seconds}


def train_original(n_cells: int) -> dict:
    import keras

    data = store(n_cells)
    started = time.perf_counter()
    # The original: the whole matrix as a dense float64 array of images.
    images = np.zeros((n_cells, SIDE * SIDE), dtype=np.float64)
    images[:, :N_GENES] = data.X.toarray()
    images = images.reshape(-1, SIDE, SIDE, 1)
    labels = np.eye(N_TYPES)[data.obs["cell_type"].cat.codes.to_numpy()]
    network = original_model()
    network.compile(optimizer=keras.optimizers.RMSprop(1e-3))
    network.fit(x=(images, labels), batch_size=32, epochs=1, verbose=0, shuffle=True)
    return {"cells": n_cells, "seconds": time.perf_counter() - started}


def train_workflow(n_cells: int) -> dict:
    import keras

    from cvaesim.training import batches_for

    data = store(n_cells)
    started = time.perf_counter()
    network = workflow_model()
    network.compile(optimizer=keras.optimizers.RMSprop(1e-3))
    network.fit(batches_for(data, "train", 32, seed=0, with_counts=True), epochs=1, verbose=0)
    return {"cells": n_cells, "seconds": time.perf_counter() - started}


MEASURES = {"simulate_original": simulate_original, "simulate_workflow": simulate_workflow,
            "train_original": train_original, "train_workflow": train_workflow}


def measure(name: str, n_cells: int, store_path: Path) -> dict:
    child = subprocess.run([sys.executable, __file__, "--measure", name, "--n", str(n_cells), "--store", str(store_path)],
                           capture_output=True, text=True, check=True)
    return json.loads(child.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-cells", type=int, default=8192)
    parser.add_argument("--simulated-cells", type=int, default=22_000)
    parser.add_argument("--original-simulated-cells", type=int, default=200)
    parser.add_argument("--measure", choices=list(MEASURES))
    parser.add_argument("--n", type=int)
    parser.add_argument("--store", type=Path, help="the image store that simulate_workflow reads")
    parser.add_argument("--write-store", type=Path, help="write the image store there and stop")
    arguments = parser.parse_args()
    if arguments.write_store:
        store(TRAINING_CELLS).write_h5ad(arguments.write_store)
        return
    if arguments.measure:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        extra = (arguments.store,) if arguments.measure == "simulate_workflow" else ()
        result = MEASURES[arguments.measure](arguments.n, *extra)
        print(json.dumps({**result, "peak_rss_mb": peak_mb()}))
        return
    import tensorflow as tf

    device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    with tempfile.TemporaryDirectory() as folder:
        store_path = Path(folder) / "images.h5ad"
        # Written by a child process: a child's peak memory counts its parent's at the fork.
        subprocess.run([sys.executable, __file__, "--write-store", str(store_path)], check=True)
        runs = {
            "simulate_original": measure("simulate_original", arguments.original_simulated_cells, store_path),
            "simulate_workflow": measure("simulate_workflow", arguments.simulated_cells, store_path),
            "train_original": measure("train_original", arguments.train_cells, store_path),
            "train_workflow": measure("train_workflow", arguments.train_cells, store_path),
        }
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {device}; side {SIDE}, {N_GENES} genes, "
          f"{DETECTED_PER_CELL} detected genes per cell")
    print(f"{'measure':<20}{'cells':>8}{'seconds':>10}{'cells/s':>12}{'peak RSS MB':>14}")
    for name, run in runs.items():
        print(f"{name:<20}{run['cells']:>8}{run['seconds']:>10.1f}{run['cells'] / run['seconds']:>12.1f}"
              f"{run['peak_rss_mb']:>14.0f}")
    print(f"posteriors of the {TRAINING_CELLS:,} training cells, once after training (not in the rows above): "
          f"{runs['simulate_workflow']['posteriors_seconds']:.1f} s")
    speed = {name: run["cells"] / run["seconds"] for name, run in runs.items()}
    print(f"simulation speed-up: {speed['simulate_workflow'] / speed['simulate_original']:.0f}x; "
          f"training speed ratio: {speed['train_workflow'] / speed['train_original']:.2f}x; "
          f"training memory ratio: {runs['train_original']['peak_rss_mb'] / runs['train_workflow']['peak_rss_mb']:.1f}x")


if __name__ == "__main__":
    main()
