"""Benchmark: reading an input format (a text count table, a loom file, an .h5ad) at PBMC68k's size.

Writes 20,387 genes x ``--cells`` cells (4% of the values non-zero, about PBMC68k's density) in the
``--format`` given, then reads it as the filter rule does and prints the wall time and peak resident memory
of the read:

- ``counts_table``: a genes x cells CSV (68,579 cells make 2.9 GB of text) with its barcodes; ``--gzip``
  compresses it first, as GEO ships them; the download check is timed too.
- ``loom``: a loom file as loompy writes one (genes x cells float32 in ``/matrix``, chunks of 64 x 64, gzip),
  written a block of cells at a time, labelled by a column attribute.
- ``h5ad``: an .h5ad as CELLxGENE ships one (log-normalised float32 ``X``, float32 counts in ``.raw``, genes
  named by Ensembl id with their symbols in ``var['feature_name']``), read with ``counts_layer: raw``.

    .venv/bin/python perf/reader_scale.py --format counts_table --workdir /tmp/reader-scale --cells 68579 --gzip
    .venv/bin/python perf/reader_scale.py --format loom --workdir /tmp/reader-scale --cells 68579
    .venv/bin/python perf/reader_scale.py --format h5ad --workdir /tmp/reader-scale --cells 68579
"""

from __future__ import annotations

import argparse
import gzip
import resource
import shutil
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cvaesim.download import container_problem
from cvaesim.io import read_h5ad_counts, read_loom_counts
from cvaesim.tables import read_counts_table

GENES = 20_387
CELLS_PER_WRITE = 2_048


def barcodes(n_cells: int) -> list[str]:
    return [f"CELL{i:06d}-1" for i in range(n_cells)]


def write_table(path: Path, n_cells: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with open(path, "w") as handle:
        handle.write("," + ",".join(barcodes(n_cells)) + "\n")
        for gene in range(GENES):
            row = np.zeros(n_cells, dtype=np.int64)
            detected = rng.random(n_cells) < 0.04
            row[detected] = rng.geometric(0.5, detected.sum())
            handle.write(f"GENE{gene}," + ",".join(map(str, row.tolist())) + "\n")


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
        loom["col_attrs/CellID"] = np.array([name.encode() for name in barcodes(n_cells)])
        loom["col_attrs/ClusterName"] = np.array([f"type{i % 11}".encode() for i in range(n_cells)])
        loom.attrs["LOOM_SPEC_VERSION"] = "3.0.0"


def write_h5ad(path: Path, n_cells: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    blocks = []
    for start in range(0, n_cells, CELLS_PER_WRITE):
        width = min(CELLS_PER_WRITE, n_cells - start)
        block = sp.random(width, GENES, density=0.04, format="csr", dtype=np.float32, random_state=rng)
        block.data = rng.geometric(0.5, block.nnz).astype(np.float32)
        blocks.append(block)
    counts = sp.vstack(blocks, format="csr")
    ids = [f"ENSG{j:011d}" for j in range(GENES)]
    cells = ad.AnnData(counts, obs=pd.DataFrame({"cell_type": [f"type{i % 11}" for i in range(n_cells)]},
                                                index=barcodes(n_cells)),
                       var=pd.DataFrame({"feature_name": [f"GENE{j}" for j in range(GENES)]}, index=ids))
    cells.raw = cells
    normalised = counts.multiply(1e4 / counts.sum(axis=1)).tocsr().astype(np.float32)
    normalised.data = np.log1p(normalised.data)
    cells.X = normalised
    cells.write_h5ad(path)


WRITERS = {"counts_table": write_table, "loom": write_loom, "h5ad": write_h5ad}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--format", choices=sorted(WRITERS), required=True)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/reader-scale"))
    parser.add_argument("--cells", type=int, default=68_579)
    parser.add_argument("--gzip", action="store_true", help="counts_table: read a gzipped copy of the table")
    arguments = parser.parse_args()
    arguments.workdir.mkdir(parents=True, exist_ok=True)
    suffix = {"counts_table": ".csv", "loom": ".loom", "h5ad": ".h5ad"}[arguments.format]
    path = arguments.workdir / f"{'counts' if arguments.format == 'counts_table' else 'cells'}_{arguments.cells}{suffix}"
    if not path.exists():
        started = time.perf_counter()
        WRITERS[arguments.format](path, arguments.cells)
        print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s")
    if arguments.format == "counts_table" and arguments.gzip:
        compressed = path.with_suffix(".csv.gz")
        if not compressed.exists():
            with open(path, "rb") as source, gzip.open(compressed, "wb", compresslevel=6) as target:
                shutil.copyfileobj(source, target)
        path = compressed
    if arguments.format == "counts_table":
        started = time.perf_counter()
        problem = container_problem(path, "matrix.txt")
        print(f"download check: {problem or 'passed'} in {time.perf_counter() - started:.1f} s")
    started = time.perf_counter()
    if arguments.format == "counts_table":
        cells = read_counts_table(path, pd.Index(barcodes(arguments.cells)))
    elif arguments.format == "loom":
        cells = read_loom_counts(path, "ClusterName", None)
    else:
        cells = read_h5ad_counts(path, "cell_type", "raw")
    elapsed = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"read {path.name}: {cells.n_obs} cells x {cells.n_vars} genes, {cells.X.nnz} counts stored, "
          f"{elapsed:.1f} s, peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
