"""Benchmark: the original's way against the workflow's, side by side, at PBMC68k size (side 144).

Simulation: the original model called once per cell (the original's way) against the
workflow's default model (multinomial, latent 16, gene offsets) with batched decoding, z drawn from the
posteriors of PBMC68k's number of training cells (computed once beforehand, as the train rule
does, with the share moments the type-mean calibration needs; that time is printed apart), in
cells per second including the calibration (``--calibrations none`` for rows without), the
Poisson draw and writing a sparse .h5ad.
Training: the original model on the whole matrix densified as float64, batch 32 (the
original's way) against the workflow's default model on streaming batches of 32 (with the
counts its loss needs), in cells per second and peak resident memory. Weights are untrained.

Each measurement runs in its own process, so each peak memory is its own. On a GPU, add
larger batch sizes (``--train-batch-sizes 32 1024``), more than one epoch (the last is timed,
so that compilation stays out) and ``--decode-cells`` for the decoder alone (latent in, expression
proportions out, no counts or writing), the figure published simulators report. Any Keras
backend: KERAS_BACKEND=jax runs it where JAX has the GPU.

    .venv/bin/python perf/speed.py [--train-cells 8192] [--simulated-cells 22000]
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
import keras

from cvaesim.choices import CALIBRATIONS

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


def simulate_workflow(n_cells: int, batch_size: int, store_path: Path, calibration: str) -> dict:
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
        simulator = Simulator(model, meta, batch_size=batch_size, latent="posterior", posteriors=posteriors,
                              calibration=calibration)
        plan = {name: n_cells // N_TYPES for name in simulator.cell_types}
        started = time.perf_counter()
        written = write_h5ad(simulator.batches(plan, 0), simulator.var, simulator.cell_types, {}, Path(folder) / "s.h5ad")
        seconds = time.perf_counter() - started
    return {"cells": written, "seconds": seconds, "posteriors_seconds": posteriors_seconds}


def decode_only(n_cells: int, batch_size: int) -> dict:
    """The workflow model's decoder alone, on random latent values: the model's own rate."""
    decoder = workflow_model().decoder
    rng = np.random.default_rng(0)
    z = rng.normal(size=(batch_size, 16)).astype(np.float32)
    labels = np.eye(N_TYPES, dtype=np.float32)[rng.integers(0, N_TYPES, batch_size)]
    np.asarray(decoder.predict_on_batch([z, labels]))  # compiles
    batches = n_cells // batch_size
    started = time.perf_counter()
    for _ in range(batches):
        proportions = decoder.predict_on_batch([z, labels])
    np.asarray(proportions)  # waits for the device
    return {"cells": batches * batch_size, "seconds": time.perf_counter() - started}


class EpochTimes(keras.callbacks.Callback):
    """The last epoch's seconds: with more than one epoch, compilation and warm-up stay out."""

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.started


def fit_seconds(network, started: float, epochs: int, data, **fit_arguments) -> float:
    """With one epoch, the seconds since ``started`` (data preparation included); else the last epoch's."""
    timer = EpochTimes()
    network.fit(data, epochs=epochs, verbose=0, callbacks=[timer], **fit_arguments)
    return time.perf_counter() - started if epochs == 1 else timer.seconds


def train_original(n_cells: int, batch_size: int, epochs: int) -> dict:
    data = store(n_cells)
    started = time.perf_counter()
    # The original: the whole matrix as a dense float64 array of images.
    images = np.zeros((n_cells, SIDE * SIDE), dtype=np.float64)
    images[:, :N_GENES] = data.X.toarray()
    images = images.reshape(-1, SIDE, SIDE, 1)
    labels = np.eye(N_TYPES)[data.obs["cell_type"].cat.codes.to_numpy()]
    network = original_model()
    network.compile(optimizer=keras.optimizers.RMSprop(1e-3))
    return {"cells": n_cells,
            "seconds": fit_seconds(network, started, epochs, (images, labels), batch_size=batch_size, shuffle=True)}


def train_workflow(n_cells: int, batch_size: int, epochs: int, workers: int) -> dict:
    from cvaesim.training import batches_for

    data = store(n_cells)
    started = time.perf_counter()
    network = workflow_model()
    network.compile(optimizer=keras.optimizers.RMSprop(1e-3))
    batches = batches_for(data, "train", batch_size, seed=0, with_counts=True, workers=workers)
    return {"cells": n_cells, "seconds": fit_seconds(network, started, epochs, batches)}


MEASURES = {"simulate_original": simulate_original, "simulate_workflow": simulate_workflow, "decode_only": decode_only,
            "train_original": train_original, "train_workflow": train_workflow}


def simulation_row(batch_size: int, calibration: str) -> str:
    return f"simulate_workflow b{batch_size}" + (" uncalibrated" if calibration == "none" else "")


def measure(name: str, n_cells: int, store_path: Path, batch_size: int = 0, epochs: int = 1, workers: int = 2,
            calibration: str = "type_moments") -> dict:
    child = subprocess.run([sys.executable, __file__, "--measure", name, "--n", str(n_cells), "--store", str(store_path),
                            "--batch-size", str(batch_size), "--epochs", str(epochs), "--workers", str(workers),
                            "--calibration", calibration],
                           capture_output=True, text=True)
    if child.returncode:
        sys.exit(f"{name} failed:\n{child.stderr[-4000:]}")
    result = json.loads(child.stdout.strip().splitlines()[-1])
    print(name, batch_size, json.dumps(result), file=sys.stderr, flush=True)  # progress, in case a later one fails
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-cells", type=int, default=8192, help="0: no training rows")
    parser.add_argument("--train-batch-sizes", type=int, nargs="+", default=[32],
                        help="the first is the original's and the ratios' (default 32)")
    parser.add_argument("--train-epochs", type=int, default=1, help="with more than one, the last is timed")
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[2],
                        help="threads preparing the workflow's training batches; each is a row (default 2)")
    parser.add_argument("--simulated-cells", type=int, default=22_000)
    parser.add_argument("--simulate-batch-sizes", type=int, nargs="+", default=[256],
                        help="the first is the ratios' (default 256, the simulate rule's)")
    parser.add_argument("--calibrations", choices=CALIBRATIONS, nargs="+", default=["type_moments"],
                        help="the workflow's simulation rows (default type_moments, the simulate rule's)")
    parser.add_argument("--original-simulated-cells", type=int, default=200)
    parser.add_argument("--decode-cells", type=int, default=0, help="cells for the decoder-alone row (0: no row)")
    parser.add_argument("--decode-batch-size", type=int, default=4096)
    parser.add_argument("--measure", choices=list(MEASURES))
    parser.add_argument("--n", type=int)
    parser.add_argument("--store", type=Path, help="the image store that simulate_workflow reads")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--workers", type=int)
    parser.add_argument("--calibration", choices=CALIBRATIONS)
    parser.add_argument("--write-store", type=Path, help="write the image store there and stop")
    arguments = parser.parse_args()
    if arguments.write_store:
        store(TRAINING_CELLS).write_h5ad(arguments.write_store)
        return
    if arguments.measure:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        extra = {"simulate_workflow": (arguments.batch_size, arguments.store, arguments.calibration),
                 "decode_only": (arguments.batch_size,),
                 "train_original": (arguments.batch_size, arguments.epochs),
                 "train_workflow": (arguments.batch_size, arguments.epochs, arguments.workers)}.get(arguments.measure, ())
        result = MEASURES[arguments.measure](arguments.n, *extra)
        print(json.dumps({**result, "peak_rss_mb": peak_mb()}))
        return
    from cvaesim.training import describe_devices

    epochs = arguments.train_epochs
    with tempfile.TemporaryDirectory() as folder:
        store_path = Path(folder) / "images.h5ad"
        # Written by a child process: a child's peak memory counts its parent's at the fork.
        subprocess.run([sys.executable, __file__, "--write-store", str(store_path)], check=True)
        runs = {"simulate_original": measure("simulate_original", arguments.original_simulated_cells, store_path)}
        for size in arguments.simulate_batch_sizes:
            for calibration in arguments.calibrations:
                runs[simulation_row(size, calibration)] = measure(
                    "simulate_workflow", arguments.simulated_cells, store_path, size, calibration=calibration)
        if arguments.decode_cells:
            runs[f"decode_only b{arguments.decode_batch_size}"] = measure(
                "decode_only", arguments.decode_cells, store_path, arguments.decode_batch_size)
        original_batch = arguments.train_batch_sizes[0]
        if arguments.train_cells:
            runs[f"train_original b{original_batch}"] = measure(
                "train_original", arguments.train_cells, store_path, original_batch, epochs)
        for size in arguments.train_batch_sizes if arguments.train_cells else ():
            for workers in arguments.loader_workers:
                name = f"train_workflow b{size}" + (f" w{workers}" if workers != 2 else "")
                runs[name] = measure("train_workflow", arguments.train_cells, store_path, size, epochs, workers)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, {describe_devices()}, Keras {keras.__version__} "
          f"on {keras.backend.backend()}; side {SIDE}, {N_GENES} genes, {DETECTED_PER_CELL} detected genes per cell"
          + (f"; training: last of {epochs} epochs timed" if epochs > 1 else ""))
    print(f"{'measure':<26}{'cells':>8}{'seconds':>10}{'cells/s':>12}{'peak RSS MB':>14}")
    for name, run in runs.items():
        print(f"{name:<26}{run['cells']:>8}{run['seconds']:>10.1f}{run['cells'] / run['seconds']:>12.1f}"
              f"{run['peak_rss_mb']:>14.0f}")
    simulated = runs[simulation_row(arguments.simulate_batch_sizes[0], arguments.calibrations[0])]
    print(f"posteriors of the {TRAINING_CELLS:,} training cells and the calibration's share moments, once after "
          f"training (not in the rows above): "
          f"{simulated['posteriors_seconds']:.1f} s")
    speed = {name: run["cells"] / run["seconds"] for name, run in runs.items()}
    print(f"simulation speed-up: {simulated['cells'] / simulated['seconds'] / speed['simulate_original']:.0f}x")
    if not arguments.train_cells:
        return
    trained = runs[f"train_workflow b{original_batch}"]
    print(f"training speed ratio: {trained['cells'] / trained['seconds'] / speed[f'train_original b{original_batch}']:.2f}x; "
          f"training memory ratio: "
          f"{runs[f'train_original b{original_batch}']['peak_rss_mb'] / trained['peak_rss_mb']:.1f}x")


if __name__ == "__main__":
    main()
