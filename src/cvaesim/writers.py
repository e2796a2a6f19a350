"""Write simulated cells as they are generated, so memory stays flat however many are asked for.

Each writer takes an iterable of (integer counts CSR batch, cell type) and writes to a
temporary path renamed into place when complete.
"""

from __future__ import annotations

import gzip
import io
import shutil
from collections.abc import Iterable

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import InputError
from .io import atomic_output

Batches = Iterable[tuple[sp.csr_matrix, str]]
# The original's table is dense: refuse what would not fit in about 1 GB.
MAX_TABLE_ENTRIES = 250_000_000
# Batches are appended to an .h5ad this many cells at a time: each append re-reads and
# re-compresses a chunk, so fewer, larger appends write faster (measured 0.47 -> 0.31 ms per cell).
APPEND_CELLS = 2048
# gzip records the time of writing in its header unless told a fixed one: same seed, same bytes.
REPRODUCIBLE_GZIP = {"method": "gzip", "mtime": 0}


def cell_names(n_cells: int) -> list[str]:
    return [f"simulated_{i}" for i in range(n_cells)]


def write_h5ad(batches: Batches, var: pd.DataFrame, cell_types: list[str], uns: dict, path) -> int:
    """Append each batch to the on-disk sparse X of an .h5ad; returns the number of cells."""
    codes = []
    with atomic_output(path) as temporary:
        empty = ad.AnnData(X=sp.csr_matrix((0, len(var)), dtype=np.int32), var=var, uns={"simulation": uns})
        # gzip level 1: files about 5% larger than the default level 4, written 25% faster.
        empty.write_h5ad(temporary, compression="gzip", compression_opts=1)
        with h5py.File(temporary, "r+") as handle:
            matrix = ad.io.sparse_dataset(handle["X"])
            pending, pending_cells = [], 0
            for counts, cell_type in batches:
                pending.append(counts)
                pending_cells += counts.shape[0]
                codes.append(np.full(counts.shape[0], cell_types.index(cell_type), dtype=np.int32))
                if pending_cells >= APPEND_CELLS:
                    matrix.append(sp.vstack(pending, format="csr", dtype=np.int32))
                    pending, pending_cells = [], 0
            if pending:
                matrix.append(sp.vstack(pending, format="csr", dtype=np.int32))
            codes = np.concatenate(codes) if codes else np.zeros(0, dtype=np.int32)
            obs = pd.DataFrame({"cell_type": pd.Categorical.from_codes(codes, categories=cell_types)},
                               index=cell_names(len(codes)))
            del handle["obs"]
            ad.io.write_elem(handle, "obs", obs)
    return len(codes)


def write_10x(batches: Batches, var: pd.DataFrame, path) -> int:
    """A 10x v3 matrix folder (matrix.mtx.gz, features.tsv.gz, barcodes.tsv.gz) plus cell_types.tsv."""
    gene_ids = var["gene_ids"] if "gene_ids" in var else pd.Series(var.index, index=var.index)
    with atomic_output(path) as folder:
        folder.mkdir()
        entries, n_cells, labels = 0, 0, []
        body = folder / "entries.txt"
        with open(body, "w") as out:
            for counts, cell_type in batches:
                coo = counts.tocoo()  # row-major: cell by cell, as 10x writes them
                pd.DataFrame({"gene": coo.col + 1, "cell": coo.row + 1 + n_cells, "count": coo.data}).to_csv(
                    out, sep=" ", header=False, index=False)
                entries += coo.nnz
                n_cells += counts.shape[0]
                labels.extend([cell_type] * counts.shape[0])
        with (gzip.GzipFile(folder / "matrix.mtx.gz", "wb", compresslevel=4, mtime=0) as compressed,
              io.TextIOWrapper(compressed) as out, open(body) as source):
            out.write("%%MatrixMarket matrix coordinate integer general\n")
            out.write(f"{len(var)} {n_cells} {entries}\n")
            shutil.copyfileobj(source, out)
        body.unlink()
        barcodes = cell_names(n_cells)
        pd.DataFrame({"id": gene_ids.to_numpy(), "name": var.index, "type": "Gene Expression"}).to_csv(
            folder / "features.tsv.gz", sep="\t", header=False, index=False, compression=REPRODUCIBLE_GZIP)
        pd.Series(barcodes).to_csv(folder / "barcodes.tsv.gz", header=False, index=False, compression=REPRODUCIBLE_GZIP)
        pd.DataFrame({"barcode": barcodes, "cell_type": labels}).to_csv(folder / "cell_types.tsv", sep="\t",
                                                                        index=False)
    return n_cells


def write_expected(table: pd.DataFrame, path) -> None:
    """The simulated cells' known truth (:class:`~cvaesim.simulation.ExpectedExpression`) as a TSV."""
    with atomic_output(path) as temporary:
        table.to_csv(temporary, sep="\t", index=False, float_format="%.6g")


def cell_type_batches(cells: ad.AnnData, size: int = APPEND_CELLS) -> Batches:
    """An AnnData's cells, in their order, as writer batches: runs of one cell type, at most ``size`` cells."""
    counts = sp.csr_matrix(cells.X)
    labels = cells.obs["cell_type"].astype(str).to_numpy()
    run_starts = np.flatnonzero(labels[1:] != labels[:-1]) + 1
    for start, stop in zip(np.r_[0, run_starts], np.r_[run_starts, len(labels)]):
        for begin in range(start, stop, size):
            yield counts[begin:min(begin + size, stop)], labels[start]


def original_table(simulated: ad.AnnData) -> pd.DataFrame:
    """The original's layout: one row per cell, one column per gene, then a label column."""
    table = pd.DataFrame(simulated.X.toarray(), columns=simulated.var_names, index=simulated.obs_names)
    table["cell_type"] = simulated.obs["cell_type"].astype(str).to_numpy()
    return table


def table_problem(n_cells: int, n_genes: int) -> str | None:
    """Why the original's dense table cannot hold this many cells, or None when it can."""
    if n_cells * n_genes <= MAX_TABLE_ENTRIES:
        return None
    return (f"{n_cells} cells x {n_genes} genes is too large for the original's dense table "
            f"(limit {MAX_TABLE_ENTRIES:,} entries)")


def write_table(simulated: ad.AnnData, path) -> None:
    """The original's HDF5 table (pandas, key ``simulated``): dense, so for modest cell numbers only."""
    if problem := table_problem(simulated.n_obs, simulated.n_vars):
        raise InputError(f"{path}: {problem}; write h5ad or 10x instead")
    with atomic_output(path) as temporary:
        original_table(simulated).to_hdf(temporary, key="simulated", format="fixed", complevel=5)
