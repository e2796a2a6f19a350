"""Text tables: count tables (genes x cells or cells x genes; tab-, comma-, semicolon- or space-separated;
gzipped or not; any common encoding) and the annotation tables that give cells their types.
"""

from __future__ import annotations

import csv
import gzip
import logging
import re
import warnings
import zlib
from collections.abc import Iterable
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from . import InputError, did_you_mean
from .filtering import labels_across_sample_tags, r_names, without_gem_suffix
from .formats import GZIP_MAGIC, TABLE_SEPARATORS, ZIP_MAGIC, detected_format, format_hint, is_gzipped
from .matrix_checks import integer_counts, with_unique_gene_names

log = logging.getLogger(__name__)


# A cell barcode (Cell Ranger's, Drop-seq's), with a sample tag or GEM-well suffix or not.
CELL_BARCODE = re.compile(r"(\w+[-_.:])?[ACGTN]{8,}([-_.:]\w+)*")


def _open_table_text(path: Path, encoding: str):
    """A count table's text, gzipped or not, line endings as written."""
    return (gzip.open if is_gzipped(path) else open)(path, "rt", encoding=encoding, newline="")


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

    with (gzip.open if is_gzipped(path) else open)(path, "rb") as handle:
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
