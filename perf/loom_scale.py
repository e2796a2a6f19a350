"""Benchmark: reading a loom file (the loom format) at PBMC68k's size.

Writes a loom file as loompy does (genes x cells float32 in ``/matrix``, chunks of 64 x 64, gzip) of 20,387
genes and ``--cells`` cells (4% of the values non-zero, about PBMC68k's density), written a block of cells at
a time, then reads it as the filter rule does and prints the wall time and peak resident memory of the read.

    .venv/bin/python perf/loom_scale.py --workdir /tmp/loom-scale --cells 68579
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import h5py
import numpy as np

from cvaesim.io import read_loom_counts

GENES = 20_387
CELLS_PER_WRITE = 2_048


def write_loom(path: Path, n_cells: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with h5py.File(path, "w") as loom:
        matrix = loom.create_dataset("matrix", shape=(GENES, n_cells), dtype=np.float32, chunks=(64, 64),
                                     compression="gzip", fillvalue=0)
        for start in range(0, n_cells, CELLS_PER_WRITE):
            width = min(CELLS_PER_WRITE, n_cells - start)
            block = np.zeros((GENES, width), dtype=np.float32)
            detected = rng.random((GENES, width)) < 0.04
            block[detected] = rng.geometric(0.5, detected.sum())
            matrix[:, start:start + width] = block
        loom.create_group("layers")
        loom["row_attrs/Gene"] = np.array([f"GENE{j}".encode() for j in range(GENES)])
        loom["row_attrs/Accession"] = np.array([f"ENSG{j:011d}".encode() for j in range(GENES)])
        loom["col_attrs/CellID"] = np.array([f"CELL{i:06d}-1".encode() for i in range(n_cells)])
        loom["col_attrs/ClusterName"] = np.array([f"type{i % 11}".encode() for i in range(n_cells)])
        loom.attrs["LOOM_SPEC_VERSION"] = "3.0.0"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/loom-scale"))
    parser.add_argument("--cells", type=int, default=68_579)
    arguments = parser.parse_args()
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    path = arguments.workdir / f"cells_{arguments.cells}.loom"
    if not path.exists():
        started = time.perf_counter()
        write_loom(path, arguments.cells)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    cells = read_loom_counts(path, "ClusterName", None)
    elapsed = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"read {path.name}: {cells.n_obs} cells x {cells.n_vars} genes, {cells.X.nnz} counts stored, "
          f"{elapsed:.1f} s, peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
