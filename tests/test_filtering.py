import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cvaesim import InputError
from cvaesim.filtering import FilterThresholds, attach_labels, filter_cells_and_genes
from cvaesim.io import read_10x_tarball, read_annotation

from conftest import EMBEDDED_ANNOTATION, EMBEDDED_TARBALL


def test_defaults_keep_every_labelled_cell_and_drop_undetected_genes(small_cells):
    cells = small_cells.copy()
    dense = cells.X.toarray()
    dense[:, 3] = 0  # a gene no cell expresses
    cells.X = sp.csr_matrix(dense)
    filtered = filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad")
    assert filtered.n_obs == cells.n_obs
    assert "GENE3" not in filtered.var_names and filtered.n_vars == cells.n_vars - 1
    assert filtered.obs["cell_type"].dtype == "category"
    assert filtered.X.dtype == np.int32


def test_blank_and_missing_labels_name_no_cell_type(small_cells, caplog):
    cells = small_cells.copy()
    cells.obs["cell_type"] = cells.obs["cell_type"].astype(object)
    cells.obs.iloc[:3, cells.obs.columns.get_loc("cell_type")] = ["", "  ", None]
    with caplog.at_level(logging.WARNING):
        filtered = filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad")
    assert filtered.n_obs == cells.n_obs - 3
    assert list(filtered.obs["cell_type"].cat.categories) == sorted(set(small_cells.obs["cell_type"]))
    assert "3 of 120 cells have no label" in caplog.text


def test_thresholds_drop_cells_genes_and_small_types(small_cells):
    totals = np.asarray(small_cells.X.sum(axis=1)).ravel()
    cutoff = int(np.median(totals))
    thresholds = FilterThresholds(min_counts_per_cell=cutoff, min_cells_per_gene=5, min_cells_per_type=1000)
    with pytest.raises(InputError, match="no cells or genes pass"):
        filter_cells_and_genes(small_cells, thresholds, "cells.h5ad")
    filtered = filter_cells_and_genes(small_cells, FilterThresholds(min_counts_per_cell=cutoff, min_cells_per_gene=5),
                                      "cells.h5ad")
    assert filtered.n_obs == (totals >= cutoff).sum()
    assert (np.bincount(filtered.X.indices, minlength=filtered.n_vars) >= 5).all()


def test_labels_joined_by_barcode_with_warnings(small_cells, caplog):
    labels = small_cells.obs["cell_type"].iloc[10:].copy()
    labels.index = small_cells.obs_names[10:]
    labels["NOT-IN-MATRIX"] = "T"
    with caplog.at_level(logging.WARNING):
        labelled = attach_labels(small_cells, labels, "m.tar.gz", "a.tsv")
    assert labelled.n_obs == small_cells.n_obs - 10
    assert "10 of 120 cells in m.tar.gz have no label" in caplog.text
    assert "1 labelled barcodes are not in m.tar.gz" in caplog.text


def test_no_shared_barcode_is_an_error(small_cells):
    labels = pd.Series(["T", "B"], index=["AAAC-2", "AAAG-2"])
    with pytest.raises(InputError, match="a.tsv: none of its 2 labelled barcodes is in m.tar.gz"):
        attach_labels(small_cells, labels, "m.tar.gz", "a.tsv")


def test_embedded_dataset_filters_like_the_original():
    adata = attach_labels(read_10x_tarball(EMBEDDED_TARBALL),
                          read_annotation(EMBEDDED_ANNOTATION, "barcodes", "celltype"),
                          EMBEDDED_TARBALL, EMBEDDED_ANNOTATION)
    filtered = filter_cells_and_genes(adata, FilterThresholds(), EMBEDDED_TARBALL)
    assert filtered.n_obs == 700
    assert filtered.obs["cell_type"].cat.categories.size == 10
