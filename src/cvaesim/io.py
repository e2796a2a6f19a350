"""Read count matrices as users bring them, and write outputs atomically."""

from __future__ import annotations

import contextlib
import gzip
import io
import logging
import os
import tarfile
import zlib
from pathlib import Path, PurePosixPath

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import InputError

log = logging.getLogger(__name__)

MATRIX_NAMES = ("matrix.mtx", "matrix.mtx.gz")
GENE_NAMES = ("genes.tsv", "genes.tsv.gz", "features.tsv", "features.tsv.gz")
BARCODE_NAMES = ("barcodes.tsv", "barcodes.tsv.gz")
MTX_CHUNK_ROWS = 5_000_000


@contextlib.contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path beside ``path``; rename it to ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp{os.getpid()}.{path.name}")  # keeps the suffix, which writers check
    try:
        yield temporary
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    with atomic_output(path) as temporary:
        adata.write_h5ad(temporary, compression="gzip")


def _safe_member_name(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise InputError(f"{archive}: refusing archive member {member.name!r}: it points outside the archive folder")
    if member.issym() or member.islnk():
        raise InputError(f"{archive}: refusing archive member {member.name!r}: links are not allowed")
    return name


def read_10x_tarball(path: str | Path) -> ad.AnnData:
    """Read a 10x Genomics matrix (v2 ``genes.tsv`` or v3 ``features.tsv.gz``) from a tarball.

    Members are read in memory, never extracted, and unsafe members (absolute paths,
    ``..``, links) are refused.
    """
    path = Path(path)
    try:
        archive = tarfile.open(path, "r:*")
    except (tarfile.TarError, EOFError, zlib.error, OSError) as error:
        raise InputError(f"{path}: not a readable tar archive ({error}); is the download complete?") from error
    try:
        with archive:
            members = {}
            for member in archive:
                name = _safe_member_name(path, member)
                if member.isfile():
                    members[name] = member
            folders = sorted({name.parent for name in members if name.name in MATRIX_NAMES}, key=str)
            if len(folders) != 1:
                found = ", ".join(map(str, folders)) or "none"
                raise InputError(f"{path}: expected one folder holding matrix.mtx(.gz), found {found}")
            folder = folders[0]

            def open_member(candidates: tuple[str, ...], what: str):
                for candidate in candidates:
                    member = members.get(folder / candidate)
                    if member is not None:
                        stream = archive.extractfile(member)
                        return gzip.GzipFile(fileobj=stream) if candidate.endswith(".gz") else stream
                raise InputError(f"{path}: {folder}/ has no {what} file ({' or '.join(candidates)})")

            counts = _read_matrix_market(open_member(MATRIX_NAMES, "matrix"), path)
            genes = pd.read_csv(open_member(GENE_NAMES, "gene"), sep="\t", header=None, dtype=str)
            barcodes = pd.read_csv(open_member(BARCODE_NAMES, "barcode"), sep="\t", header=None, dtype=str)[0]
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(f"{path}: the archive is truncated or corrupt ({error})") from error

    if counts.shape != (len(barcodes), len(genes)):
        raise InputError(
            f"{path}: matrix is {counts.shape[1]} genes x {counts.shape[0]} cells but the archive lists "
            f"{len(genes)} genes and {len(barcodes)} barcodes"
        )
    symbols = genes[1] if genes.shape[1] > 1 else genes[0]
    var = pd.DataFrame({"gene_ids": genes[0].to_numpy()}, index=pd.Index(symbols.to_numpy(), name=None))
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(barcodes.to_numpy())), var=var)
    if not adata.var_names.is_unique:
        log.info("%s: %d gene symbols occur more than once; suffixing them (-1, -2, ...)",
                 path, adata.var_names.duplicated().sum())
        adata.var_names_make_unique()
    return adata


def _read_matrix_market(stream, path: Path) -> sp.csr_matrix:
    """Parse a genes x cells Matrix Market stream into a cells x genes CSR of int32 counts.

    Chunked, with int32 indices, so PBMC68k's 55 million entries fit in about 1 GB.
    """
    text = io.TextIOWrapper(stream, encoding="ascii")
    header = text.readline()
    if not header.startswith("%%MatrixMarket matrix coordinate"):
        raise InputError(f"{path}: matrix.mtx is not a Matrix Market coordinate file (header {header.strip()!r})")
    field = header.split()[3]
    if field not in ("integer", "real"):
        raise InputError(f"{path}: matrix.mtx has {field!r} values; counts must be integer or real")
    line = text.readline()
    while line.startswith("%"):
        line = text.readline()
    n_genes, n_cells, n_entries = (int(value) for value in line.split())
    genes = np.empty(n_entries, dtype=np.int32)
    cells = np.empty(n_entries, dtype=np.int32)
    values = np.empty(n_entries, dtype=np.float32 if field == "real" else np.int32)
    filled = 0
    reader = pd.read_csv(text, sep=r"\s+", header=None, names=["gene", "cell", "value"],
                         dtype={"gene": np.int32, "cell": np.int32, "value": values.dtype},
                         chunksize=MTX_CHUNK_ROWS, engine="c")
    try:
        for chunk in reader:
            end = filled + len(chunk)
            if end > n_entries:
                raise InputError(f"{path}: matrix.mtx has more entries than its header's {n_entries}")
            genes[filled:end] = chunk["gene"].to_numpy()
            cells[filled:end] = chunk["cell"].to_numpy()
            values[filled:end] = chunk["value"].to_numpy()
            filled = end
    except (ValueError, pd.errors.ParserError) as error:
        raise InputError(f"{path}: matrix.mtx could not be parsed ({error})") from error
    if filled != n_entries:
        raise InputError(f"{path}: matrix.mtx has {filled} entries but its header promises {n_entries}")
    if n_entries and (genes.min() < 1 or genes.max() > n_genes or cells.min() < 1 or cells.max() > n_cells):
        raise InputError(f"{path}: matrix.mtx has indices outside its {n_genes} x {n_cells} shape")
    counts = sp.csr_matrix((values, (cells - 1, genes - 1)), shape=(n_cells, n_genes))
    check_counts(counts, path)
    return sp.csr_matrix(counts, dtype=np.int32) if counts.dtype != np.int32 else counts


def check_counts(matrix: sp.spmatrix | np.ndarray, source: str | Path) -> None:
    """Refuse matrices that are not raw counts (negative, fractional or non-finite values)."""
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise InputError(f"{source}: the count matrix holds NaN or infinite values")
    if values.min() < 0:
        raise InputError(f"{source}: the count matrix holds negative values (min {values.min()}); raw counts are needed")
    fractional = values != np.round(values)
    if np.any(fractional):
        example = values[fractional][0]
        raise InputError(
            f"{source}: the count matrix holds non-integer values (e.g. {example:g}); raw counts are needed, "
            "not normalised or log-transformed data (for an .h5ad, name the layer that holds counts)"
        )


def read_annotation(path: str | Path, barcode_column: str, label_column: str) -> pd.Series:
    """Read a barcode-to-cell-type table (tab- or comma-separated, with a header)."""
    path = Path(path)
    with open(path, encoding="utf-8", errors="replace") as handle:
        header = handle.readline()
    separator = "\t" if "\t" in header else ","
    try:
        table = pd.read_csv(path, sep=separator, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as error:
        raise InputError(f"{path}: could not be read as a table ({error})") from error
    missing = [column for column in (barcode_column, label_column) if column not in table.columns]
    if missing:
        raise InputError(
            f"{path}: no column {', '.join(map(repr, missing))}; the columns are {', '.join(map(repr, table.columns))}"
        )
    duplicated = table[barcode_column][table[barcode_column].duplicated()]
    if len(duplicated):
        raise InputError(
            f"{path}: {len(duplicated)} barcodes appear more than once (e.g. {duplicated.iloc[0]!r}); "
            "each barcode needs exactly one label"
        )
    return pd.Series(table[label_column].to_numpy(), index=table[barcode_column].to_numpy(), name="cell_type")


def read_h5ad_counts(path: str | Path, label_column: str, counts_layer: str | None) -> ad.AnnData:
    """Read counts and labels from an .h5ad; ``counts_layer`` names a layer, ``raw``, or None for X."""
    path = Path(path)
    try:
        source = ad.read_h5ad(path)
    except Exception as error:  # anndata raises many types for a broken file
        raise InputError(f"{path}: not a readable .h5ad file ({error})") from error
    if label_column not in source.obs.columns:
        raise InputError(
            f"{path}: obs has no label column {label_column!r}; its columns are "
            f"{', '.join(map(repr, source.obs.columns)) or 'none'}"
        )
    if counts_layer is None:
        counts, var = source.X, source.var
    elif counts_layer == "raw":
        if source.raw is None:
            raise InputError(f"{path}: counts_layer is 'raw' but the file has no .raw")
        counts, var = source.raw.X, source.raw.var
    elif counts_layer in source.layers:
        counts, var = source.layers[counts_layer], source.var
    else:
        raise InputError(
            f"{path}: no layer {counts_layer!r}; its layers are {', '.join(map(repr, source.layers)) or 'none'}"
        )
    counts = sp.csr_matrix(counts)
    check_counts(counts, path)
    adata = ad.AnnData(
        X=counts.astype(np.int32),
        obs=pd.DataFrame({"cell_type": source.obs[label_column].astype(str).where(source.obs[label_column].notna())},
                         index=source.obs_names),
        var=pd.DataFrame(index=var.index.astype(str)),
    )
    if not adata.obs_names.is_unique:
        raise InputError(f"{path}: cell names (obs_names) are not unique")
    if not adata.var_names.is_unique:
        adata.var_names_make_unique()
    return adata
