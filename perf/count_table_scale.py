"""Benchmark: reading a dense text count table (the counts_table format) at PBMC68k's size.

Writes a genes x cells CSV of 20,387 genes and ``--cells`` cells (4% of the values non-zero, about
PBMC68k's density; 68,579 cells make 2.9 GB of text) with its annotation, then reads it as the filter
rule does and prints the wall time and peak resident memory of the read (``--gzip`` compresses the table
first, as GEO ships them).

    .venv/bin/python perf/count_table_scale.py --workdir /tmp/count-table-scale --cells 68579
"""

from __future__ import annotations

import argparse
import gzip
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cvaesim.io import container_problem, read_counts_table

GENES = 20_387


def write_table(path: Path, n_cells: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        handle.write("," + ",".join(f"CELL{i:06d}-1" for i in range(n_cells)) + "\n")
        for gene in range(GENES):
            row = np.zeros(n_cells, dtype=np.int64)
            detected = rng.random(n_cells) < 0.04
            row[detected] = rng.geometric(0.5, detected.sum())
            handle.write(f"GENE{gene}," + ",".join(map(str, row.tolist())) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/count-table-scale"))
    parser.add_argument("--cells", type=int, default=68_579)
    parser.add_argument("--gzip", action="store_true", help="read a gzipped copy of the table")
    arguments = parser.parse_args()
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    table = arguments.workdir / f"counts_{arguments.cells}.csv"
    if not table.exists():
        started = time.perf_counter()
        write_table(table, arguments.cells)
        print(f"wrote {table} ({table.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")
    if arguments.gzip:
        compressed = table.with_suffix(".csv.gz")
        if not compressed.exists():
            with open(table, "rb") as source, gzip.open(compressed, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target)
        table = compressed
    barcodes = pd.Index([f"CELL{i:06d}-1" for i in range(arguments.cells)])
    started = time.perf_counter()
    problem = container_problem(table, "matrix.txt")
    checked = time.perf_counter() - started
    started = time.perf_counter()
    cells = read_counts_table(table, barcodes)
    elapsed = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"download check: {problem or 'passed'} in {checked:.1f} s")
    print(f"read {table.name}: {cells.n_obs} cells x {cells.n_vars} genes, {cells.X.nnz} counts stored, "
          f"{elapsed:.1f} s, peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
