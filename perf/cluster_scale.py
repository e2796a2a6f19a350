"""Benchmark: the cluster rule on a PBMC68k-sized matrix without cell types.

Uses ``pbmc68k_scale.py``'s generated tarball (68,579 cells x 32,738 genes in PBMC68k's 11 types' numbers,
written once into ``--workdir``), clusters its cells as the cluster rule does (``steps.cluster``) and prints
the wall time, the peak resident memory, the clusters found and their agreement with the generated types
(adjusted Rand index; 1 is the generated types exactly).

    .venv/bin/python perf/cluster_scale.py --workdir /tmp/pbmc68k-scale [--resolution 1.0]
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import pandas as pd
from sklearn.metrics import adjusted_rand_score

from cvaesim.steps import cluster

sys.path.insert(0, str(Path(__file__).parent))
from pbmc68k_scale import generate  # noqa: E402  (the generator of the PBMC68k-shaped input)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pbmc68k-scale"))
    parser.add_argument("--resolution", type=float, default=1.0)
    arguments = parser.parse_args()
    tarball, annotation = generate(arguments.workdir)
    output = arguments.workdir / f"clusters_{arguments.resolution:g}.tsv"
    started = time.perf_counter()
    cluster(str(tarball), str(output), "10x_tarball", arguments.resolution, seed=0)
    elapsed = time.perf_counter() - started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    clusters = pd.read_csv(output, sep="\t", dtype=str).set_index("barcode")["cluster"]
    types = pd.read_csv(annotation, sep="\t").set_index("barcodes")["celltype"].reindex(clusters.index)
    print(f"clustered {len(clusters)} cells into {clusters.nunique()} clusters (resolution {arguments.resolution:g}) "
          f"in {elapsed:.1f} s, peak RSS {peak_gb:.2f} GB; adjusted Rand index against the generated types "
          f"{adjusted_rand_score(types, clusters):.3f}")


if __name__ == "__main__":
    main()
