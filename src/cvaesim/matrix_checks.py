"""Checks every reader applies to the matrix it read: integer counts (not normalised values), unique gene
names, Gene Expression features only.
"""

from __future__ import annotations

import logging
from pathlib import Path

import anndata as ad
import numpy as np
import scipy.sparse as sp

from . import InputError

log = logging.getLogger(__name__)


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
                "(expected counts, as SoupX or alevin give, can be rounded: the dataset's round_counts: true, or "
                "evaluate's --round-counts)")
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
