"""Read count matrices as users bring them, and write outputs atomically."""

from __future__ import annotations

import collections
import contextlib
import csv
import gzip
import html
import io
import logging
import os
import re
import shutil
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import NamedTuple

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import InputError, did_you_mean
from .filtering import labels_across_sample_tags, r_names, without_gem_suffix

log = logging.getLogger(__name__)


def _plain_or_gzipped(*names: str) -> tuple[str, ...]:
    return tuple(variant for name in names for variant in (name, name + ".gz"))


@dataclass(frozen=True)
class MatrixLayout:
    """How a tool names and writes the files of a Matrix Market matrix folder."""
    tool: str
    matrix: tuple[str, ...]
    barcodes: tuple[str, ...]
    genes: tuple[str, ...]
    gene_symbols: tuple[str, ...] = ()  # an optional list of symbols beside a list of gene ids
    cells_in_rows: bool = False  # the matrix has a row per cell (Cell Ranger's has a row per gene)
    tables: bool = False  # the lists are CSV tables with a header (else a tab-separated list without one)


CELL_RANGER = MatrixLayout("Cell Ranger", _plain_or_gzipped("matrix.mtx"), _plain_or_gzipped("barcodes.tsv"),
                           _plain_or_gzipped("genes.tsv", "features.tsv"))
MATRIX_LAYOUTS = (
    CELL_RANGER,  # and STARsolo, and GEO's uploads of either
    MatrixLayout("kallisto|bustools", _plain_or_gzipped("cells_x_genes.mtx"),
                 _plain_or_gzipped("cells_x_genes.barcodes.txt"), _plain_or_gzipped("cells_x_genes.genes.txt"),
                 _plain_or_gzipped("cells_x_genes.genes.names.txt"), cells_in_rows=True),
    # split-pipe's DGE.mtx was renamed count_matrix.mtx in its version 1.1.
    MatrixLayout("Parse Biosciences", _plain_or_gzipped("DGE.mtx", "count_matrix.mtx"),
                 _plain_or_gzipped("cell_metadata.csv"), _plain_or_gzipped("all_genes.csv"), cells_in_rows=True,
                 tables=True),
)
READ_MATRIX_NAMES = ("Cell Ranger's or STARsolo's matrix.mtx[.gz] with barcodes.tsv and genes.tsv or features.tsv "
                     "(or GEO's <prefix>matrix.mtx.gz), kallisto|bustools' cells_x_genes.mtx with its "
                     "cells_x_genes.barcodes.txt and .genes.txt, or Parse Biosciences' DGE.mtx or count_matrix.mtx "
                     "with cell_metadata.csv and all_genes.csv")


class MatrixFiles(NamedTuple):
    """One matrix among a folder's or archive's files: its folder, file-name prefix, layout, and the layout's name
    of the matrix file that it has (without .gz)."""
    folder: PurePath
    prefix: str
    layout: MatrixLayout
    stem: str

    def __str__(self) -> str:
        return f"{self.folder / self.prefix}{self.stem}" if self.prefix else str(self.folder)

    @property
    def matrix_names(self) -> tuple[str, ...]:
        """The names its matrix file may have, plain or gzipped."""
        return tuple(self.prefix + name for name in _plain_or_gzipped(self.stem))


# Each list beside a matrix: the layout's field with its candidate names, what it lists, whether it must be there.
LIST_ROLES = (("barcodes", "barcode", True), ("genes", "gene", True), ("gene_symbols", "gene name", False))


def _list_file(matrix: MatrixFiles, role: tuple[str, str, bool], present, where: str | None = None) -> str | None:
    """The name of ``matrix``'s list for ``role`` (one of LIST_ROLES) among the ``present`` names (see
    ``list_names``); None where it is not there, and for a required one InputError prefixed by ``where`` where
    that is given."""
    field, what, required = role
    wanted = list_names(getattr(matrix.layout, field), matrix.prefix)
    found = next((name for name in wanted if name in present), None)
    if found is None and required and where is not None:
        raise InputError(f"{where} no {what} file ({' or '.join(wanted)}) beside the matrix")
    return found


MTX_CHUNK_ROWS = 5_000_000
TABLE_SEPARATORS = ("\t", ",", ";", " ")
TEXT_SAMPLE_BYTES = 65536


class MatrixChoiceError(ValueError):
    """A whole folder or archive that holds no one matrix to read as the dataset's config names it (its format
    or sample key): the download is kept for a run with the config mended."""


def matrix_sets(names: Iterable[PurePath]) -> list[MatrixFiles]:
    """Each matrix among the file ``names``, by its layout's names (Cell Ranger's ``matrix.mtx.gz`` and so on);
    GEO's supplementary files carry a sample prefix (``GSM1234567_matrix.mtx.gz``), as scanpy's
    ``read_10x_mtx(prefix=...)`` reads them."""
    names = list(names)
    in_folder = collections.defaultdict(set)
    for name in names:
        in_folder[name.parent].add(name.name)
    matrices = set()
    for name in names:
        readings = [MatrixFiles(name.parent, name.name[:-len(standard)], layout, standard.removesuffix(".gz"))
                    for layout in MATRIX_LAYOUTS for standard in layout.matrix if name.name.endswith(standard)]
        # Parse's count_matrix.mtx ends as Cell Ranger's matrix.mtx: read as the layout whose lists are there
        # (else as the first, whose error names the list missing).
        whole = [matrix for matrix in readings if all(_list_file(matrix, role, in_folder[name.parent])
                                                      for role in LIST_ROLES if role[2])]
        matrices.update(whole or readings[:1])
    return sorted(matrices, key=lambda matrix: (str(matrix.folder), matrix.prefix))


def list_names(candidates: tuple[str, ...], prefix: str) -> tuple[str, ...]:
    """A matrix's gene or barcode list: with the matrix's prefix, a shorter one up to a separator (GEO's
    ``GSE1_count_matrix.mtx.gz`` beside ``GSE1_barcodes.tsv.gz``), or none (some uploads prefix the matrix only)."""
    shorter = [prefix[:end + 1] for end in range(len(prefix) - 2, -1, -1) if not prefix[end].isalnum()]
    prefixes = dict.fromkeys([prefix, *shorter, ""])  # in that order, once each
    return tuple(each + name for each in prefixes for name in candidates)


def names_sample(matrix: tuple[PurePath, str, ...], sample: str) -> bool:
    """Whether ``sample`` names the matrix ``(folder, prefix, ...)``: its file-name prefix up to a separator
    (``GSM123`` names ``GSM123_Sample1_matrix.mtx.gz``, not ``GSM1234_matrix.mtx.gz``), one of its folders
    (``hg19`` in a two-genome Cell Ranger 2 tarball) or several in turn (``s1/DGE_filtered`` where each sample's
    folder holds a filtered and an unfiltered matrix)."""
    folder, prefix = matrix[:2]
    named, parts = PurePosixPath(sample).parts, folder.parts
    return ((prefix.startswith(sample) and not prefix[len(sample):len(sample) + 1].isalnum())
            or bool(named) and any(parts[start:start + len(named)] == named for start in range(len(parts))))


def chosen_matrix(names: list[PurePath], sample: str | None) -> MatrixFiles:
    """The matrix to read among the file ``names`` of a folder or archive: the only one, or the one ``sample``
    names (the dataset's ``sample`` key). Raises MatrixChoiceError saying why there is none, for the caller to name
    the source."""
    matrices = matrix_sets(names)
    found = ", ".join(map(str, matrices))
    if sample is not None:
        picked = [matrix for matrix in matrices if names_sample(matrix, sample)]
        if len(picked) == 1:
            return picked[0]
        raise MatrixChoiceError(f"{'more than one' if picked else 'no'} matrix is named by sample {sample!r} "
                                f"(it holds {found or 'none'}); give the sample's file-name prefix, its folder's "
                                "name or its folders' path (s1/DGE_filtered)")
    if not matrices:
        # GEO's GSE..._RAW.tar often holds each sample's Cell Ranger HDF5 file instead.
        hdf5, other_mtx = ([str(name) for name in names if name.name.endswith(suffixes)]
                           for suffixes in (".h5", (".mtx", ".mtx.gz")))
        raise MatrixChoiceError(
            f"holds no matrix named as the workflow reads them ({READ_MATRIX_NAMES})"
            + (f"; it holds HDF5 files ({_first_few(hdf5)}): give it as a 10x_h5 source (the sample key naming the "
               "file where it holds several)" if hdf5 else "")
            + (f"; its Matrix Market files ({_first_few(other_mtx)}) are named otherwise: one matrix of each "
               "cell's whole counts is needed (kb count's nac and lamanno workflows split them by RNA species: add "
               "those matrices into one, or count with the standard workflow; alevin-fry's: "
               "pyroe.load_fry(folder).write_h5ad(path) writes them as an h5ad source). A matrix of whole counts "
               "named otherwise (GEO's GSE1_counts.mtx.gz beside GSE1_genes.tsv.gz and GSE1_cells.tsv.gz) is read "
               "once its files are named as Cell Ranger names them: <prefix>matrix.mtx.gz, <prefix>features.tsv.gz "
               "(or genes.tsv.gz) and <prefix>barcodes.tsv.gz"
               if other_mtx else ""))
    if len(matrices) > 1:  # e.g. outs/ with filtered_ and raw_feature_bc_matrix, or GEO's files of several samples
        raise MatrixChoiceError(f"holds more than one matrix folder or sample ({found}); name the one to read with "
                                "the dataset's sample key (a file-name prefix such as GSM1234567, or a folder's "
                                "name), or give a folder or archive holding only it")
    return matrices[0]


def _first_few(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def chosen_10x_h5(names: list[str], sample: str | None) -> str | None:
    """Of an archive's member ``names``, the Cell Ranger HDF5 file to read (GEO's ``GSE..._RAW.tar`` holds each
    sample's ``GSM123_filtered_feature_bc_matrix.h5``): the only one, or the one whose name ``sample`` begins up
    to a separator (``GSM123``, or ``GSM123_filtered`` where the raw matrix is there too); None where no member is
    an ``.h5`` file. Raises MatrixChoiceError saying why there is none to read, for the caller to name the source."""
    hdf5 = [name for name in names if name.endswith(".h5")]
    if not hdf5:
        return None
    files = {PurePosixPath(name).name: name for name in hdf5 if not name.endswith("molecule_info.h5")}
    picked = [name for name in files if sample is None or names_sample((PurePosixPath(), name), sample)]
    named = f" named by sample {sample!r}" if sample is not None else ""
    if not picked:
        raise MatrixChoiceError(f"holds no Cell Ranger HDF5 file{named} "
                                f"(it holds {', '.join(sorted(files)) or 'none'})")
    if len(picked) > 1:
        raise MatrixChoiceError(f"holds more than one Cell Ranger HDF5 file{named} ({', '.join(sorted(picked))}); "
                                "name the one to read with the dataset's sample key (its file-name prefix, such "
                                "as GSM1234567)")
    return files[picked[0]]


def extract_10x_h5(archive_path: str | Path, destination: str | Path, sample: str | None) -> str | None:
    """Write the Cell Ranger HDF5 file to read from a tar archive of them (see ``chosen_10x_h5``) to
    ``destination``. Returns the member's name, or None where ``archive_path`` is no readable tar archive of
    ``.h5`` files (the HDF5 check then says what it is)."""
    with _tar_files(archive_path) as opened:
        if opened is None:
            return None
        archive, members = opened
        by_name = {member.name: member for member in members if not macos_metadata(member.name)}
        name = chosen_10x_h5(list(by_name), sample)
        if name is None:
            return None
        _copy_member(archive, by_name[name], destination)
    return PurePosixPath(name).name


@contextlib.contextmanager
def _tar_files(archive_path: str | Path):
    """Yield a tar archive and its file members, or None where it is no readable tar archive (or a truncated one)."""
    try:
        archive = tarfile.open(archive_path, "r:*")
    except TAR_OPEN_ERRORS:
        yield None
        return
    with archive:
        try:
            members = [member for member in archive if member.isfile()]
        except TAR_OPEN_ERRORS:
            members = None
        yield None if members is None else (archive, members)


def _copy_member(archive: tarfile.TarFile, member: tarfile.TarInfo, destination: str | Path) -> None:
    with archive.extractfile(member) as content, open(destination, "wb") as output:
        shutil.copyfileobj(content, output)


# The files that make a folder an AnnData zarr store (zarr format 2 and 3).
ZARR_MARKERS = (".zgroup", "zarr.json")


def macos_metadata(name: str) -> bool:
    """Whether an archive member is macOS's Finder or tar metadata (``__MACOSX/``, ``._name``), not data."""
    return name.startswith("__MACOSX/") or PurePosixPath(name).name.startswith("._")


def only_file(names: list[str]) -> str:
    """The one file of an archive whose content is a one-file dataset source; MatrixChoiceError where it holds
    another number of files."""
    if len(names) != 1:
        matrices = matrix_sets([PurePosixPath(name) for name in names])
        if matrices:
            advice = f"it holds a 10x matrix ({', '.join(map(str, matrices))}), so the dataset's format may be 10x_tarball"
        elif any(PurePosixPath(name).name in ZARR_MARKERS for name in names):
            advice = ("it holds a zarr store: write it as an .h5ad with anndata.read_zarr(store).write_h5ad(path) and "
                      "give that file as the source")
        else:
            advice = "give that file's own address, or unpack the archive and give the file"
        raise MatrixChoiceError(f"an archive of {len(names)} files ({_first_few(names) or 'none'}), where this "
                                f"dataset's source is one file: {advice}")
    return names[0]


def untar_single_file(archive_path: str | Path, destination: str | Path) -> str | None:
    """Write the one file of a tar archive (a deposit's ``cells.h5ad.tar.gz``) to ``destination`` and return its
    name; None where ``archive_path`` is no readable tar archive (the format check then says what it is)."""
    with _tar_files(archive_path) as opened:
        if opened is None:  # truncated, or no tar archive: the format check says what it is
            return None
        archive, members = opened
        files = {member.name: member for member in members if not macos_metadata(member.name)}
        if matrix_sets([PurePosixPath(name) for name in files]):  # a 10x tarball: the format check says so
            return None
        name = only_file(list(files))
        _copy_member(archive, files[name], destination)
    return name


def zip_of_files(path: str | Path) -> bool:
    """Whether ``path`` is a readable zip archive of files (as Zenodo and figshare serve folders), not an Excel
    workbook; by its first bytes, as other files may end in bytes that look like a zip's directory."""
    with open(path, "rb") as handle:
        if handle.read(len(ZIP_MAGIC)) != ZIP_MAGIC:
            return False
    try:
        with zipfile.ZipFile(path) as archive:
            return not any(name.startswith("xl/") for name in archive.namelist())
    except zipfile.BadZipFile:  # cut off: the format check says what it is
        return False


def unzip_source(archive_path: str | Path, destination: str | Path, packed: bool, sample: str | None,
                 hdf5_matrices: bool = False) -> str:
    """Write what a dataset reads of a zip archive to ``destination``: with ``packed``, its 10x matrix files as the
    tarball :func:`read_10x_tarball` reads (of several matrices, the one ``sample`` names); with ``hdf5_matrices``,
    its Cell Ranger HDF5 file (see ``chosen_10x_h5``); else (or where it holds one file and no matrix) its one file.
    Returns what was taken. Raises MatrixChoiceError saying why there is none to take, for the caller to name the
    source."""
    destination = Path(destination)
    with zipfile.ZipFile(archive_path) as archive:
        members = [info for info in archive.infolist() if not info.is_dir() and not macos_metadata(info.filename)]
        names = [PurePosixPath(info.filename) for info in members]
        # A zip of the matrix's files is packed; a zip of one file (a tarball zipped again) gives that file.
        if packed and (matrix_sets(names) or len(members) != 1):
            matrix = chosen_matrix(names, sample)
            contents = destination.with_name("zip_contents")  # a fixed name: the packed tarball's member names
            shutil.rmtree(contents, ignore_errors=True)
            try:
                archive.extractall(contents, members)  # zipfile keeps every member inside ``contents``
                # Fast: the digest pinned is the zip's (level 9 packed PBMC68k's 805 MB matrix.mtx in 203 s).
                pack_10x_folder(contents, destination, sample, compresslevel=1)
            finally:
                shutil.rmtree(contents, ignore_errors=True)
            return str(matrix)
        member_names = [info.filename for info in members]
        name = (chosen_10x_h5(member_names, sample) if hdf5_matrices else None) or only_file(member_names)
        with archive.open(name) as member, open(destination, "wb") as output:
            shutil.copyfileobj(member, output)
        return name


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


def _safe_member_name(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise InputError(f"{archive}: refusing archive member {member.name!r}: it points outside the archive folder")
    if member.issym() or member.islnk():
        raise InputError(f"{archive}: refusing archive member {member.name!r}: links are not allowed")
    return name


# What a truncated, corrupt or wrong archive raises when opened.
TAR_OPEN_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def tar_problem(error: Exception) -> str:
    """tarfile's reason, cut to its first line: it lists every compression it tried, one per line."""
    return str(error).splitlines()[0].rstrip(":")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
# A cell barcode (Cell Ranger's, Drop-seq's), with a sample tag or GEM-well suffix or not.
CELL_BARCODE = re.compile(r"(\w+[-_.:])?[ACGTN]{8,}([-_.:]\w+)*")
R_DATA_SIGNATURES = (b"X\n", b"RDX2\n", b"RDX3\n")  # saveRDS's and save's serialisations, gzipped by default
R_DATA_ADVICE = ("an R data file (.rds or .RData, as Seurat objects are saved): write its counts and metadata from R "
                 "(DropletUtils::write10xCounts(folder, GetAssayData(object, slot = \"counts\")) and "
                 "write.csv(object@meta.data, path)) and give that folder as a 10x_tarball source with that file as "
                 "its annotation")


# The dataset format each HDF5 download's name stands for.
HDF5_FORMAT_OF_SUFFIX = {".h5": "10x_h5", ".h5ad": "h5ad", ".loom": "loom"}


def _decompressed_start(head: bytes) -> bytes:
    """The first bytes of what the gzip stream starting with ``head`` holds (b'' where it is no gzip stream)."""
    try:  # the start of a truncated file decompresses too
        return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, TEXT_SAMPLE_BYTES)
    except zlib.error:
        return b""


def gzipped_hdf5(path: str | Path) -> bool:
    """Whether ``path`` is an HDF5 file compressed whole with gzip (as GEO serves .h5ad and .loom files)."""
    with open(path, "rb") as handle:
        head = handle.read(TEXT_SAMPLE_BYTES)
    return head[:2] == GZIP_MAGIC and _decompressed_start(head).startswith(HDF5_SIGNATURE)


def detected_format(path: str | Path) -> tuple[str | None, str] | None:
    """(format, description) of a matrix file by its first bytes and HDF5 groups, or None when unknown;
    the format is None for a file that no format takes as it is (a gzip-compressed HDF5 file)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(TEXT_SAMPLE_BYTES)
        if head[:2] == GZIP_MAGIC:
            # What was compressed: a tar archive's header carries "ustar" at byte 257.
            block = _decompressed_start(head)
            if block.startswith(HDF5_SIGNATURE):
                return None, ("a gzip-compressed HDF5 file: the download decompresses one given as an h5ad, loom or "
                              "10x_h5 dataset's source; else decompress it (gunzip) and give the uncompressed file")
            if block.startswith(R_DATA_SIGNATURES):
                return None, R_DATA_ADVICE
            if block[257:262] == b"ustar":
                return "10x_tarball", "gzip-compressed, as a 10x tarball is"
            text = text_kind(block, "gzip-compressed ")
            if text is not None:
                return text
            if len(block) < 512:  # cut off within its first block: a truncated download, most likely of a tarball
                return "10x_tarball", "gzip-compressed, as a 10x tarball is"
            return None, "gzip-compressed, but neither a tar archive nor an HDF5 file nor text"
        if head[257:262] == b"ustar":
            return "10x_tarball", "a tar archive, as a 10x tarball can be"
        if head.startswith(ZIP_MAGIC):
            try:
                with zipfile.ZipFile(path) as archive:
                    if any(name.startswith("xl/") for name in archive.namelist()):
                        return None, ("an Excel workbook: save its sheet as CSV (comma- or tab-separated text) and "
                                      "give that file as the source (a count matrix as a counts_table)")
            except zipfile.BadZipFile:  # its directory is at the end
                return None, "a zip archive that does not open whole (a cut-off download, most likely)"
            # The download takes what a dataset reads out of a zip (unzip_source); a file read directly is not one.
            return None, ("a zip archive: unzip it and give the folder it makes (a 10x matrix folder) or the file in "
                          "it as the source")
        if head.startswith(R_DATA_SIGNATURES):
            return None, R_DATA_ADVICE
        if head[:8] == HDF5_SIGNATURE:
            with h5py.File(path, "r") as h5:
                if isinstance(h5.get("matrix"), h5py.Group):
                    return "10x_h5", "a 10x HDF5 matrix"
                if "X" in h5 and "obs" in h5:
                    return "h5ad", "an AnnData .h5ad file"
                if "matrix" in h5 and "row_attrs" in h5 and "col_attrs" in h5:
                    return "loom", "a loom file"
                # HDF5 formats that no dataset format reads; each has a one-line conversion to .h5ad.
                if h5.attrs.get("encoding-type") == "MuData" or isinstance(h5.get("mod"), h5py.Group):
                    return None, ("a MuData .h5mu file: write its RNA modality as an .h5ad (mudata: "
                                  "mudata.read_h5mu(path)[\"rna\"].write_h5ad(new_path)) and give that file as the "
                                  "source")
                if "assays" in h5 and "meta.data" in h5:
                    return None, ("a Seurat .h5Seurat file: convert it to an .h5ad (SeuratDisk: Convert(path, "
                                  "dest = \"h5ad\")) and give that file as the source")
            return None
        return text_kind(head)
    except OSError:
        pass
    return None


def text_kind(block: bytes, compression: str = "") -> tuple[str | None, str] | None:
    """(format, description) of a file whose first bytes (decompressed) are ``block`` where they are text: a
    delimited table or a Matrix Market file; None where they are not text."""
    if not block or b"\0" in block:
        return None
    try:
        text = block.decode("utf-8")
    except UnicodeDecodeError as error:  # the block may end within a character; binary fails at its start
        text = block[:error.start].decode("utf-8") if error.start > len(block) - 4 else ""
    lines = text.splitlines()
    cut = not text.endswith(("\n", "\r"))  # the block ends within a line
    if cut and len(lines) > 1:
        lines.pop()
    while len(lines) > 1 and lines[0].startswith("##"):  # a table's comment lines (BD Rhapsody's)
        lines.pop(0)
    if not lines:
        return None
    if lines[0].startswith("%%MatrixMarket"):
        return None, (f"a {compression}Matrix Market file alone: a 10x_tarball source is the folder (or tarball) "
                      "that holds it with its barcodes and genes or features lists")
    if lines[0].lstrip().lower().startswith(("<!doctype html", "<html", "<?xml")):
        return None, WEB_PAGE
    for separator in TABLE_SEPARATORS:
        # A table's header has as many fields as its lines, or one fewer (R's write.table), at least two; a
        # header alone is a table's only where it is longer than the block (a wide table's).
        widths = [len(fields) for fields in csv.reader(lines[:2], delimiter=separator)]
        if widths[0] > 1 and (widths[1] - widths[0] in (0, 1) if len(widths) > 1 else cut):
            return "counts_table", f"a {compression}delimited text table"
    return None


WEB_PAGE = "a web page, not data (a server's error or sign-in page?)"


def is_web_page(path: str | Path) -> bool:
    """Whether ``path`` holds a web page (a share link's page, a server's error) where data were expected."""
    return detected_format(path) == (None, WEB_PAGE)


def format_hint(path: str | Path, expected: str) -> str:
    """'; it is ..., so the dataset's format may be ...' where the file looks like another format (or
    '; it is ...' where it looks like none as it is), else ''."""
    detected = detected_format(path)
    if detected is None or detected[0] == expected:
        return ""
    if detected[0] is None:
        return f"; it is {detected[1]}"
    return f"; it is {detected[1]}, so the dataset's format may be {detected[0]}"


def container_problem(path: str | Path, name: str, sample: str | None = None) -> str | None:
    """Why ``path`` cannot be the file ``name`` says (HDF5 for .h5/.h5ad, a tar archive for .tar.gz holding
    the 10x matrix to read, of several the one ``sample`` names, a complete text count table for .txt), or None.

    Only the container and an archive's list of files are checked, in seconds; the content is the filter
    step's. Run on a download before it is put in place, so that a truncated or wrong file is reported under
    the source the user gave. A whole archive holding no one matrix that ``sample`` picks raises
    MatrixChoiceError (see ``chosen_matrix``).
    """
    if Path(path).stat().st_size == 0:
        return "an empty file (0 bytes)"
    if name.endswith((".h5", ".h5ad", ".loom")):
        try:
            with h5py.File(path, "r"):
                return None
        except OSError as error:
            return (f"not a readable HDF5 file, as {name} must be ({error})"
                    f"{format_hint(path, HDF5_FORMAT_OF_SUFFIX[Path(name).suffix])}")
    if name.endswith(".tsv"):
        return annotation_problem(path)
    if name.endswith(".txt"):
        try:
            table_layout(path)
            if _is_gzipped(path):
                with gzip.open(path, "rb") as stream:  # read to the end, so a truncated download shows here
                    while stream.read(1 << 24):
                        pass
        except InputError as error:
            return str(error).removeprefix(f"{path}: ")
        except (EOFError, gzip.BadGzipFile, zlib.error) as error:
            return f"a truncated or corrupt gzip file ({error})"
        return None
    if name.endswith((".tar.gz", ".tar")):
        try:
            with tarfile.open(path, "r:*") as archive:
                members = archive.getmembers()  # reads to the end, so a truncated archive shows here
        except TAR_OPEN_ERRORS as error:
            return (f"not a readable tar archive, as {name} must be ({tar_problem(error)})"
                    f"{format_hint(path, '10x_tarball')}")
        chosen_matrix([PurePosixPath(member.name) for member in members if member.isfile()], sample)
    return None


def pack_10x_folder(folder: str | Path, destination: str | Path, sample: str | None = None,
                    compresslevel: int = 9) -> None:
    """Pack the 10x matrix files under ``folder`` (Cell Ranger's ``filtered_feature_bc_matrix/``, or a
    folder above it) into the tarball :func:`read_10x_tarball` reads; of several, the one ``sample`` names
    (see ``chosen_matrix``).

    Only files with 10x names are packed (an ``outs/`` folder's BAMs are not), links followed, and
    times, owners, modes and the file name left out of the archive, so that the same files always give the
    same bytes and SHA-256 (at gzip's ``compresslevel``: 9 gave the bytes that users' digests of packed folders
    pin).
    """
    folder = Path(folder)
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    try:
        matrix = chosen_matrix([path.relative_to(folder) for path in files], sample)
    except ValueError as error:
        raise InputError(f"{folder}: {error}") from None
    matrix_folder = folder / matrix.folder
    beside = {path.name: path for path in files if path.parent == matrix_folder}
    names = set(matrix.matrix_names)
    for role in LIST_ROLES:
        found = _list_file(matrix, role, beside, f"{matrix_folder}:")
        if found is not None:
            names.add(found)
    files = [path for name, path in beside.items() if name in names]
    with open(destination, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0, compresslevel=compresslevel) as packed, \
            tarfile.open(fileobj=packed, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in files:
            member = tarfile.TarInfo((Path(folder.name) / path.relative_to(folder)).as_posix())
            member.size, member.mode = path.stat().st_size, 0o644
            with open(path, "rb") as handle:
                archive.addfile(member, handle)


def read_10x_tarball(path: str | Path, round_counts: bool = False, sample: str | None = None) -> ad.AnnData:
    """Read a Matrix Market matrix folder from a tarball: 10x Genomics' (v2 ``genes.tsv`` or v3
    ``features.tsv.gz``), or another tool's (see MATRIX_LAYOUTS); of several, the one ``sample`` names (see
    ``chosen_matrix``).

    Members are read in memory, never extracted, and unsafe members (absolute paths,
    ``..``, links) are refused. ``round_counts``: see ``integer_counts``.
    """
    path = Path(path)
    try:
        archive = tarfile.open(path, "r:*")
    except TAR_OPEN_ERRORS as error:
        raise InputError(f"{path}: not a readable tar archive ({tar_problem(error)})"
                         f"{format_hint(path, '10x_tarball') or '; is the download complete?'}") from error
    try:
        with archive:
            members = {}
            for member in archive:
                name = _safe_member_name(path, member)
                if member.isfile():
                    members[name] = member
            try:
                matrix = chosen_matrix(list(members), sample)
            except ValueError as error:
                raise InputError(f"{path}: {error}") from None
            layout = matrix.layout
            in_folder = {name.name for name in members if name.parent == matrix.folder}

            def open_member(name: str):
                stream = archive.extractfile(members[matrix.folder / name])
                return gzip.GzipFile(fileobj=stream) if name.endswith(".gz") else stream

            def read_list(role: tuple[str, str, bool]) -> pd.DataFrame | None:
                name = _list_file(matrix, role, in_folder, f"{path}: {matrix.folder}/ has")
                if name is None:
                    return None
                listed = open_member(name).read()
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
            counts = _read_matrix_market(open_member(matrix_name), path, round_counts, matrix_name)
            barcodes, genes, symbols = (read_list(role) for role in LIST_ROLES)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise InputError(f"{path}: the archive is truncated or corrupt ({error})") from error

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
            f"{path}: {matrix_name} is {counts.shape[1]} genes x {counts.shape[0]} cells but the archive lists "
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


def _is_gzipped(path: str | Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


def _open_table_text(path: Path, encoding: str):
    """A count table's text, gzipped or not, line endings as written."""
    return (gzip.open if _is_gzipped(path) else open)(path, "rt", encoding=encoding, newline="")


def text_encodings(start: bytes) -> list[str]:
    """The encodings to try, in turn, on text that starts with ``start``: Excel's "Unicode Text" export is UTF-16
    with a byte-order mark; its CSV on Windows is Windows-1252 where a name is not ASCII ("Naïve")."""
    return ["utf-16"] if start[:2] in (b"\xff\xfe", b"\xfe\xff") else ["utf-8-sig", "cp1252"]


def decoded(path: str | Path, encodings: list[str], read):
    """(``read(encoding)``, encoding) with the first of ``encodings`` that decodes the text ``read`` reads from
    ``path``; InputError where none does."""
    for encoding in encodings:
        try:
            return read(encoding), encoding
        except UnicodeDecodeError as error:
            undecodable = error
    shown = (encoding.removesuffix("-sig") for encoding in encodings)  # utf-8-sig: UTF-8, a byte-order mark skipped
    raise InputError(f"{path}: text in none of the encodings {', '.join(shown)} ({undecodable}); save it as "
                     "UTF-8 text") from undecodable


def _is_float(field: str) -> bool:
    try:
        float(field)
        return True
    except ValueError:
        return False


def _is_number(field: str) -> bool:
    """A count table's value field: a number, or empty or NA (missing: refused later as not a count)."""
    return _is_float(field) or field.strip() in ("", "NA")


def table_layout(path: str | Path) -> tuple[str, list[str], int, list[str]]:
    """(separator, names of the value columns, number of name columns, the encodings to try on the rest: the first
    that decodes these lines, then those after it) of a delimited count table, from its first two lines;
    InputError where they do not make one.

    The first column holds the row names, or the first two gene ids and names; the header names the
    value columns, with or without a field above the name column (R's write.table leaves it out)."""
    path = Path(path)
    hint = format_hint(path, "counts_table")
    if hint:
        raise InputError(f"{path}: not a text count table{hint}")

    def first_two_lines(encoding: str) -> tuple[str, str]:
        with _open_table_text(path, encoding) as handle:
            return _header_line(handle)[0].rstrip("\r\n"), handle.readline().rstrip("\r\n")

    with (gzip.open if _is_gzipped(path) else open)(path, "rb") as handle:
        encodings = text_encodings(handle.read(2))
    try:
        (header, first), encoding = decoded(path, encodings, first_two_lines)
    except (OSError, EOFError, zlib.error) as error:
        raise InputError(f"{path}: not a text count table ({error})") from error
    separator = next((candidate for candidate in TABLE_SEPARATORS if candidate in header), None)
    if separator is None or not first:
        problem = "no line after its header" if separator else "its first line has no tab, comma, semicolon or space"
        raise InputError(f"{path}: not a count table: {problem}")
    # A separator closing every line, as some spreadsheets write, ends no field.
    header, first = (line[:-1] if header.endswith(separator) and first.endswith(separator) else line
                     for line in (header, first))
    header_fields, row = (next(csv.reader([line], delimiter=separator)) for line in (header, first))
    n_names = next((position for position, field in enumerate(row) if _is_number(field)), len(row))
    if n_names > 2 or n_names == len(row):
        raise InputError(f"{path}: its second line starts with {min(n_names, len(row))} fields that are not numbers "
                         f"({', '.join(map(repr, row[:3]))}); a count table has the row names (or gene ids and "
                         "names) in its first column (or two) and counts after them")
    n_names = max(n_names, 1)
    if len(header_fields) == len(row):
        columns = header_fields[n_names:]
    elif len(header_fields) == len(row) - 1:  # no field above the row names
        columns = header_fields[n_names - 1:]
    else:
        raise InputError(f"{path}: its header has {len(header_fields)} fields but its second line {len(row)}")
    if all(map(_is_number, columns)) and len(set(columns)) < len(columns):  # numbered columns are unique
        raise InputError(f"{path}: its first line reads as counts, not as the names of its columns (e.g. "
                         f"{', '.join(map(repr, columns[:3]))}); a count table opens with a header naming its cells "
                         "or genes (anndata's write_csvs and numpy.savetxt write none: write adata.to_df().to_csv("
                         "path) instead, or give the .h5ad)")
    return separator, columns, n_names, encodings[encodings.index(encoding):]


def _header_line(handle) -> tuple[str, int]:
    """A table's header line and its number, after the comment lines ('##') that BD Rhapsody's pipeline opens its
    tables with."""
    number, line = 1, handle.readline()
    while line.startswith("##"):
        number, line = number + 1, handle.readline()
    return line, number


def read_counts_table(path: str | Path, barcodes: Iterable[str], round_counts: bool = False) -> ad.AnnData:
    """Read a delimited text count matrix (tab-, comma-, semicolon- or space-separated, gzipped or not) as
    cells x genes: genes x cells as GEO's tables and Drop-seq's DGE files are, unless more of ``barcodes`` (the
    annotation's; none where the cells are to be clustered) name its rows than its columns.

    Each line's values are parsed by numpy and kept sparse at once, so the dense table is never in memory whole
    (pandas' parser takes minutes over a table of 68,579 columns). ``round_counts``: see ``integer_counts``;
    see ``table_layout`` for the layouts read."""
    path = Path(path)
    separator, columns, n_names, encodings = table_layout(path)
    try:
        (row_names, counts), encoding = decoded(path, encodings, lambda encoding: (
            _table_rows(path, encoding, separator, columns, n_names)))
    except (EOFError, zlib.error, OSError) as error:
        raise InputError(f"{path}: could not be read as a count table ({error})") from error
    if encoding == "cp1252":
        log.info("%s: not UTF-8; read as Windows-1252, as Excel writes CSV on Windows", path)
    counts = integer_counts(counts, path, round_counts)
    row_names = np.array(row_names, dtype=object)
    rows, ids = pd.Index(row_names[:, -1].astype(str)), row_names[:, 0].astype(str)
    barcodes = pd.Index(barcodes)
    if not len(barcodes):  # cells to be clustered: no annotation says which axis holds them, so their names do
        in_rows, in_columns = (int(names.str.fullmatch(CELL_BARCODE.pattern).sum()) for names in (rows,
                                                                                                    pd.Index(columns)))
        chosen_by, unknown = ("names that look like cell barcodes (no annotation), ",
                              "no row or column name looks like a cell barcode")
    else:
        keys = without_gem_suffix(barcodes)
        in_rows, in_columns = (int(without_gem_suffix(names).isin(keys).sum()) for names in (rows, pd.Index(columns)))
        how = ""
        if not in_rows and not in_columns:  # a table R wrote from a data.frame: its column names rewritten
            r_keys = r_names(barcodes)
            in_rows, in_columns = (int(names.isin(r_keys).sum()) for names in (rows, pd.Index(columns)))
            how = " as R's make.names rewrites them"
        if not in_rows and not in_columns:
            # An annotation of several samples names the cells with a sample's tag ('ctrl_AAAC-1'): tried on the axis
            # whose names have fewer lengths (a barcode's) first, the other only where that joins none.
            tagged = pd.Series(np.zeros(len(barcodes)), index=barcodes)
            for names in sorted((rows, pd.Index(columns)), key=lambda names: names.str.len().nunique()):
                joined = labels_across_sample_tags(names, tagged)
                if joined is not None:
                    in_rows, in_columns = (len(joined[0]), 0) if names is rows else (0, len(joined[0]))
                    how = " with a sample's tag around them"
                    break
        chosen_by, unknown = (f"annotation's barcodes{how}, ", "none of the annotation's barcodes names a row or a "
                              "column, as they are, as R's make.names rewrites them or with a sample's tag "
                              "around them")
    cells_in_rows = in_rows > in_columns
    if not in_rows and not in_columns:
        log.warning("%s: %s; reading a cell in each column (genes x cells, the usual layout; e.g. columns %s, rows %s)",
                    path, unknown, columns[:2], rows[:2].tolist())
    log.info("%s: %d rows x %d columns; read with a cell in each %s (of the %s%d name its rows, %d its columns)",
             path, *counts.shape, "row" if cells_in_rows else "column", chosen_by, in_rows, in_columns)
    if cells_in_rows:
        return with_unique_gene_names(ad.AnnData(counts, obs=pd.DataFrame(index=rows), var=pd.DataFrame(
            index=pd.Index(columns))), path)
    var = pd.DataFrame({"gene_ids": ids} if n_names == 2 else {}, index=rows)
    return with_unique_gene_names(ad.AnnData(counts.T.tocsr(), obs=pd.DataFrame(index=pd.Index(columns)), var=var),
                                  path)


def _table_rows(path: Path, encoding: str, separator: str, columns: list[str],
                n_names: int) -> tuple[list[list[str]], sp.csr_matrix]:
    """The names and values of a count table's rows (after its header), the values as a sparse matrix."""
    row_names, row_lengths, indices, values = [], [], [], []
    with _open_table_text(path, encoding) as handle, warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy's word for a field it cannot read
        header_number = _header_line(handle)[1]
        for number, line in enumerate(handle, start=header_number + 1):
            if not line.strip():
                continue
            names, rest = _leading_fields(line, separator, n_names)
            if rest is None:
                raise InputError(f"{path}: line {number} holds no counts after its name ({line[:40].strip()!r})")
            rest = rest.rstrip("\r\n")  # numpy reads "1,2,\n" as [1, 2, -1]
            row = _numbers(rest, separator)
            if row is None and '"' in rest:  # every field quoted, numbers too (Python's csv.QUOTE_ALL)
                row = _numbers(rest.replace('"', ""), separator)
            if row is None:
                raise InputError(_not_a_count(path, number, rest, separator, columns))
            if row.size != len(columns):
                raise InputError(f"{path}: line {number} has {row.size} values but the header names "
                                 f"{len(columns)} columns")
            detected = np.flatnonzero(row)
            row_names.append(names)
            row_lengths.append(detected.size)
            indices.append(detected.astype(np.int32))
            values.append(row[detected])
    indptr = np.concatenate([[0], np.cumsum(row_lengths)])
    return row_names, sp.csr_matrix((np.concatenate(values), np.concatenate(indices), indptr),
                                    shape=(len(row_names), len(columns)))


def _numbers(values: str, separator: str) -> np.ndarray | None:
    """A line's values as numbers, or None where numpy reads one as no number (inside _table_rows' warning filter,
    which makes numpy's complaint an error)."""
    try:
        return np.fromstring(values, sep=separator)
    except (ValueError, DeprecationWarning):
        return None


def _not_a_count(path: Path, number: int, values: str, separator: str, columns: list[str]) -> str:
    """The error for a count table's line whose values numpy could not read: which value, in which column."""
    fields = next(csv.reader([values], delimiter=separator))
    position = next((position for position, field in enumerate(fields) if not _is_float(field)), None)
    where = "" if position is None else (
        f" ({fields[position]!r}, in column {columns[position]!r})" if position < len(columns)
        else f" ({fields[position]!r}, its value {position + 1})")
    return (f"{path}: line {number} holds a value that is not a number{where}; only counts follow the row names (a "
            "missing value, 'NA' or empty, is no count; cell types and other metadata belong in the annotation)")


def _leading_fields(line: str, separator: str, count: int) -> tuple[list[str], str | None]:
    """The first ``count`` fields of a table's line (quoted as R writes names, or not) and the rest of it (None
    where the line ends first)."""
    fields, position = [], 0
    for _ in range(count):
        if line.startswith('"', position):  # a quoted field ends with a quote before the separator
            end = line.find('"' + separator, position + 1)
            fields.append(line[position + 1:end].replace('""', '"'))
            position = end + 2
        else:
            end = line.find(separator, position)
            fields.append(line[position:end])
            position = end + 1
        if end < 0:
            return fields, None
    return fields, line[position:]


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


def gene_expression_features(feature_types, path: Path) -> np.ndarray | None:
    """Which features of a Cell Ranger 3+ matrix to keep, by their types: the Gene Expression ones (antibody
    capture, CRISPR guides, peaks and the like are dropped, as the log says); None where every one is. Refused
    where none is."""
    feature_types = np.asarray(feature_types, dtype=str)
    expression = feature_types == "Gene Expression"
    if not expression.any():
        raise InputError(f"{path}: none of its {len(expression)} features is of type Gene Expression "
                         f"(types: {', '.join(sorted(set(feature_types)))})")
    if expression.all():
        return None
    log.info("%s: keeping the %d Gene Expression features of %d (dropped: %s)", path, expression.sum(),
             len(expression), ", ".join(sorted(set(feature_types[~expression]))))
    return expression


def with_unique_gene_names(adata: ad.AnnData, path: str | Path) -> ad.AnnData:
    """Repeated gene names (10x symbols, or an .h5ad's var_names) suffixed -1, -2, ..., as scanpy's readers do."""
    if not adata.var_names.is_unique:
        log.info("%s: gene names not unique (%d repeats, e.g. %r); suffixing them (-1, -2, ...)",
                 path, adata.var_names.duplicated().sum(), adata.var_names[adata.var_names.duplicated()][0])
        adata.var_names_make_unique()
    return adata


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


def integer_counts(matrix, source: str | Path, round_counts: bool = False) -> sp.csr_matrix:
    """The matrix as int32 CSR counts (no copy when it already is); refused, naming ``source``, when it
    holds anything but raw counts. ``round_counts``: non-integer values are rounded to the nearest integer
    (expected counts, as ambient-RNA correction and EM quantifiers give), unless the cells look normalised."""
    matrix = sp.csr_matrix(matrix)
    problem = counts_problem(matrix, round_counts)
    if problem is not None:
        raise InputError(f"{source}: the count matrix holds {problem}; raw counts are needed (for an .h5ad, "
                         "counts_layer names the layer that holds them)")
    return as_int32_counts(matrix, source, round_counts)


def as_int32_counts(matrix, source: str | Path, round_counts: bool) -> sp.csr_matrix:
    """Checked counts as int32 CSR; with ``round_counts``, non-integer values rounded to the nearest integer
    first (values that round to 0 leave the matrix), with a warning naming ``source``."""
    matrix = sp.csr_matrix(matrix)
    if round_counts and (fractional := matrix.data != np.round(matrix.data)).any():
        matrix = matrix.copy()
        matrix.data = np.round(matrix.data)
        matrix.eliminate_zeros()
        log.warning("%s: %d of %d stored values were not whole numbers and were rounded (round_counts: true)",
                    source, fractional.sum(), len(fractional))
    return matrix if matrix.dtype == np.int32 else matrix.astype(np.int32)


def counts_problem(matrix: sp.spmatrix | np.ndarray | None, round_counts: bool = False) -> str | None:
    """What makes ``matrix`` not raw counts, or None. With ``round_counts`` non-integer values are allowed,
    except where the cells are normalised: rounding those would not give counts."""
    if matrix is None:
        return "no matrix at all (None, as in files that keep their data only in layers)"
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return None
    if not np.all(np.isfinite(values)):
        return "NaN or infinite values"
    if values.min() < 0:
        return f"negative values (min {values.min()})"
    fractional = values != np.round(values)
    if not np.any(fractional):
        return None
    if not round_counts:
        return (f"non-integer values (e.g. {values[fractional][0]:.8g}), as normalised or log-transformed data do "
                "(expected counts, as SoupX or alevin give, can be rounded: round_counts: true in the dataset's "
                "config entry)")
    return normalised_problem(matrix)


def normalised_problem(matrix: sp.spmatrix | np.ndarray) -> str | None:
    """Why non-integer values are normalised data rather than expected counts, or None: every cell sums to
    the same total (scanpy's normalize_total, TPM), or does so after expm1 (normalize_total, then log1p) or after
    2^x - 1 (the log2(TPM + 1) tables of full-length protocols)."""
    matrix = sp.csr_matrix(matrix)
    for what, unlog in (("", None), (" after expm1 (log-normalised)", lambda values: np.expm1(values, out=values)),
                        (" after 2^x - 1 (log2-transformed, as log2(TPM + 1) is)",
                         lambda values: np.subtract(np.exp2(values, out=values), 1, out=values))):
        # Of the stored values only, in place, beside the same indices: no copy of the matrix at PBMC68k's size.
        cells = matrix if unlog is None else sp.csr_matrix(
            (unlog(matrix.data.astype(np.float64)), matrix.indices, matrix.indptr), shape=matrix.shape)
        totals = np.asarray(cells.sum(axis=1, dtype=np.float64)).ravel()
        totals = totals[totals > 0]  # cells without counts stay at 0 through normalisation
        if len(totals) > 1 and totals.max() - totals.min() <= 1e-3 * totals.max():
            return (f"non-integer values whose cells all sum to {np.median(totals):.6g}{what}, as normalised data "
                    "do; rounding them would not give counts")
    return None


def model_file_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a model the train rule saved (a Keras .keras zip archive), or None; checked before
    Keras loads it, whose own message calls a cut-off file "not found"."""
    if Path(path).is_dir():
        return "a folder, not a trained model; give the cvae.keras file the train rule wrote"
    try:
        with zipfile.ZipFile(path) as archive:
            missing = {"config.json", "model.weights.h5"} - set(archive.namelist())
    except zipfile.BadZipFile:
        with open(path, "rb") as handle:
            if handle.read(4) == ZIP_MAGIC:
                return ("a damaged or cut-off .keras file (its zip archive lacks the directory at its end): copy it "
                        "again in full, or retrain")
        return "not a trained model (a .keras file is a zip archive); give the cvae.keras file the train rule wrote"
    if missing:
        return (f"a zip archive without {' or '.join(sorted(missing))}, so not a model saved by Keras; give the "
                "cvae.keras file the train rule wrote")
    return None


# The first header field of an exported table of row names: empty (pandas reads it as 'Unnamed: 0'), or the
# name anndata gives the cell names of most .h5ad files (scanpy's own datasets), which ``obs.to_csv()`` writes.
ROW_NAME_HEADERS = ("Unnamed: 0", "index")


def annotation_row_names(table: pd.DataFrame) -> np.ndarray | None:
    """The row names of a table read with a header, or None: the first column where its header is empty
    (R's write.csv, pandas' to_csv: ``obs.to_csv()`` and Seurat's ``write.csv(meta.data)``) or ``index``
    (``obs.to_csv()`` of an .h5ad whose cell names are so named), or the column pandas made the index where
    the header is one field short (R's write.table)."""
    if not isinstance(table.index, pd.RangeIndex):
        return table.index.to_numpy()
    if len(table.columns) and table.columns[0] in ROW_NAME_HEADERS:
        return table[table.columns[0]].to_numpy()
    return None


def annotation_problem(path: str | Path) -> str | None:
    """Why ``path`` is no annotation table where its first bytes say it is a matrix or another file (the matrix
    and annotation sources swapped, an R or web page given), else None."""
    detected = detected_format(path)
    if detected is None or detected[0] == "counts_table":  # text, or not known: read as a table
        return None
    swapped = " (are the matrix and annotation sources swapped?)" if detected[0] else ""
    return f"not a table of barcodes and cell types, as an annotation is; it is {detected[1]}{swapped}"


def read_annotation(path: str | Path, barcode_column: str, label_column: str) -> pd.Series:
    """Read a barcode-to-cell-type table (tab-, comma- or semicolon-separated, with a header; gzipped or not)."""
    path = Path(path)
    with open(path, "rb") as handle:
        start = handle.read(4)  # the download keeps the name annotation.tsv whatever the source's
    if start == ZIP_MAGIC:
        raise InputError(f"{path}: a zip archive (as an Excel .xlsx workbook is), not a table; save the table as "
                         "tab- or comma-separated text (and unzip it) and give that file")
    problem = annotation_problem(path)
    if problem:
        raise InputError(f"{path}: {problem}")
    gzipped = start[:2] == GZIP_MAGIC
    encodings = text_encodings(start)
    try:
        # The separators are ASCII, so the header finds them in any of the encodings.
        with (gzip.open if gzipped else open)(path, "rt", encoding=encodings[0], errors="replace") as handle:
            header, header_number = _header_line(handle)  # after comment lines, as BD Rhapsody's tables have
        separator = next((candidate for candidate in "\t,;" if candidate in header), "\t")
        table, encoding = decoded(path, encodings, lambda encoding: pd.read_csv(
            path, sep=separator, dtype=str, keep_default_na=False, na_values=[""], skiprows=header_number - 1,
            compression="gzip" if gzipped else None, encoding=encoding))
    except pd.errors.EmptyDataError:
        content = "an empty file" if path.stat().st_size == 0 else "blank lines only"
        raise InputError(f"{path}: holds no table ({content}); a header line naming its columns "
                         f"({barcode_column!r}, {label_column!r}) should open it") from None
    except (pd.errors.ParserError, OSError, EOFError) as error:
        raise InputError(f"{path}: could not be read as a table ({error})") from error
    if encoding == "cp1252":
        log.info("%s: not UTF-8; read as Windows-1252, as Excel writes CSV on Windows", path)
    # Spreadsheets and hand-edited tables pad names and cells ("barcodes, celltype"; "AAAC-1 ").
    table.columns = table.columns.str.strip()
    row_names = annotation_row_names(table)
    if barcode_column not in table.columns and row_names is not None:
        log.warning("%s: no column %r; reading the barcodes from the table's row names (its first column, whose "
                    "header is empty, missing or 'index')", path, barcode_column)
        table = table.reset_index(drop=True)
        table[barcode_column] = row_names
    missing = [column for column in (barcode_column, label_column) if column not in table.columns]
    if len(missing) == 2 and len(table.columns) == 2 and CELL_BARCODE.fullmatch(table.columns[0]):
        # No header: a barcode and its label on each line, as Seurat's write.table(Idents(object), col.names =
        # FALSE) writes them.
        log.warning("%s: no header line (its first line is a barcode, %r, and a label); reading its two columns as "
                    "%r and %r", path, table.columns[0], barcode_column, label_column)
        table = pd.DataFrame([list(table.columns), *table.to_numpy()], columns=[barcode_column, label_column])
        missing = []
    if missing:
        raise InputError(
            f"{path}: no column {', '.join(map(repr, missing))}; the columns are {', '.join(map(repr, table.columns))}"
            f"{did_you_mean(missing, table.columns)}"
        )
    table[barcode_column] = table[barcode_column].str.strip()
    duplicated = table[barcode_column][table[barcode_column].duplicated()]
    if len(duplicated):
        raise InputError(
            f"{path}: {len(duplicated)} barcodes appear more than once (e.g. {duplicated.iloc[0]!r}); "
            "each barcode needs exactly one label"
        )
    return pd.Series(table[label_column].to_numpy(), index=table[barcode_column].to_numpy(), name="cell_type")


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
    matrices = {None: lambda: _in_memory(source.X) if "X" in source.file else None,
                **{name: (lambda layer=layer: layer) for name, layer in source.layers.items()}}
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
                         f"{', '.join(map(repr, columns)) or 'none'}{did_you_mean([label_column], columns)}")


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
                f"integer counts: name {'it' if len(holding_counts) == 1 else 'one'} as counts_layer in the dataset's "
                "config entry" if holding_counts else " (counts_layer names the layer or 'raw' that holds them)")
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
