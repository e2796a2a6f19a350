"""10x matrices in folders, tarballs and zip archives: which files make up a matrix (Cell Ranger's, STARsolo's,
kallisto|bustools' layouts), which one a dataset's ``sample`` names, and taking it out of its archive.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import shutil
import tarfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath, PurePosixPath
from typing import NamedTuple


from . import InputError
from .formats import TAR_OPEN_ERRORS, ZIP_MAGIC


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


def list_file(matrix: MatrixFiles, role: tuple[str, str, bool], present, where: str | None = None) -> str | None:
    """The name of ``matrix``'s list for ``role`` (one of LIST_ROLES) among the ``present`` names (see
    ``list_names``); None where it is not there, and for a required one InputError prefixed by ``where`` where
    that is given."""
    field, what, required = role
    wanted = list_names(getattr(matrix.layout, field), matrix.prefix)
    found = next((name for name in wanted if name in present), None)
    if found is None and required and where is not None:
        raise InputError(f"{where} no {what} file ({' or '.join(wanted)}) beside the matrix")
    return found


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
        whole = [matrix for matrix in readings if all(list_file(matrix, role, in_folder[name.parent])
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


def safe_member_name(archive: Path, member: tarfile.TarInfo) -> PurePosixPath:
    name = PurePosixPath(member.name)
    if name.is_absolute() or ".." in name.parts:
        raise InputError(f"{archive}: refusing archive member {member.name!r}: it points outside the archive folder")
    if member.issym() or member.islnk():
        raise InputError(f"{archive}: refusing archive member {member.name!r}: links are not allowed")
    return name


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
        found = list_file(matrix, role, beside, f"{matrix_folder}:")
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
