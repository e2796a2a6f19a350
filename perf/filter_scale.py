"""Benchmark: the filter rule on a PBMC68k-sized matrix, keeping every gene or only the most variable.

Uses ``pbmc68k_scale.py``'s generated tarball and annotation (68,579 cells x 32,738 genes in PBMC68k's 11 types'
numbers, written once into ``--workdir``), filters them as the filter rule does (``steps.filter_dataset``), with
``filter.top_genes`` set where ``--top-genes`` is given, and prints the cells and genes kept, the wall time and the
peak resident memory (one setting per run, so that each peak is its own).

    .venv/bin/python perf/filter_scale.py --workdir /tmp/pbmc68k-scale [--top-genes 2000]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import anndata as ad

from cvaesim.steps import filter_dataset

sys.path.insert(0, str(Path(__file__).parent))
from pbmc68k_scale import generate  # noqa: E402  (the generator of the PBMC68k-shaped input)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pbmc68k-scale"))
    parser.add_argument("--top-genes", type=int, help="filter.top_genes (default: every gene)")
    arguments = parser.parse_args()
    tarball, annotation = generate(arguments.workdir)
    thresholds = {} if arguments.top_genes is None else {"top_genes": arguments.top_genes}
    output = arguments.workdir / f"filtered_{arguments.top_genes or 'all'}.h5ad"
    started = time.perf_counter()
    filter_dataset(str(tarball), str(output), "10x_tarball", "celltype", str(annotation), thresholds=thresholds)
    elapsed = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    filtered = ad.read_h5ad(output, backed="r")
    print(f"top_genes {arguments.top_genes}: kept {filtered.n_obs} cells x {filtered.n_vars} genes in {elapsed:.1f} s, "
          f"peak RSS {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
