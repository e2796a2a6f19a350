"""Benchmark: the evaluate step at PBMC68k size, 10,000 simulated cells against 27,432 real test cells.

Uses the filtered matrix that ``perf/pbmc68k_scale.py`` writes (68,579 PBMC68k-shaped cells,
20,387 genes); the test cells are the reshape rule's split (40%, stratified, seed 0). The
simulated cells are stand-ins, drawn by the evaluation's own negative-binomial baseline in
the test cells' type proportions: the time to score cells does not depend on who made them.
Prints the wall time and peak resident memory of the scoring (``--repeats`` as ``evaluate.repeats``).

    .venv/bin/python perf/pbmc68k_scale.py --workdir /tmp/pbmc68k-scale
    .venv/bin/python perf/evaluate_scale.py --workdir /tmp/pbmc68k-scale
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import cvaesim  # noqa: F401  (first: it sets TensorFlow's CPU options before TensorFlow loads)

import anndata as ad
import scipy.sparse as sp

from cvaesim.evaluation import EvaluationSettings, baseline, evaluate, overall_table
from cvaesim.images import stratified_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pbmc68k-scale"))
    parser.add_argument("--simulated-cells", type=int, default=10_000)
    parser.add_argument("--threads", type=int, default=2, help="as the evaluate rule's threads")
    parser.add_argument("--training-cells", action="store_true",
                        help="evaluate.training_cells: true (score a sample of the training cells too)")
    parser.add_argument("--repeats", type=int, default=1, help="evaluate.repeats (matched samples averaged over)")
    arguments = parser.parse_args()
    filtered = arguments.workdir / "results" / "pbmc68k_shaped" / "filtered.h5ad"
    if not filtered.exists():
        raise SystemExit(f"{filtered} is missing: run perf/pbmc68k_scale.py --workdir {arguments.workdir} first")
    real = ad.read_h5ad(filtered)
    labels = real.obs["cell_type"].astype(str).to_numpy()
    is_test = stratified_split(labels, 0.4, seed=0)
    shares = real.obs["cell_type"][is_test].value_counts(normalize=True)
    plan = {name: max(1, round(share * arguments.simulated_cells)) for name, share in shares.items()}
    counts = sp.csr_matrix(real.X)
    simulated = baseline(counts[~is_test], labels[~is_test], plan, "nb", seed=1)
    simulated.var_names = real.var_names
    started = time.perf_counter()
    settings = EvaluationSettings(n_jobs=arguments.threads, training_cells=arguments.training_cells,
                                  repeats=arguments.repeats)
    result = evaluate(real, is_test, simulated, settings)
    seconds = time.perf_counter() - started
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {is_test.sum()} real test cells, "
          f"{simulated.n_obs} simulated cells, {real.n_vars} genes")
    print(f"evaluate: {seconds:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(the process, including the data)")
    print(overall_table(result.metrics).round(3).to_string())


if __name__ == "__main__":
    main()
