from __future__ import annotations

import gzip
import io
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import cvaesim  # noqa: F401  (first: it sets TensorFlow's CPU options before TensorFlow loads)

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import yaml

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "resources" / "embedded"
EMBEDDED_TARBALL = EMBEDDED / "pbmc68k_reduced_filtered_gene_bc_matrices.tar.gz"
EMBEDDED_ANNOTATION = EMBEDDED / "pbmc68k_reduced_barcodes_annotation.tsv"
EMBEDDED_H5AD = EMBEDDED / "pbmc68k_reduced_counts.h5ad"

# PBMC68k's awkward cell-type names, plus worse ones users bring.
AWKWARD_TYPES = [
    "CD8+/CD45RA+ Naive Cytotoxic",
    "CD4+/CD45RA+/CD25- Naive T",
    "B cell (memory) #2",
    "Zelltyp ß/γ *mixed* 'quoted'",
]


class Server:
    """Serves ``files`` on 127.0.0.1; ``cut_once`` names paths whose first response stops halfway, and each
    response waits ``delay_seconds`` before its body (a large file's download time)."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.cut_once: set[str] = set()
        self.requests: list[dict] = []
        self.delay_seconds = 0.0
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append({"path": self.path, **dict(self.headers)})
                body = server.files.get(self.path)
                if body is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                time.sleep(server.delay_seconds)
                if self.path in server.cut_once:
                    server.cut_once.discard(self.path)
                    self.wfile.write(body[start:start + (len(body) - start) // 2])
                    self.wfile.flush()
                    self.connection.close()
                    return
                self.wfile.write(body[start:])

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def random_counts(n_cells: int, n_genes: int, cell_types: list[str], seed: int = 0) -> ad.AnnData:
    """Sparse negative-binomial counts with a per-type mean profile: honest synthetic cells."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(cell_types, size=n_cells)
    profiles = {name: rng.gamma(0.3, 2.0, size=n_genes) for name in cell_types}
    means = np.stack([profiles[name] for name in labels])
    counts = rng.negative_binomial(2, 2 / (2 + means)).astype(np.int32)
    return ad.AnnData(
        X=sp.csr_matrix(counts),
        obs=pd.DataFrame({"cell_type": labels}, index=[f"CELL{i:05d}-1" for i in range(n_cells)]),
        var=pd.DataFrame(index=[f"GENE{j}" for j in range(n_genes)]),
    )


def add_member(archive: tarfile.TarFile, name: str, payload: bytes, kind: bytes = tarfile.REGTYPE) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    member.type = kind
    archive.addfile(member, io.BytesIO(payload))


def with_antibodies(adata: ad.AnnData, antibodies: int) -> tuple[sp.csr_matrix, list, list, list]:
    """Counts, feature ids, names and types of ``adata`` followed by ``antibodies`` Antibody Capture
    features, as Cell Ranger 3+ writes a CITE-seq matrix."""
    counts = sp.csr_matrix(adata.X)
    ids = [f"ENSG{j:011d}" for j in range(adata.n_vars)] + [f"ADT{j}_TotalSeqB" for j in range(antibodies)]
    names = list(adata.var_names) + [f"ADT{j}" for j in range(antibodies)]
    types = ["Gene Expression"] * adata.n_vars + ["Antibody Capture"] * antibodies
    if antibodies:
        extra = sp.csr_matrix(np.arange(adata.n_obs * antibodies).reshape(adata.n_obs, antibodies) % 7)
        counts = sp.hstack([counts, extra], format="csr")
    return counts, ids, names, types


def write_tarball(path: Path, adata: ad.AnnData, folder: str = "filtered_matrices_mex/hg19", v3: bool = False,
                  extra: dict[str, bytes] | None = None, antibodies: int = 0, prefix: str = "",
                  compression: str = "gz") -> Path:
    """A 10x tarball in the v2 (genes.tsv) or v3 (gzipped features.tsv.gz, with ``antibodies`` extra
    Antibody Capture features) layout; ``prefix`` goes before each file's name, as on GEO, and
    ``folder`` may be "" (files at the top, as in GEO's uncompressed ``GSE..._RAW.tar``: ``compression`` "")."""
    counts, ids, names, types = with_antibodies(adata, antibodies)
    coo = sp.coo_matrix(counts.T)
    field = "real" if np.issubdtype(coo.dtype, np.floating) else "integer"
    mtx = f"%%MatrixMarket matrix coordinate {field} general\n%\n{coo.shape[0]} {coo.shape[1]} {coo.nnz}\n"
    mtx += "".join(f"{g + 1} {c + 1} {v}\n" for g, c, v in zip(coo.row, coo.col, coo.data))
    genes = "".join(f"{gene_id}\t{name}\t{kind}\n" for gene_id, name, kind in zip(ids, names, types))
    barcodes = "".join(f"{name}\n" for name in adata.obs_names)
    files = {"matrix.mtx": mtx, "genes.tsv": genes, "barcodes.tsv": barcodes}
    if v3:
        files = {"matrix.mtx.gz": mtx, "features.tsv.gz": genes, "barcodes.tsv.gz": barcodes}
    with tarfile.open(path, f"w:{compression}") as archive:
        for name, text in files.items():
            payload = gzip.compress(text.encode()) if name.endswith(".gz") else text.encode()
            add_member(archive, str(Path(folder) / f"{prefix}{name}"), payload)
        for name, payload in (extra or {}).items():
            add_member(archive, name, payload)
    return path


def write_10x_h5(path: Path, adata: ad.AnnData, v3: bool = True, antibodies: int = 0, genome: str = "hg19") -> Path:
    """A Cell Ranger HDF5 matrix: v3 (``matrix`` group, with ``antibodies`` extra Antibody Capture
    features) or v2 (a ``genome`` group, added to the file if it exists), genes x cells compressed by cell,
    names as bytes."""
    import h5py

    counts, ids, names, types = with_antibodies(adata, antibodies)
    with h5py.File(path, "w" if v3 else "a") as h5:
        group = h5.create_group("matrix" if v3 else genome)
        group["data"], group["indices"], group["indptr"] = counts.data, counts.indices, counts.indptr
        group["shape"] = np.array([counts.shape[1], counts.shape[0]], dtype=np.int32)
        group["barcodes"] = np.array(adata.obs_names, dtype="S")
        if v3:
            features = group.create_group("features")
            features["id"], features["name"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
            features["feature_type"] = np.array(types, dtype="S")
        else:
            group["genes"], group["gene_names"] = np.array(ids, dtype="S"), np.array(names, dtype="S")
    return path


def write_annotation(path: Path, adata: ad.AnnData) -> Path:
    table = pd.DataFrame({"TSNE.1": 0.0, "TSNE.2": 0.0, "barcodes": adata.obs_names,
                          "celltype": adata.obs["cell_type"].astype(str).to_numpy()})
    table.to_csv(path, sep="\t", index=False)
    return path


def write_loom(path: Path, cells: ad.AnnData, label_attribute: str | None = "ClusterName", layers: dict | None = None,
               strings: str = "fixed") -> Path:
    """A loom file as loompy writes one: genes x cells float32 in /matrix (chunked, gzipped), gene symbols and
    ids in row_attrs (Gene, Accession), cell names and labels in col_attrs (CellID, ``label_attribute``), and
    ``layers`` (cells x genes arrays) beside the main matrix; ``strings`` 'fixed' (loompy's bytes) or
    'variable' (h5py's variable-length strings)."""
    def text(values):
        values = [str(value) for value in values]
        if strings == "fixed":  # loompy writes ASCII, other characters as XML references ('ß' as '&#223;')
            return np.array([value.encode("ascii", "xmlcharrefreplace") for value in values], dtype="S")
        return np.array(values, dtype=h5py.string_dtype())

    with h5py.File(path, "w") as loom:
        options = dict(chunks=(min(64, cells.n_vars), min(64, cells.n_obs)), compression="gzip")
        loom.create_dataset("matrix", data=cells.X.toarray().T.astype(np.float32), **options)
        loom.create_group("layers")
        for name, values in (layers or {}).items():
            loom["layers"].create_dataset(name, data=np.asarray(values).T.astype(np.float32), **options)
        loom.create_group("row_attrs")
        loom["row_attrs"]["Gene"] = text(cells.var_names)
        loom["row_attrs"]["Accession"] = text(f"ENSG{j:011d}" for j in range(cells.n_vars))
        loom.create_group("col_attrs")
        loom["col_attrs"]["CellID"] = text(cells.obs_names)
        loom["col_attrs"]["nUMI"] = np.asarray(cells.X.sum(axis=1)).ravel().astype(np.float32)
        if label_attribute is not None:
            loom["col_attrs"][label_attribute] = text(cells.obs["cell_type"])
        loom.create_group("col_graphs")
        loom.create_group("row_graphs")
        loom.attrs["LOOM_SPEC_VERSION"] = "3.0.0"
    return path


@pytest.fixture
def small_cells() -> ad.AnnData:
    return random_counts(120, 50, AWKWARD_TYPES)


# A quick configuration for end-to-end runs.
EPOCHS = 30
CELLS_PER_TYPE = 60
LEFT_OUT = {".git", ".venv", ".venv-lower", "results", "logs", "benchmarks", ".snakemake", ".pytest_cache",
            "__pycache__", "datasets", "downloads", "report.html"}


def copy_repository(destination: Path) -> Path:
    """The repository as a fresh clone has it (no results, downloads or environments)."""
    shutil.copytree(REPO, destination, ignore=lambda folder, names: [name for name in names if name in LEFT_OUT])
    return destination


def snakemake(workdir: Path, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "snakemake", "--cores", "2", *arguments],
        cwd=workdir, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    if check and result.returncode != 0:
        pytest.fail(f"snakemake {' '.join(arguments)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def planned_jobs(workdir: Path, *arguments: str) -> dict[str, int]:
    """The job counts a dry run lists."""
    output = snakemake(workdir, "--dry-run", "--quiet", "rules", *arguments).stdout
    if "Nothing to be done" in output:
        return {}
    table = output.split("Job stats:")[1].split("\n\n")[0].splitlines()[3:]
    jobs = dict(line.split() for line in table)
    jobs.pop("total")
    return {rule: int(count) for rule, count in jobs.items()}


def write_config(path: Path, settings: dict) -> str:
    path.write_text(yaml.safe_dump(settings))
    return str(path)


QUICK = {"train": {"epochs": EPOCHS}, "simulate": {"cells_per_type": CELLS_PER_TYPE}, "qc": {"max_real_cells": 400},
         "evaluate": {"training_cells": True}}
QUICK_RUN = ["--configfile", "config/config.yaml", "quick.yaml"]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    """A copy of the repository where the embedded dataset ran locally with the quick configuration."""
    root = copy_repository(tmp_path_factory.mktemp("workflow") / "repo")
    write_config(root / "quick.yaml", QUICK)
    snakemake(root, *QUICK_RUN)
    return root
