"""What a downloaded or given file is, told by its first bytes: HDF5, gzip, zip, tar, R data, web page
or text table; and the hints that name the reader or the step a file of another kind needs.
"""

from __future__ import annotations

import csv
import tarfile
import zipfile
import zlib
from pathlib import Path

import h5py

# The formats a dataset's matrix may have (the config's datasets.<name>.format).
FORMATS = ("10x_tarball", "10x_h5", "counts_table", "h5ad", "loom")
TABLE_SEPARATORS = ("\t", ",", ";", " ")
TEXT_SAMPLE_BYTES = 65536


# What a truncated, corrupt or wrong archive raises when opened.
TAR_OPEN_ERRORS = (tarfile.TarError, EOFError, zlib.error, OSError)


def tar_problem(error: Exception) -> str:
    """tarfile's reason, cut to its first line: it lists every compression it tried, one per line."""
    return str(error).splitlines()[0].rstrip(":")


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
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
                if any("pandas_type" in group.attrs for group in h5.values() if isinstance(group, h5py.Group)):
                    return None, ("a pandas HDF5 table (as DataFrame.to_hdf writes one, and the simulate rule's "
                                  "original-style simulated_table.h5): read it with pandas.read_hdf and write its "
                                  "counts as an .h5ad or a CSV (a counts_table)")
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
    """'; it is ..., so the dataset's format (or evaluate's --format) may be ...' where the file looks like another
    format (or '; it is ...' where it looks like none as it is), else ''."""
    detected = detected_format(path)
    if detected is None or detected[0] == expected:
        return ""
    if detected[0] is None:
        return f"; it is {detected[1]}"
    return f"; it is {detected[1]}, so the dataset's format (or evaluate's --format) may be {detected[0]}"


def is_gzipped(path: str | Path) -> bool:
    with open(path, "rb") as handle:
        return handle.read(2) == GZIP_MAGIC


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
