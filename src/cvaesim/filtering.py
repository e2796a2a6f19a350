"""Attach cell-type labels and drop cells and genes under the configured thresholds."""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd

from . import InputError, did_you_mean
from .clustering import log_normalised, variable_genes

log = logging.getLogger(__name__)

GEM_SUFFIX = r"-\d+$"  # Cell Ranger's barcode suffix: the GEM well (library) the cell came from
# velocyto names a loom's cells '<sample>:<barcode>x' ('possorted_genome_bam_7YT2K:AAACCTGAGAAGGCCTx').
VELOCYTO_CELL_NAME = r"^[^:]+:([ACGTN]+)x$"
# What R's write.table, pandas' astype(str) and spreadsheets leave where a label is missing.
MISSING_LABELS = frozenset({"na", "n/a", "nan", "none", "null"})


@dataclass(frozen=True)
class FilterThresholds:
    """Defaults keep every labelled cell and drop only genes never detected, as the original did."""

    min_counts_per_cell: int = 0
    min_genes_per_cell: int = 0
    min_cells_per_gene: int = 1
    min_cells_per_type: int = 1
    top_genes: int | None = None  # keep only this many of the most variable genes (None: every gene)


def attach_labels(adata: ad.AnnData, labels: pd.Series, matrix: str | Path, annotation: str | Path) -> ad.AnnData:
    """Keep the cells that have a label, in matrix order, with ``obs['cell_type']``."""
    if adata.n_obs == 0:
        raise InputError(f"{matrix}: the matrix holds no cells ({adata.n_obs} x {adata.n_vars})")
    if not adata.obs_names.is_unique:
        duplicated = adata.obs_names[adata.obs_names.duplicated()]
        raise InputError(f"{matrix}: {len(duplicated)} barcodes appear more than once (e.g. {duplicated[0]!r})")
    if labels.dropna().empty:
        raise InputError(f"{annotation}: no barcode has a label ("
                         f"{f'{len(labels)} rows, every label missing' if len(labels) else 'the table has no rows'})")
    labels = labels.dropna()
    shared = adata.obs_names.intersection(labels.index)
    # Tools name the same cells differently: joined where the names say unambiguously which cell is which.
    for rejoin in (labels_across_gem_suffix, labels_across_r_names, labels_across_velocyto_names,
                   labels_across_sample_tags):
        if len(shared) == 0 and (rejoined := rejoin(adata.obs_names, labels)) is not None:
            log.warning("%s: its barcodes are those of %s %s; %d of its %d labelled barcodes joined that way",
                        annotation, matrix, rejoined[1], len(rejoined[0]), len(labels))
            labels = rejoined[0]
            shared = adata.obs_names.intersection(labels.index)
    if len(shared) == 0:
        # An AnnData written from R or from a genes x cells table may hold its cells as variables.
        transposed = ("; its genes (var_names) are named by these barcodes, so the file holds a cell in each "
                      "column: write it transposed (adata.T)" if adata.var_names.isin(labels.index).any() else "")
        raise InputError(
            f"{annotation}: none of its {len(labels)} labelled barcodes is in {matrix} "
            f"(annotation e.g. {labels.index[:2].tolist()}, matrix e.g. {adata.obs_names[:2].tolist()}){transposed}"
        )
    unlabelled = adata.n_obs - len(shared)
    if unlabelled:
        log.warning("%s: %d of %d cells in %s have no label and are dropped", annotation, unlabelled, adata.n_obs, matrix)
    not_in_matrix = len(labels) - len(shared)
    if not_in_matrix:
        log.warning("%s: %d labelled barcodes are not in %s", annotation, not_in_matrix, matrix)
    keep = adata.obs_names.isin(shared)
    labelled = adata[keep].copy()
    labelled.obs["cell_type"] = labels.reindex(labelled.obs_names).to_numpy()
    return labelled


def labels_across_gem_suffix(barcodes: pd.Index, labels: pd.Series) -> tuple[pd.Series, str] | None:
    """The labels under the matrix's barcodes, and how they were joined, where one side carries Cell Ranger's
    GEM-well suffix ('AAACATACAACCAC-1') and the other none (tools that drop it), or None where that is not the
    case, leaves barcodes ambiguous or joins none. Suffixes that differ ('-1' against '-2') are different cells:
    not joined."""
    barcodes, names = pd.Index(barcodes.astype(str)), pd.Index(labels.index.astype(str))
    matrix_suffixed, labels_suffixed = (index.str.contains(GEM_SUFFIX, regex=True) for index in (barcodes, names))
    if matrix_suffixed.all() and not labels_suffixed.any():
        matrix_keys, label_keys = without_gem_suffix(barcodes), names
    elif labels_suffixed.all() and not matrix_suffixed.any():
        matrix_keys, label_keys = barcodes, without_gem_suffix(names)
    else:
        return None
    if not (matrix_keys.is_unique and label_keys.is_unique):
        return None
    joined = labels_by_key(barcodes, matrix_keys, labels, label_keys)
    return (joined, f"but for the GEM-well suffix ('-1') that {'the matrix' if matrix_suffixed.all() else 'it'} "
                    "carries") if len(joined) else None


def labels_by_key(barcodes: pd.Index, matrix_keys, labels: pd.Series, label_keys: pd.Index) -> pd.Series:
    """The labels under the matrix's ``barcodes`` whose keys (``matrix_keys``, one per barcode) are labels' keys
    (``label_keys``, one per label): how the matrix's and the annotation's names are joined where they differ."""
    by_key = pd.Series(labels.to_numpy(), index=label_keys)
    return pd.Series(by_key.reindex(matrix_keys).to_numpy(), index=barcodes, name=labels.name).dropna()


def r_names(names: pd.Index) -> pd.Index:
    """``names`` as R's ``make.names`` rewrites them, as ``data.frame()`` and ``read.csv()`` do to column names
    (a table R wrote with a cell in each column): each character but a letter, digit, '.' or '_' becomes '.'
    ('AAACATACAACCAC-1' becomes 'AAACATACAACCAC.1'), and an 'X' goes before a name that starts with a digit, or
    with '.' and a digit."""
    dotted = pd.Index(names.astype(str)).str.replace(r"[^A-Za-z0-9._]", ".", regex=True)
    return dotted.str.replace(r"^(?=[0-9_]|\.[0-9]|$)", "X", regex=True)


def labels_across_r_names(barcodes: pd.Index, labels: pd.Series) -> tuple[pd.Series, str] | None:
    """The labels under the matrix's barcodes where the matrix names its cells as R's ``make.names`` rewrote the
    annotation's barcodes (see ``r_names``); None where that changes none of them, leaves them ambiguous or
    joins none."""
    names = pd.Index(labels.index.astype(str))
    label_keys = r_names(names)
    if (label_keys == names).all() or not label_keys.is_unique:
        return None
    joined = labels_by_key(barcodes, pd.Index(barcodes.astype(str)), labels, label_keys)
    return (joined, "rewritten there by R's make.names ('AAACATACAACCAC.1' for 'AAACATACAACCAC-1', as a table "
                    "written from an R data.frame names its columns)") if len(joined) else None


def labels_across_velocyto_names(barcodes: pd.Index, labels: pd.Series) -> tuple[pd.Series, str] | None:
    """The labels under the matrix's barcodes where the matrix names its cells as velocyto does
    ('sample:AAACCTGAGAAGGCCTx') and the annotation as Cell Ranger does ('AAACCTGAGAAGGCCT-1' or without the
    suffix); None where it does not, or where the annotation's barcodes repeat once their suffix is dropped
    (several samples': which sample's cell is which, the names do not say)."""
    bare = pd.Index(barcodes.astype(str)).str.extract(VELOCYTO_CELL_NAME)[0]
    label_keys = without_gem_suffix(pd.Index(labels.index.astype(str)))
    if bare.isna().any() or not (pd.Index(bare).is_unique and label_keys.is_unique):
        return None
    joined = labels_by_key(barcodes, bare, labels, label_keys)
    return (joined, "as velocyto names them ('sample:BARCODEx')") if len(joined) else None


def without_gem_suffix(barcodes: pd.Index) -> pd.Index:
    """Barcodes without Cell Ranger's GEM-well suffix, which some tools drop."""
    return pd.Index(barcodes.astype(str)).str.replace(GEM_SUFFIX, "", regex=True)


def labels_across_sample_tags(barcodes: pd.Index, labels: pd.Series) -> tuple[pd.Series, str] | None:
    """The labels under the matrix's barcodes, and how they were joined, where the annotation's barcodes carry a
    sample's tag around them, as an annotation of several samples does (Seurat's merge prefixes each sample's
    barcodes, 'ctrl_AAACATACAACCAC-1'; its integration and anndata.concat add a suffix, '_1', '-0'); None where
    they do not.

    A tag is a prefix ending, or a suffix starting, with a separator. It is joined where at least half of the
    annotation's barcodes carrying it hold one of the matrix's: one sample's cells, not barcodes another sample
    shares with this one by chance. A barcode under two joined tags is ambiguous: None."""
    matrix = set(map(str, barcodes))
    lengths = sorted({len(barcode) for barcode in matrix})
    names = pd.Index(labels.index.astype(str))
    carrying = Counter()  # the annotation's barcodes that read as each tag around a part as long as a barcode
    found = []  # (name, prefix, barcode, suffix) where that part is one of the matrix's
    for name in names:
        readings = list(tag_readings(name, lengths))
        carrying.update({(prefix, suffix) for prefix, _, suffix in readings})
        match = next((reading for reading in readings if reading[1] in matrix), None)
        if match is not None:
            found.append((name, *match))
    if not found:
        return None
    table = pd.DataFrame(found, columns=["name", "prefix", "barcode", "suffix"])
    matched = table.groupby(["prefix", "suffix"], sort=False)["name"].transform("size")
    chosen = table[2 * matched >= [carrying[tag] for tag in zip(table["prefix"], table["suffix"])]]
    if chosen.empty or chosen["barcode"].duplicated().any():
        return None
    tags = [f"{prefix}<barcode>{suffix}" for prefix, suffix in
            chosen[["prefix", "suffix"]].drop_duplicates().itertuples(index=False)]
    shown = ", ".join(tags[:3]) + (f" and {len(tags) - 3} more" if len(tags) > 3 else "")
    by_barcode = pd.Series(labels.to_numpy()[names.get_indexer(chosen["name"])], index=chosen["barcode"].to_numpy(),
                           name=labels.name)
    return by_barcode, f"with a sample's tag around them ({shown}; other tags are other samples')"


def tag_readings(name: str, lengths: list[int]) -> Iterator[tuple[str, str, str]]:
    """Each (prefix, part, suffix) reading of ``name`` as a part of one of ``lengths`` (a barcode's) with a tag
    around it, set off from it by a character that is not a letter or digit ('ctrl_AAAC-1', 'AAAC-1_2')."""
    for length in lengths:
        for start in range(len(name) - length + 1):
            prefix, suffix = name[:start], name[start + length:]
            if (prefix or suffix) and not prefix[-1:].isalnum() and not suffix[:1].isalnum():
                yield prefix, name[start:start + length], suffix


def filter_cells_and_genes(adata: ad.AnnData, thresholds: FilterThresholds, source: str | Path,
                           excluded_types: Sequence[str] = ()) -> ad.AnnData:
    """Drop unlabelled cells and those of the ``excluded_types`` (doublets, unassigned cells), then cells, genes
    and cell types under the thresholds."""
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise InputError(f"{source}: the matrix holds no {'cells' if adata.n_obs == 0 else 'genes'} "
                         f"({adata.n_obs} x {adata.n_vars})")
    stored_zeros = int((adata.X.data == 0).sum())
    if stored_zeros:  # some converters keep them, and so does assigning 0 into a sparse matrix
        log.info("%s: %d explicitly stored zeros dropped: a stored zero is no detection", source, stored_zeros)
        counts = adata.X.copy()  # only then: a copy of PBMC68k's matrix is half a gigabyte
        counts.eliminate_zeros()
        adata = ad.AnnData(counts, obs=adata.obs, var=adata.var)
    counts = adata.X
    labels = adata.obs["cell_type"].astype(object)
    named = labels.notna()
    # 'T cell ' and 'T cell' name one type, as spreadsheets and hand-made tables leave them.
    text = labels[named].map(label_name)
    stripped = text.str.strip()
    padded = stripped.ne(text)
    if padded.any():
        log.warning("%s: %d labels had spaces around them (e.g. %r), removed", source, padded.sum(),
                    text[padded].iloc[0])
    labels = stripped.reindex(labels.index)
    markers = labels.str.lower().isin(MISSING_LABELS)  # NaN is in no set
    if markers.any():
        log.warning("%s: %d cells are labelled %s, a missing-value marker, not a cell type", source, markers.sum(),
                    " or ".join(map(repr, sorted(set(labels[markers])))))
    # A blank label ('' in an .h5ad, spaces in a table) names no cell type either.
    labelled = (labels.notna() & labels.ne("") & ~markers).to_numpy()
    if not labelled.any():
        raise InputError(f"{source}: none of its {adata.n_obs} cells has a label (every label is missing)")
    if not labelled.all():
        log.warning("%s: %d of %d cells have no label and are dropped", source, (~labelled).sum(), adata.n_obs)
    types = set(labels[labelled])
    unknown = [name for name in excluded_types if name not in types]
    if unknown:  # a typo would otherwise keep the doublets it meant to drop
        raise InputError(f"{source}: exclude_types names {', '.join(map(repr, unknown))}, which no cell is labelled; "
                         f"the cell types are {', '.join(map(repr, sorted(types)))}{did_you_mean(unknown, types)}")
    excluded = labelled & labels.isin(excluded_types).to_numpy()
    if excluded.sum() == labelled.sum():
        raise InputError(f"{source}: exclude_types names every cell type ({', '.join(map(repr, sorted(types)))})")
    if excluded.any():
        log.info("%s: %d cells of the excluded types (%s) dropped", source, excluded.sum(),
                 ", ".join(map(repr, excluded_types)))
        labelled = labelled & ~excluded  # a new array: pandas 3 hands out read-only views
    totals = np.asarray(counts.sum(axis=1)).ravel()
    # A barcode without a single count has no expression profile to learn, whatever the thresholds say.
    empty = labelled & (totals == 0)
    if empty.any():
        log.warning("%s: %d of %d labelled cells have no counts and are dropped", source, empty.sum(), labelled.sum())
    keep_cells = (
        labelled
        & ~empty
        & (totals >= thresholds.min_counts_per_cell)
        & (np.diff(counts.indptr) >= thresholds.min_genes_per_cell)
    )
    keep_genes = np.ones(adata.n_vars, dtype=bool)
    if thresholds.top_genes is not None and adata.n_vars > thresholds.top_genes:
        keep_genes = _most_variable_genes(adata[keep_cells], thresholds, source)
    type_sizes = pd.Series(labels.to_numpy()[keep_cells]).value_counts()
    small_types = type_sizes.index[type_sizes < thresholds.min_cells_per_type]
    if len(small_types):
        log.warning("%s: dropping %d cell types with fewer than %d cells: %s%s", source, len(small_types),
                    thresholds.min_cells_per_type, ", ".join(map(str, small_types[:10])),
                    f" and {len(small_types) - 10} more" if len(small_types) > 10 else "")
        keep_cells &= ~labels.isin(small_types).to_numpy()
    filtered = adata[keep_cells]
    detected_in = np.bincount(filtered.X.indices, minlength=filtered.n_vars)
    filtered = filtered[:, keep_genes & (detected_in >= thresholds.min_cells_per_gene)].copy()
    # A cell whose counts all lie in genes left out has no profile left to learn.
    emptied = np.diff(filtered.X.indptr) == 0
    if emptied.any():
        log.warning("%s: %d cells have no count in the %d genes kept and are dropped", source, emptied.sum(),
                    filtered.n_vars)
        filtered = filtered[~emptied].copy()
        keep_cells[np.flatnonzero(keep_cells)[emptied]] = False
    if filtered.n_obs == 0 or filtered.n_vars == 0:
        raise InputError(
            f"{source}: no cells or genes pass the filter thresholds {thresholds} "
            f"({filtered.n_obs} cells x {filtered.n_vars} genes left)"
        )
    kept = labels.to_numpy()[keep_cells].astype(str)
    filtered.obs["cell_type"] = pd.Categorical(kept, categories=type_order(adata.obs["cell_type"], kept))
    filtered.X = filtered.X.astype(np.int32)
    log.info("%s: kept %d of %d cells and %d of %d genes", source, filtered.n_obs, adata.n_obs, filtered.n_vars,
             adata.n_vars)
    return filtered


def _most_variable_genes(cells: ad.AnnData, thresholds: FilterThresholds, source: str | Path) -> np.ndarray:
    """Which genes ``top_genes`` keeps: the most variable in the ``cells`` that pass the cell thresholds, of the
    genes detected in enough of them."""
    detected = np.bincount(cells.X.indices, minlength=cells.n_vars) >= thresholds.min_cells_per_gene
    candidates = np.flatnonzero(detected)
    keep_genes = np.zeros(cells.n_vars, dtype=bool)
    keep_genes[candidates[variable_genes(log_normalised(cells[:, candidates]), thresholds.top_genes)]] = True
    log.info("%s: keeping the %d most variable of %d detected genes (top_genes)", source, keep_genes.sum(),
             detected.sum())
    return keep_genes


# From this many types, a column that gives most cells a type of their own names cells, not types.
MANY_TYPES = 20


def check_labels_are_types(types: pd.Series, label_column: str, source: str | Path) -> None:
    """Refuse, naming ``label_column``, labels that give fewer than two cells to a type on average: a column of
    barcodes or continuous values (a t-SNE coordinate, a QC score), as a wrong column choice gives. The model would
    otherwise train on hundreds of one-cell conditions and simulate each of them."""
    names = types.astype(str).unique()
    if len(names) >= MANY_TYPES and 2 * len(names) > len(types):
        raise InputError(f"{source}: label_column {label_column!r} gives {len(names)} distinct labels to {len(types)} "
                         f"cells (e.g. {', '.join(map(repr, names[:3].tolist()))}), most cells a type of their own; "
                         "name the column of cell-type names or cluster ids (or, for Leiden clusters, lower the "
                         "resolution)")


def label_name(label: object) -> str:
    """A label as text: integer ids that a column with missing values holds as floats read '3', not '3.0'."""
    if isinstance(label, (float, np.floating)) and float(label).is_integer():
        return str(int(label))
    return str(label)


def type_order(source_labels: pd.Series, kept: np.ndarray) -> list[str]:
    """The cell types in the source's own order where its labels are categorical (scanpy's clusters, a curated
    annotation), else integer ids in numeric order ('2' before '10'), else alphabetical: reports and plots follow it."""
    present = set(kept)
    if isinstance(source_labels.dtype, pd.CategoricalDtype):
        names = (label_name(category).strip() for category in source_labels.cat.categories)
        return [name for name in dict.fromkeys(names) if name in present]
    if all(re.fullmatch(r"-?\d+", name) for name in present):
        return sorted(present, key=lambda name: (int(name), name))
    return sorted(present)
