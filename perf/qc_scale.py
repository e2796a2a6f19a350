"""Benchmark: the qc step at PBMC68k size, real cells capped at qc.max_real_cells beside the simulated ones.

Generates PBMC68k-shaped stand-ins (20,387 genes, 11 cell types, Poisson counts around per-type
profiles with log-normal libraries of a few thousand counts): the time QC takes does not depend on
who made the cells. For each number of simulated cells given, runs the qc step as the rule does
(seed 0, 10 markers) and prints its wall time; the peak resident memory is the whole process's.

    .venv/bin/python perf/qc_scale.py --simulated-cells 1100 11000 55000
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import tempfile
import time
from pathlib import Path

import cvaesim  # noqa: F401  (first: it sets TensorFlow's CPU options before TensorFlow loads)

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from cvaesim.steps import qc

N_GENES = 20_387
CELL_TYPES = [f"type_{i}" for i in range(11)]
OUTPUTS = {"summary": "tsv", "markers": "tsv", "marker_overlap": "tsv", "violins": "png", "pca": "png", "umap": "png",
           "marker_dotplot": "png"}


def stand_in_cells(n_cells: int, prefix: str, profiles: np.ndarray, rng: np.random.Generator) -> ad.AnnData:
    labels = rng.integers(0, len(CELL_TYPES), n_cells)
    blocks = []
    for start in range(0, n_cells, 5_000):  # dense a block at a time
        block = labels[start:start + 5_000]
        libraries = rng.lognormal(7.5, 0.4, len(block))
        blocks.append(sp.csr_matrix(rng.poisson(profiles[block] * libraries[:, None]).astype(np.int32)))
    obs = pd.DataFrame({"cell_type": pd.Categorical(np.array(CELL_TYPES)[labels], categories=CELL_TYPES)},
                       index=[f"{prefix}{i}" for i in range(n_cells)])
    return ad.AnnData(X=sp.vstack(blocks, format="csr"), obs=obs,
                      var=pd.DataFrame(index=[f"GENE{j}" for j in range(N_GENES)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--simulated-cells", type=int, nargs="+", default=[1_100, 11_000])
    parser.add_argument("--real-cells", type=int, default=20_000, help="before the cap")
    parser.add_argument("--max-real-cells", type=int, default=10_000, help="qc.max_real_cells")
    arguments = parser.parse_args()
    rng = np.random.default_rng(0)
    profiles = rng.gamma(0.2, 1.0, size=(len(CELL_TYPES), N_GENES))
    profiles /= profiles.sum(axis=1, keepdims=True)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {N_GENES} genes, {arguments.real_cells} real "
          f"cells, of which qc keeps {min(arguments.real_cells, arguments.max_real_cells)}")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        stand_in_cells(arguments.real_cells, "real_", profiles, rng).write_h5ad(folder / "real.h5ad")
        for n_simulated in arguments.simulated_cells:
            stand_in_cells(n_simulated, "simulated_", profiles, rng).write_h5ad(folder / "simulated.h5ad")
            outputs = {name: str(folder / f"{name}.{suffix}") for name, suffix in OUTPUTS.items()}
            started = time.perf_counter()
            qc(str(folder / "real.h5ad"), str(folder / "simulated.h5ad"), outputs, 0, arguments.max_real_cells, 10)
            print(f"{n_simulated} simulated cells: qc {time.perf_counter() - started:.1f} s, peak RSS so far "
                  f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB", flush=True)


if __name__ == "__main__":
    main()
