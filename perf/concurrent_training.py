"""Benchmark: trainings running side by side, with TensorFlow's threads limited to each job's share or not.

Trains the image store given (the quick start's, by default) for a few epochs in several processes at
once, first with each process's thread pools left to TensorFlow (every core), then limited to
``cores // trainings`` threads each, as the train rule limits them to its job's threads, and prints
each process's training time.

    .venv/bin/python perf/concurrent_training.py --trainings 2 --epochs 40
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_training(store: str, epochs: int, threads: int | None) -> None:
    import cvaesim  # noqa: F401  (first: it sets TensorFlow's CPU options before TensorFlow loads)

    import anndata as ad

    from cvaesim.training import TrainingSettings, train, use_threads

    if threads is not None:
        use_threads(threads)
    with open(os.path.join(ROOT, "config", "config.yaml")) as handle:
        settings = {**yaml.safe_load(handle)["train"], "epochs": epochs}
    images = ad.read_h5ad(store)
    start = time.perf_counter()
    train(images, TrainingSettings(**settings), seed=0)
    print(f"{time.perf_counter() - start:.1f}")


def side_by_side(store: str, epochs: int, trainings: int, threads: int | None) -> list[str]:
    command = [sys.executable, __file__, "--store", store, "--epochs", str(epochs), "--one",
               str(threads) if threads else "all"]
    running = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
               for _ in range(trainings)]
    return [process.communicate()[0].strip().splitlines()[-1] for process in running]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default=os.path.join(ROOT, "results", "pbmc68k_reduced", "images", "images.h5ad"))
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--trainings", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a single training, run by the benchmark itself
    arguments = parser.parse_args()
    if arguments.one:
        one_training(arguments.store, arguments.epochs, None if arguments.one == "all" else int(arguments.one))
        return
    cores = len(os.sched_getaffinity(0))
    share = max(1, cores // arguments.trainings)
    print(f"{arguments.trainings} trainings of {arguments.epochs} epochs at once on {cores} cores")
    for threads in (None, share):
        times = side_by_side(arguments.store, arguments.epochs, arguments.trainings, threads)
        print(f"  threads {'all (TensorFlow default)' if threads is None else threads}: {' s, '.join(times)} s")


if __name__ == "__main__":
    main()
