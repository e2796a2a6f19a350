"""Read count matrices from 10x and HDF5 files (Cell Ranger, .h5ad, loom); write outputs atomically."""

from __future__ import annotations

import contextlib
import gzip
import html
import io
import logging
import os
import shutil
import tarfile
import zlib
from pathlib import Path, PurePath

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import InputError, did_you_mean
from .archives import CELL_RANGER, LIST_ROLES, chosen_matrix, list_file, safe_member_name
from .formats import TAR_OPEN_ERRORS, format_hint, tar_problem
from .matrix_checks import (as_int32_counts, counts_problem, gene_expression_features, integer_counts,
                            with_unique_gene_names)

log = logging.getLogger(__name__)

# What cvaesim.writers.write_10x puts in its folder: a folder holding these alone may be replaced.
TENX_OUTPUT_FILES = ("matrix.mtx.gz", "features.tsv.gz", "barcodes.tsv.gz", "cell_types.tsv")


@contextlib.contextmanager
def atomic_output(path: str | Path):
    """Yield a temporary path beside ``path`` (for a file or a folder); rename it to ``path`` only if the
    block succeeds, replacing what was there."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".tmp{os.getpid()}.{path.name}")  # keeps the suffix, which writers check
    aside = path.with_name(f".old{os.getpid()}.{path.name}")
    try:
        yield temporary
        if temporary.is_dir() and path.is_dir():
            # One rename cannot replace a folder that holds files: the old one is moved aside first,
            # and back if the new one cannot take its place.
            path.replace(aside)
            try:
                temporary.replace(path)
            except OSError:
                aside.replace(path)
                raise
        else:
            temporary.replace(path)
    finally:
        for leftover in (temporary, aside):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink(missing_ok=True)


def write_h5ad(adata: ad.AnnData, path: str | Path) -> None:
    with atomic_output(path) as temporary:
        adata.write_h5ad(temporary, compression="gzip")


def read_10x_tarball(path: str | Path, round_counts: bool = False, sample: str | None = None) -> ad.AnnData:
    """Read a Matrix Market matrix folder from a tarball, or from a folder itself: 10x Genomics' (v2 ``genes.tsv``
    or v3 ``features.tsv.gz``), or another tool's (see MATRIX_LAYOUTS); of several, the one ``sample`` names (see
    ``chosen_matrix``).

    Members are read in memory, never extracted, and unsafe members (absolute paths,
    ``..``, links) are refused. ``round_counts``: see ``integer_counts``.
    """
    path = Path(path)
    try:
        if path.is_dir():  # as `cvaesim evaluate` is given one (a dataset's folder is packed by its download)
            files = {file.relative_to(path): file for file in sorted(path.rglob("*")) if file.is_file()}

            def open_file(name: PurePath):
                return gzip.open(files[name]) if name.suffix == ".gz" else open(files[name], "rb")

            read = _read_10x_files(path, list(files), open_file, round_counts, sample)
        else:
            try:
                archive = tarfile.open(path, "r:*")
            except TAR_OPEN_ERRORS as error:
                raise InputError(f"{path}: not a readable tar archive ({tar_problem(error)})"
                                 f"{format_hint(path, '10x_tarball') or '; is the download complete?'}") from error
            with archive:
                members = {}
                for member in archive:
                    name = safe_member_name(path, member)
                    if member.isfile():
                        members[name] = member

                def open_member(name: PurePath):
                    stream = archive.extractfile(members[name])
                    return gzip.GzipFile(fileobj=stream) if name.suffix == ".gz" else stream

                read = _read_10x_files(path, list(members), open_member, round_counts, sample)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(f"{path}: {'a file in it' if path.is_dir() else 'the archive'} is truncated or corrupt "
                         f"({error})") from error
    return _matrix_folder_counts(path, *read)


def _read_10x_files(path: Path, names: list[PurePath], open_file, round_counts: bool, sample: str | None):
    """The matrix ``chosen_matrix`` picks of the files ``names`` (each opened by ``open_file``) as it is read: its
    files, the counts, and the barcode, gene and gene-name lists (None where absent)."""
    try:
        matrix = chosen_matrix(names, sample)
    except ValueError as error:
        raise InputError(f"{path}: {error}") from None
    layout = matrix.layout
    in_folder = {name.name for name in names if name.parent == matrix.folder}

    def read_list(role: tuple[str, str, bool]) -> pd.DataFrame | None:
        name = list_file(matrix, role, in_folder, f"{path}: {matrix.folder}/ has")
        if name is None:
            return None
        with open_file(matrix.folder / name) as stream:
            listed = stream.read()
        skipped = 0 if layout.tables else _header_lines(listed, f"{path}: {matrix.folder}/{name}")
        try:
            return pd.read_csv(io.BytesIO(listed), sep="," if layout.tables else "\t",
                               header=0 if layout.tables else None, skiprows=skipped, dtype=str)
        except pd.errors.EmptyDataError as error:
            raise InputError(f"{path}: the {role[1]} list in {matrix.folder}/ is empty") from error
        except pd.errors.ParserError as error:  # rows of different lengths, as hand-made lists can have
            raise InputError(f"{path}: the {role[1]} list in {matrix.folder}/ could not be read as a table "
                             f"({error})") from error

    matrix_name = next(name for name in matrix.matrix_names if name in in_folder)
    with open_file(matrix.folder / matrix_name) as stream:
        counts = _read_matrix_market(stream, path, round_counts, matrix_name)
    return (matrix, matrix_name, counts, *(read_list(role) for role in LIST_ROLES))


def _matrix_folder_counts(path: Path, matrix, matrix_name: str, counts: sp.csr_matrix, barcodes: pd.DataFrame,
                          genes: pd.DataFrame, symbols: pd.DataFrame | None) -> ad.AnnData:
    """Cells x genes of a matrix folder's files as ``_read_10x_files`` read them."""
    layout = matrix.layout
    barcodes = barcodes.iloc[:, 0]
    as_cells_by_genes = (len(barcodes), len(genes))
    if counts.shape == as_cells_by_genes[::-1] and (layout.cells_in_rows or counts.shape != as_cells_by_genes):
        # Read as written by a tool whose matrix has a row per cell (kallisto|bustools, Parse), or hand-made that
        # way (scipy.io.mmwrite of an AnnData's X) where only its transpose fits.
        if not layout.cells_in_rows:
            log.warning("%s: %s has a row per cell (%s's has a row per gene): read transposed, as only that fits "
                        "its %d genes and %d barcodes", path, matrix_name, layout.tool, len(genes), len(barcodes))
        counts = counts.T.tocsr()
    if counts.shape != as_cells_by_genes:
        raise InputError(
            f"{path}: {matrix_name} is {counts.shape[1]} genes x {counts.shape[0]} cells but its lists name "
            f"{len(genes)} genes and {len(barcodes)} barcodes{listing_hint(counts.shape, len(genes), len(barcodes))}"
        )
    if symbols is not None and len(symbols) != len(genes):
        raise InputError(f"{path}: {matrix.folder}/ lists {len(genes)} genes but {len(symbols)} gene names")
    if symbols is None:  # the symbols beside the ids, or the ids alone
        symbols = genes.iloc[:, min(1, genes.shape[1] - 1)].to_frame()
    symbols = symbols.iloc[:, 0]
    # Cell Ranger 3's third column is each feature's type (Gene Expression, Antibody Capture, ...); Parse's
    # gene table names each gene's genome.
    feature_types = genes.iloc[:, 2].to_numpy() if layout is CELL_RANGER and genes.shape[1] > 2 else None
    genomes = genes["genome"].to_numpy() if "genome" in genes.columns else None
    return _cells_by_genes(counts, barcodes.to_numpy(), genes.iloc[:, 0].to_numpy(), symbols.to_numpy(), path,
                           feature_types, genomes)


# First fields of a header line that a bare gene or barcode list was written with (R's write.table of a vector
# writes "x"; of a data frame, its column names); 10x's lists have none.
LIST_HEADER_WORDS = {"x", "v1", "barcode", "barcodes", "cell", "cells", "cell_id", "cellid", "cell_barcode", "gene",
                     "genes", "gene_id", "gene_ids", "geneid", "gene_name", "gene_names", "gene_symbol",
                     "gene_symbols", "feature", "features", "feature_id", "id", "ids", "name", "names", "symbol",
                     "symbols", "ensembl", "ensembl_id"}


def _header_lines(listed: bytes, where: str) -> int:
    """1 where a bare list opens with a header line (its first field a column name, not a barcode or gene), else 0."""
    first = listed.split(b"\n", 1)[0].decode("utf-8", "replace").lstrip("\ufeff").rstrip("\r")
    field = first.split("\t")[0].strip().strip('"').lower()
    if field not in LIST_HEADER_WORDS:
        return 0
    log.warning("%s: its first line (%r) names columns, which 10x's lists do not: read as a header line and "
                "skipped", where, first)
    return 1


def listing_hint(shape: tuple[int, int], n_genes: int, n_barcodes: int) -> str:
    """Why a hand-made matrix folder's lists may not fit its matrix (``shape`` as read: cells x genes)."""
    n_cells, n_matrix_genes = shape
    extra = [what for what, listed, expected in (("gene", n_genes, n_matrix_genes), ("barcode", n_barcodes, n_cells))
             if listed == expected + 1]
    if extra:
        return (f"; the {' and '.join(extra)} list{'s have' if len(extra) > 1 else ' has'} one line too many: "
                "a header line? 10x's lists have none")
    return ""


def read_10x_h5(path: str | Path, round_counts: bool = False) -> ad.AnnData:
    """Read a 10x Genomics HDF5 matrix (Cell Ranger 3+ ``matrix`` group, or Cell Ranger 2's genome groups).

    Of a Cell Ranger 3+ file only the Gene Expression features are kept (antibody capture
    and other feature types are dropped, with a log line). A Cell Ranger 2 file of several genomes
    (a mixed-species experiment) lists the same cells under each genome: their genes are joined side by
    side, as Cell Ranger 3+ writes them; a gene's genome is in ``var['genome']`` where there are several.
    ``round_counts``: see ``integer_counts``.
    """
    path = Path(path)
    feature_types = genome_of_gene = None
    try:
        with h5py.File(path, "r") as h5:
            if isinstance(h5.get("matrix"), h5py.Group):
                group, features = h5["matrix"], h5["matrix"].get("features")
                if features is None:
                    raise InputError(f"{path}: the 'matrix' group has no 'features' (not a 10x HDF5 matrix)")
                counts, barcodes = _h5_counts(group, path, round_counts)
                gene_ids, symbols = _strings(features, "id", path), _strings(features, "name", path)
                if "feature_type" in features:
                    feature_types = _strings(features, "feature_type", path)
                if "genome" in features:  # each feature's; several in a mixed-species experiment
                    genome_of_gene = _strings(features, "genome", path)
            else:
                groups = sorted(name for name, item in h5.items() if isinstance(item, h5py.Group))
                genomes = [name for name in groups if {"barcodes", "indptr"} <= set(h5[name])]
                if not genomes:
                    raise InputError(f"{path}: expected a 'matrix' group (Cell Ranger 3+) or genome groups "
                                     f"(Cell Ranger 2), found {', '.join(groups) or 'no group'}"
                                     f"{format_hint(path, '10x_h5')}")
                matrices, barcode_lists, id_lists, symbol_lists = zip(*(
                    (*_h5_counts(h5[genome], path, round_counts), _strings(h5[genome], "genes", path),
                     _strings(h5[genome], "gene_names", path)) for genome in genomes))
                barcodes = barcode_lists[0]
                for genome, listed in zip(genomes[1:], barcode_lists[1:]):
                    if not np.array_equal(listed, barcodes):
                        raise InputError(f"{path}: its genome groups {genomes[0]} and {genome} list different "
                                         "cells, so their genes cannot be joined; write the genome wanted as an .h5ad "
                                         f"(scanpy: sc.read_10x_h5(path, genome={genome!r})), add the labels to its "
                                         "obs and give that file as an h5ad source")
                counts = sp.hstack(matrices, format="csr")
                gene_ids, symbols = np.concatenate(id_lists), np.concatenate(symbol_lists)
                genome_of_gene = np.repeat(genomes, [matrix.shape[1] for matrix in matrices])
                if len(genomes) > 1:
                    log.info("%s: genes of %d genomes joined (%s)", path, len(genomes),
                             ", ".join(f"{genome}: {matrix.shape[1]}" for genome, matrix in zip(genomes, matrices)))
    except OSError as error:
        raise InputError(f"{path}: not a readable HDF5 file ({error}); is the download complete?") from error
    if (len(barcodes), len(gene_ids)) != counts.shape:
        raise InputError(f"{path}: matrix is {counts.shape[1]} genes x {counts.shape[0]} cells but the file lists "
                         f"{len(gene_ids)} features and {len(barcodes)} barcodes")
    return _cells_by_genes(counts, barcodes, gene_ids, symbols, path, feature_types, genome_of_gene)


def _h5_counts(group: h5py.Group, path: Path, round_counts: bool) -> tuple[sp.csr_matrix, np.ndarray]:
    """A 10x HDF5 group's counts as cells x genes, and its barcodes."""
    parts = {name: group[name][()] for name in ("data", "indices", "indptr", "shape") if name in group}
    missing = sorted({"data", "indices", "indptr", "shape"} - set(parts))
    if missing:
        raise InputError(f"{path}: {group.name} has no {', '.join(missing)} (not a 10x HDF5 matrix)")
    n_genes, n_cells = (int(value) for value in parts["shape"])
    indices, indptr = parts["indices"], parts["indptr"]
    # Stored genes x cells, compressed by cell: the same arrays are cells x genes compressed by row.
    if (len(indptr) != n_cells + 1 or indptr[-1] != len(indices) or len(parts["data"]) != len(indices)
            or (len(indices) and (indices.min() < 0 or indices.max() >= n_genes))):
        raise InputError(f"{path}: the matrix's data, indices and indptr do not fit its {n_genes} x {n_cells} shape")
    counts = integer_counts(sp.csr_matrix((parts["data"], indices, indptr), shape=(n_cells, n_genes)), path,
                            round_counts)
    return counts, _strings(group, "barcodes", path)


def _strings(group: h5py.Group, name: str, path: Path) -> np.ndarray:
    if name not in group:
        raise InputError(f"{path}: {group.name} has no '{name}' (not a 10x HDF5 matrix)")
    return np.array([value.decode() if isinstance(value, bytes) else str(value) for value in group[name][()]],
                    dtype=object)


def _cells_by_genes(counts: sp.csr_matrix, barcodes, gene_ids, symbols, path: Path,
                    feature_types: np.ndarray | None = None, genomes: np.ndarray | None = None) -> ad.AnnData:
    """Cells x genes with symbols as gene names (made unique) and the ids beside them, and each gene's genome
    where the genes come from several (``var['genome']``); of a Cell Ranger 3+ matrix only the Gene Expression
    features (antibody capture, CRISPR guides and the like are dropped)."""
    expression = None if feature_types is None else gene_expression_features(feature_types, path)
    if expression is not None:
        counts, gene_ids, symbols = (counts[:, expression], np.asarray(gene_ids)[expression],
                                     np.asarray(symbols)[expression])
        genomes = None if genomes is None else np.asarray(genomes)[expression]
    var = pd.DataFrame({"gene_ids": np.asarray(gene_ids, dtype=str)},
                       index=pd.Index(np.asarray(symbols, dtype=str), name=None))
    if genomes is not None and len(set(genomes)) > 1:
        var["genome"] = np.asarray(genomes, dtype=str)
    adata = ad.AnnData(X=counts, obs=pd.DataFrame(index=pd.Index(np.asarray(barcodes, dtype=str))), var=var)
    return with_unique_gene_names(adata, path)


# Matrix Market entries parsed per chunk, so that pandas never holds all of a large matrix's entries at once.
MTX_CHUNK_ROWS = 5_000_000


def _read_matrix_market(stream, path: Path, round_counts: bool, name: str = "matrix.mtx") -> sp.csr_matrix:
    """Parse a genes x cells Matrix Market stream (the file ``name`` in ``path``) into a cells x genes CSR of
    int32 counts.

    Chunked, with int32 indices, so PBMC68k's 55 million entries fit in about 1 GB.
    """
    text = io.TextIOWrapper(stream, encoding="ascii")
    header = text.readline()
    if not header.startswith("%%MatrixMarket matrix coordinate"):
        raise InputError(f"{path}: {name} is not a Matrix Market coordinate file (header {header.strip()!r})")
    field = header.split()[3]
    if field not in ("integer", "real"):
        raise InputError(f"{path}: {name} has {field!r} values; counts must be integer or real")
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
                raise InputError(f"{path}: {name} has more entries than its header's {n_entries}")
            genes[filled:end] = chunk["gene"].to_numpy()
            cells[filled:end] = chunk["cell"].to_numpy()
            values[filled:end] = chunk["value"].to_numpy()
            filled = end
    except (ValueError, pd.errors.ParserError) as error:
        raise InputError(f"{path}: {name} could not be parsed ({error})") from error
    if filled != n_entries:
        raise InputError(f"{path}: {name} has {filled} entries but its header promises {n_entries}")
    if n_entries and (genes.min() < 1 or genes.max() > n_genes or cells.min() < 1 or cells.max() > n_cells):
        raise InputError(f"{path}: {name} has indices outside its {n_genes} x {n_cells} shape")
    return integer_counts(sp.csr_matrix((values, (cells - 1, genes - 1)), shape=(n_cells, n_genes)), path,
                          round_counts)


IMAGE_STORE = ("an image store", "the images.h5ad the reshape rule wrote")  # open_h5ad's kind and wanted


def open_h5ad(path: str | Path, kind: str, wanted: str, backed: str | None = "r") -> ad.AnnData:
    """``path`` read as an AnnData file (backed by default), or an error saying it is not ``kind`` and to give
    ``wanted``."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: a folder, not {kind}; give {wanted}")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        return ad.read_h5ad(path, backed=backed)
    except (OSError, KeyError, TypeError) as error:  # h5py's (not HDF5, cut off) or anndata's (HDF5 of another kind)
        raise InputError(f"{path}: not readable as an AnnData .h5ad file, as {kind} is "
                         f"({error.args[0] if error.args else error}); give {wanted}") from error


def read_h5ad_counts(path: str | Path, label_column: str | None, counts_layer: str | None,
                     round_counts: bool = False) -> ad.AnnData:
    """Read counts and labels (the obs column ``label_column`` as ``obs['cell_type']``; None: no labels) from an
    .h5ad; ``counts_layer`` names a layer, ``raw``, or None for X; ``round_counts``: see ``integer_counts``."""
    path = Path(path)
    hint = format_hint(path, "h5ad")
    try:
        # Backed: X and .raw stay on disk until read, so that only the matrix holding the counts is (CELLxGENE's
        # files keep normalised values in X beside the counts in .raw).
        source = ad.read_h5ad(path, backed="r")
    except Exception as error:  # anndata raises many types for a broken file
        raise InputError(f"{path}: not a readable .h5ad file ({error}){hint}") from error
    try:
        if hint:  # a loom or MuData file opens backed too, as an AnnData that lacks its matrices
            raise InputError(f"{path}: not a readable .h5ad file (not AnnData's layout){hint}")
        return _h5ad_counts(path, source, label_column, counts_layer, round_counts)
    finally:
        source.file.close()


def _h5ad_counts(path: Path, source: ad.AnnData, label_column: str | None, counts_layer: str | None,
                 round_counts: bool) -> ad.AnnData:
    if label_column not in source.obs.columns and label_column in source.var.columns:
        raise InputError(f"{path}: {label_column!r} is a column of var, not of obs, so the file holds a cell in each "
                         "column: write it transposed (adata.T)")
    check_label_column(path, label_column, source.obs.columns, "obs")
    if counts_layer == "raw" and source.raw is None:
        raise InputError(f"{path}: counts_layer is 'raw' but the file has no .raw")
    # anndata 0.13 lists X among a backed file's layers (as None) and reads a layer only when asked for it.
    layers = [name for name in source.layers if name is not None]
    matrices = {None: lambda: _in_memory(source.X) if "X" in source.file else None,
                **{name: (lambda name=name: _in_memory(source.layers[name])) for name in layers}}
    if source.raw is not None:
        matrices["raw"] = lambda: _in_memory(source.raw.X)
    counts = _counts_of(path, matrices, counts_layer, round_counts)
    var = source.raw.var if counts_layer == "raw" else source.var
    return _labelled_counts(path, counts, source.obs, var, label_column)


def _in_memory(matrix):
    """A matrix of a backed .h5ad, read: anndata's sparse dataset, or h5py's dense one (None where there is none)."""
    if isinstance(matrix, h5py.Dataset):
        return matrix[()]
    return matrix.to_memory() if hasattr(matrix, "to_memory") else matrix


def check_label_column(path: Path, label_column: str | None, columns, where: str) -> None:
    if label_column is not None and label_column not in columns:
        raise InputError(f"{path}: {where} has no label column {label_column!r}; its columns are "
                         f"{', '.join(map(repr, columns)) or 'none'}{did_you_mean([label_column], columns)} "
                         "(the dataset's label_column, or evaluate's --label-column, names it)")


def _counts_of(path: Path, matrices: dict, counts_layer: str | None, round_counts: bool) -> sp.csr_matrix:
    """The int32 counts of ``matrices[counts_layer]`` (None: X), each matrix given as a function that reads it;
    refused, naming the layers that do hold counts, where it holds none."""
    if counts_layer not in matrices:
        layers = [name for name in matrices if name not in (None, "raw")]
        raise InputError(f"{path}: no layer {counts_layer!r}; its layers are {', '.join(map(repr, layers)) or 'none'}"
                         f"{did_you_mean([counts_layer], layers)}")
    counts = matrices[counts_layer]()
    problem = counts_problem(counts, round_counts)
    if problem is not None:
        where = "X" if counts_layer is None else f"counts_layer {counts_layer!r}"
        holding_counts = [repr(name) for name, read in matrices.items()
                          if name not in (None, counts_layer) and counts_problem(read()) is None]
        hint = (f"; {' and '.join(holding_counts)} of this file hold{'s' if len(holding_counts) == 1 else ''} "
                f"integer counts: name {'it' if len(holding_counts) == 1 else 'one'} as the dataset's counts_layer "
                "(or evaluate's --counts-layer)" if holding_counts
                else " (counts_layer names the layer or 'raw' that holds them)")
        raise InputError(f"{path}: {where} holds {problem}; raw counts are needed{hint}")
    return as_int32_counts(counts, path, round_counts)  # checked above


# Where loom files keep cell names, gene names and gene ids, by convention (loompy's, velocyto's, HCA's, scanpy's).
LOOM_CELL_NAMES = ("CellID", "cell_names", "obs_names", "CellId", "barcode", "barcodes", "Barcode")
LOOM_GENE_NAMES = ("Gene", "gene_names", "var_names", "gene_symbols", "Symbol", "GeneName")
LOOM_GENE_IDS = ("Accession", "gene_ids", "ensembl_ids", "GeneID", "gene_id")
# Genes x cells, read this many entries at a time into sparse rows: a dense block of about 128 MB.
LOOM_BLOCK_ENTRIES = 1 << 25


def read_loom_counts(path: str | Path, label_column: str | None, counts_layer: str | None,
                     round_counts: bool = False) -> ad.AnnData:
    """Read counts and labels from a loom file (genes x cells, dense, in ``/matrix`` and ``/layers``), as
    ``read_h5ad_counts`` does from an .h5ad: ``label_column`` names a column attribute (None: no labels),
    ``counts_layer`` a layer (None: the main matrix). Cells are named by the column attribute ``CellID`` (or
    ``cell_names``, ...), genes by ``Gene`` with ``Accession`` ids beside them."""
    path = Path(path)
    try:
        loom = h5py.File(path, "r")
    except OSError as error:
        raise InputError(f"{path}: not a readable loom (HDF5) file ({error}){format_hint(path, 'loom')}") from error
    with loom:
        if not (isinstance(loom.get("matrix"), h5py.Dataset) and "row_attrs" in loom and "col_attrs" in loom):
            raise InputError(f"{path}: not a loom file (no matrix, row_attrs and col_attrs){format_hint(path, 'loom')}")
        n_genes, n_cells = loom["matrix"].shape
        obs = _loom_attributes(loom["col_attrs"], n_cells)
        genes = _loom_attributes(loom["row_attrs"], n_genes)
        cell_names = next((obs.pop(name) for name in LOOM_CELL_NAMES if name in obs), None)
        if cell_names is None:
            raise InputError(f"{path}: no column attribute names the cells (looked for {', '.join(LOOM_CELL_NAMES)}; "
                             f"its column attributes are {', '.join(map(repr, obs)) or 'none'})")
        gene_names = next((genes[name] for name in LOOM_GENE_NAMES if name in genes), None)
        gene_ids = next((genes[name] for name in LOOM_GENE_IDS if name in genes), None)
        if gene_names is None and gene_ids is None:
            raise InputError(f"{path}: no row attribute names the genes (looked for "
                             f"{', '.join(LOOM_GENE_NAMES + LOOM_GENE_IDS)}; its row attributes are "
                             f"{', '.join(map(repr, genes)) or 'none'})")
        check_label_column(path, label_column, list(obs), "col_attrs")
        layers = [name for name in loom.get("layers", {}) if name]  # loompy stores the main matrix as layer ''
        if counts_layer is None and {"spliced", "unspliced"} <= set(layers):
            log.warning("%s: a velocyto loom, whose main matrix holds the spliced counts only; the Cell Ranger "
                        "matrix of the same cells holds all of their counts", path)
        matrices = {None: lambda: _loom_matrix(loom["matrix"]),
                    **{name: (lambda name=name: _loom_matrix(loom["layers"][name])) for name in layers}}
        counts = _counts_of(path, matrices, counts_layer, round_counts)
    var = pd.DataFrame(index=pd.Index(gene_names if gene_names is not None else gene_ids, dtype=str))
    if gene_names is not None and gene_ids is not None:
        var["gene_ids"] = np.asarray(gene_ids, dtype=str)
    return _labelled_counts(path, counts, pd.DataFrame(obs, index=pd.Index(cell_names, dtype=str)), var,
                            label_column)


def _loom_attributes(group: h5py.Group, length: int) -> dict[str, np.ndarray]:
    """A loom attribute group's one-dimensional attributes of the matrix's length, strings decoded."""
    attributes = {}
    for name, dataset in group.items():
        if isinstance(dataset, h5py.Dataset) and dataset.shape == (length,):
            values = dataset[()]
            if values.dtype.kind == "S":  # loompy's strings: ASCII, other characters as XML references
                values = np.array([html.unescape(value.decode("utf-8", "replace")) for value in values], dtype=object)
            elif values.dtype.kind == "O":  # variable-length strings, as h5py reads them
                values = np.array([value.decode() if isinstance(value, bytes) else value for value in values],
                                  dtype=object)
            attributes[name] = values
    return attributes


def _loom_matrix(dataset: h5py.Dataset) -> sp.csr_matrix:
    """A loom matrix (genes x cells, dense on disk) as sparse cells x genes, read a block of genes at a time."""
    n_genes, n_cells = dataset.shape
    rows = max(1, LOOM_BLOCK_ENTRIES // max(n_cells, 1))
    blocks = [sp.csr_matrix(dataset[start:start + rows]) for start in range(0, n_genes, rows)]
    genes_by_cells = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, n_cells))
    return genes_by_cells.T.tocsr()


def _labelled_counts(path: Path, counts: sp.csr_matrix, obs: pd.DataFrame, var: pd.DataFrame,
                     label_column: str | None) -> ad.AnnData:
    """Counts with their gene annotation and, from ``label_column`` of ``obs``, ``obs['cell_type']``; repeated
    cell names suffixed, repeated gene names made unique; of a CITE-seq or multiome file read by scanpy
    (``var['feature_types']``), the Gene Expression features alone."""
    # 10x's types, not a column of another meaning under that name.
    if "feature_types" in var.columns and var["feature_types"].astype(str).eq("Gene Expression").any():
        expression = gene_expression_features(var["feature_types"].to_numpy(), path)
        if expression is not None:
            counts, var = counts[:, expression], var[expression]
    adata = ad.AnnData(
        X=counts,
        # As stored (categorical, numbers, text): the filter names the types and keeps a categorical's order.
        obs=pd.DataFrame({} if label_column is None else {"cell_type": obs[label_column]}, index=obs.index),
        # The gene annotation goes along (Ensembl ids, symbols beside ids as in CELLxGENE files) into every output.
        var=var.set_axis(var.index.astype(str)),
    )
    repeated = adata.obs_names[adata.obs_names.duplicated()]
    if len(repeated):
        # Files joined with anndata.concat keep each part's barcodes: the same name for different cells.
        log.warning("%s: %d cell names (obs_names) occur more than once (e.g. %r); suffixing them (-1, -2, ...)",
                    path, len(repeated), repeated[0])
        adata.obs_names_make_unique()
    return with_unique_gene_names(adata, path)
