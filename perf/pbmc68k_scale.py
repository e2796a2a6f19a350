"""Benchmark: PBMC68k at full size through download -> filter -> reshape -> one training epoch.

PBMC68k cannot be downloaded here, so this generates an input of the same shape and format:
a gzip tarball ``filtered_matrices_mex/hg19/{matrix.mtx,genes.tsv,barcodes.tsv}`` with
68,579 cells x 32,738 genes (12,351 of them never detected), and the annotation TSV
(``TSNE.1 TSNE.2 barcodes celltype``) with PBMC68k's 11 cell types in PBMC68k's numbers.
Counts are multinomial draws from per-type gene profiles, with log-normal library sizes
chosen so that cells have a few hundred to a thousand detected genes, as PBMC68k's do.

It then runs the workflow (``download`` from a file:// address, ``filter``, ``reshape``,
``train`` for one epoch; with ``--whole-workflow`` also ``simulate``, ``original_table``, ``qc``
and ``evaluate``) and prints wall time and peak resident memory per step, read from
Snakemake's benchmark files.

    .venv/bin/python perf/pbmc68k_scale.py --workdir /tmp/pbmc68k-scale [--whole-workflow]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

REPO = Path(__file__).resolve().parents[1]
N_GENES = 32_738
N_DETECTABLE = 20_387
# Cells per type in PBMC68k's annotation (68,579 in all).
CELL_TYPES = {
    "CD8+ Cytotoxic T": 20_773,
    "CD8+/CD45RA+ Naive Cytotoxic": 16_666,
    "CD56+ NK": 8_776,
    "CD4+/CD25 T Reg": 6_187,
    "CD19+ B": 5_908,
    "CD4+/CD45RO+ Memory": 3_061,
    "CD14+ Monocyte": 2_862,
    "Dendritic": 2_099,
    "CD4+/CD45RA+/CD25- Naive T": 1_873,
    "CD34+": 277,
    "CD4+ T Helper2": 97,
}
MEX = "filtered_matrices_mex/hg19"


def barcodes(n: int, rng: np.random.Generator) -> np.ndarray:
    codes = rng.choice(4**14, size=n * 2, replace=False)[:n]
    letters = np.array(list("ACGT"))
    digits = (codes[:, None] // 4 ** np.arange(14)[::-1]) % 4
    return np.array(["".join(row) + "-1" for row in letters[digits]])


def generate(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """Write the PBMC68k-shaped tarball and annotation into ``folder``."""
    tarball = folder / "fresh_68k_pbmc_donor_a_filtered_gene_bc_matrices.tar.gz"
    annotation = folder / "68k_pbmc_barcodes_annotation.tsv"
    if tarball.exists() and annotation.exists():
        return tarball, annotation
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.repeat(list(CELL_TYPES), list(CELL_TYPES.values())))
    n_cells = len(labels)
    detectable = np.sort(rng.choice(N_GENES, size=N_DETECTABLE, replace=False))
    shared = rng.gamma(0.3, 1.0, size=N_DETECTABLE)
    profiles = {}
    for name in CELL_TYPES:
        weights = shared * rng.lognormal(0.0, 1.0, size=N_DETECTABLE)
        profiles[name] = np.cumsum(weights / weights.sum())
    libraries = np.clip(rng.lognormal(np.log(1000), 0.45, size=n_cells), 300, 20_000).astype(np.int64)
    # Every detectable gene is detected at least once (one count in a random cell), so the
    # filter keeps exactly PBMC68k's 20,387 genes.
    guaranteed_in = rng.integers(n_cells, size=N_DETECTABLE)

    matrix_path = folder / "matrix.mtx"
    started = time.perf_counter()
    entries = 0
    with open(matrix_path, "w") as out:
        out.write("%%MatrixMarket matrix coordinate integer general\n%\n")
        out.write(" " * 40 + "\n")  # the size line, filled in below
        for start in range(0, n_cells, 4000):
            cells = np.arange(start, min(start + 4000, n_cells))
            keys = []
            for name in CELL_TYPES:
                of_type = cells[labels[cells] == name]
                draws = np.searchsorted(profiles[name], rng.random(libraries[of_type].sum()))
                draws = np.minimum(draws, N_DETECTABLE - 1)
                keys.append(np.repeat(of_type, libraries[of_type]) * N_GENES + detectable[draws])
            guaranteed = np.flatnonzero((guaranteed_in >= cells[0]) & (guaranteed_in <= cells[-1]))
            keys.append(guaranteed_in[guaranteed] * N_GENES + detectable[guaranteed])
            unique, counts = np.unique(np.concatenate(keys), return_counts=True)
            block = pd.DataFrame({"gene": unique % N_GENES + 1, "cell": unique // N_GENES + 1, "count": counts})
            block.to_csv(out, sep=" ", header=False, index=False)
            entries += len(block)
    with open(matrix_path, "r+") as out:
        out.seek(len("%%MatrixMarket matrix coordinate integer general\n%\n"))
        out.write(f"{N_GENES} {n_cells} {entries}".ljust(40))
    print(f"generated {n_cells} cells x {N_GENES} genes, {entries} nonzero entries "
          f"({entries / n_cells:.0f} detected genes per cell) in {time.perf_counter() - started:.0f} s")

    names = barcodes(n_cells, rng)
    (folder / "barcodes.tsv").write_text("".join(f"{b}\n" for b in names))
    (folder / "genes.tsv").write_text("".join(f"ENSG{i:011d}\tGENE{i}\n" for i in range(N_GENES)))
    with tarfile.open(tarball, "w:gz", compresslevel=1) as archive:
        for member in ("matrix.mtx", "genes.tsv", "barcodes.tsv"):
            archive.add(folder / member, arcname=f"{MEX}/{member}")
            (folder / member).unlink()
    pd.DataFrame({"TSNE.1": rng.normal(size=n_cells).round(4), "TSNE.2": rng.normal(size=n_cells).round(4),
                  "barcodes": names, "celltype": labels}).to_csv(annotation, sep="\t", index=False)
    return tarball, annotation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pbmc68k-scale"))
    parser.add_argument("--cores", type=int, default=os.cpu_count())
    parser.add_argument("--whole-workflow", action="store_true", help="on to simulate, qc and evaluate")
    arguments = parser.parse_args()
    workdir = arguments.workdir.resolve()
    tarball, annotation = generate(workdir / "input")
    overlay = workdir / "benchmark.yaml"
    overlay.write_text(yaml.safe_dump({
        "dataset": "pbmc68k_shaped",
        "datasets": {"pbmc68k_shaped": {
            "format": "10x_tarball",
            "matrix": {"source": tarball.as_uri()},
            "annotation": {"source": annotation.as_uri()},
            "label_column": "celltype",
        }},
        "train": {"epochs": 1},
    }))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), "--directory", str(workdir),
         "--configfile", str(REPO / "config" / "config.yaml"), str(overlay), "--cores", str(arguments.cores),
         "--forceall", *([] if arguments.whole_workflow else ["results/pbmc68k_shaped/model/cvae.keras"])],
        check=True,
    )
    total = time.perf_counter() - started
    rows = []
    steps = ["download_matrix.tar.gz", "download_annotation.tsv", "filter", "reshape", "train"]
    for step in steps + (["simulate", "original_table", "qc", "evaluate"] if arguments.whole_workflow else []):
        measured = pd.read_csv(workdir / "benchmarks" / "pbmc68k_shaped" / f"{step}.tsv", sep="\t")
        rows.append({"step": step, "wall_s": measured["s"].iloc[0], "peak_rss_MB": measured["max_rss"].iloc[0]})
    import anndata as ad

    store = ad.read_h5ad(workdir / "results" / "pbmc68k_shaped" / "images" / "images.h5ad", backed="r")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print(f"filtered: {store.n_obs} cells x {store.n_vars} genes, image side {store.uns['image']['side']}, "
          f"split {dict(store.obs['split'].value_counts())}")
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"whole run including Snakemake start-up: {total:.0f} s")


if __name__ == "__main__":
    main()
