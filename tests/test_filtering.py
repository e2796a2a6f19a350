import logging
import re

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp
from sklearn.metrics import adjusted_rand_score

from cvaesim import InputError, steps
from cvaesim.filtering import FilterThresholds, attach_labels, filter_cells_and_genes
from cvaesim.io import read_10x_tarball
from cvaesim.tables import read_annotation

from conftest import AWKWARD_TYPES, EMBEDDED_ANNOTATION, EMBEDDED_TARBALL, random_counts, write_annotation


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


def test_cells_without_counts_are_dropped_at_the_default_thresholds(small_cells, caplog):
    cells = small_cells.copy()
    dense = cells.X.toarray()
    dense[[4, 7]] = 0  # barcodes that kept no count, as after subsetting an .h5ad to some genes
    cells.X = sp.csr_matrix(dense)
    with caplog.at_level(logging.WARNING):
        filtered = filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad")
    assert filtered.n_obs == cells.n_obs - 2
    assert cells.obs_names[4] not in filtered.obs_names and cells.obs_names[7] not in filtered.obs_names
    assert np.asarray(filtered.X.sum(axis=1)).min() > 0
    assert "cells.h5ad: 2 of 120 labelled cells have no counts and are dropped" in caplog.text



def test_explicitly_stored_zeros_are_no_detection(small_cells, caplog):
    cells = small_cells.copy()
    dense = cells.X.toarray()
    dense[:, 3] = 0
    dense[0, 5:] = 0  # a cell with counts in five genes only
    stored = np.ones_like(dense, dtype=bool)
    stored[1:, 10:] = dense[1:, 10:] > 0  # every entry of the first cell and of ten genes stored, zeros too
    rows, genes = np.nonzero(stored)
    cells.X = sp.csr_matrix((dense[rows, genes], (rows, genes)), shape=dense.shape)
    assert (cells.X.data == 0).any()
    with caplog.at_level(logging.INFO):
        filtered = filter_cells_and_genes(cells, FilterThresholds(min_genes_per_cell=6), "cells.h5ad")
    assert "GENE3" not in filtered.var_names  # no cell counts it: undetected
    assert list(filtered.obs_names) == list(cells.obs_names[(dense > 0).sum(axis=1) >= 6])
    assert cells.obs_names[0] not in filtered.obs_names
    assert not (filtered.X.data == 0).any()
    assert "explicitly stored zeros dropped" in caplog.text

def test_blank_and_missing_labels_name_no_cell_type(small_cells, caplog):
    cells = small_cells.copy()
    cells.obs["cell_type"] = cells.obs["cell_type"].astype(object)
    cells.obs.iloc[:3, cells.obs.columns.get_loc("cell_type")] = ["", "  ", None]
    with caplog.at_level(logging.WARNING):
        filtered = filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad")
    assert filtered.n_obs == cells.n_obs - 3
    assert list(filtered.obs["cell_type"].cat.categories) == sorted(set(small_cells.obs["cell_type"]))
    assert "3 of 120 cells have no label" in caplog.text


def test_excluded_types_are_left_out_and_a_name_no_cell_has_is_refused(small_cells, caplog):
    cells = small_cells.copy()
    cells.obs["cell_type"] = cells.obs["cell_type"].astype(object)
    cells.obs.iloc[:5, cells.obs.columns.get_loc("cell_type")] = "Doublet"
    cells.obs.iloc[5:7, cells.obs.columns.get_loc("cell_type")] = "Doublet "  # padded: the same type
    with caplog.at_level(logging.INFO):
        filtered = filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad", ["Doublet", AWKWARD_TYPES[2]])
    dropped = cells.obs["cell_type"].str.strip().isin(["Doublet", AWKWARD_TYPES[2]])
    assert list(filtered.obs_names) == list(cells.obs_names[~dropped.to_numpy()])
    assert set(filtered.obs["cell_type"]) == set(AWKWARD_TYPES) - {AWKWARD_TYPES[2]}
    assert f"{dropped.sum()} cells of the excluded types ('Doublet', {AWKWARD_TYPES[2]!r}) dropped" in caplog.text
    # A type no cell has (a typo) would keep the cells it meant to drop: refused, with the types there are.
    with pytest.raises(InputError, match=r"cells.h5ad: exclude_types names 'doublet', which no cell is labelled; "
                                         r"the cell types are .*'Doublet'.* \(did you mean 'Doublet'\?\)"):
        filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad", ["doublet"])
    with pytest.raises(InputError, match="cells.h5ad: exclude_types names every cell type"):
        filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad", ["Doublet", *AWKWARD_TYPES])


def test_missing_value_markers_name_no_cell_type(small_cells, caplog):
    cells = small_cells.copy()
    cells.obs["cell_type"] = cells.obs["cell_type"].astype(object)
    # R's write.table writes NA; astype(str) turns NaN into 'nan' before a file is saved.
    cells.obs.iloc[:4, cells.obs.columns.get_loc("cell_type")] = ["NA", "nan", " N/A", "None"]
    with caplog.at_level(logging.WARNING):
        filtered = filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad")
    assert list(filtered.obs_names) == list(cells.obs_names[4:])
    assert list(filtered.obs["cell_type"].cat.categories) == sorted(set(small_cells.obs["cell_type"].iloc[4:]))
    assert "cells.h5ad: 4 cells are labelled 'N/A' or 'NA' or 'None' or 'nan', a missing-value marker" in caplog.text


def test_spaces_around_labels_do_not_make_another_cell_type(small_cells, caplog):
    cells = small_cells.copy()
    cells.obs["cell_type"] = cells.obs["cell_type"].astype(object)
    first = cells.obs["cell_type"].iloc[0]
    cells.obs.iloc[:2, cells.obs.columns.get_loc("cell_type")] = [f"{first} ", f"  {first}"]
    with caplog.at_level(logging.WARNING):
        filtered = filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad")
    assert list(filtered.obs["cell_type"].cat.categories) == sorted(set(small_cells.obs["cell_type"]))
    assert list(filtered.obs["cell_type"]) == [first, first, *small_cells.obs["cell_type"].iloc[2:]]
    assert "cells.h5ad: 2 labels had spaces around them" in caplog.text



def test_an_h5ad_categorical_label_column_keeps_its_order_without_unused_categories(small_cells, tmp_path):
    # scanpy's plots follow a categorical's order; a subset keeps categories no cell has any more.
    cells = small_cells.copy()
    order = sorted(AWKWARD_TYPES, reverse=True)
    cells.obs["annotation"] = pd.Categorical(cells.obs["cell_type"], categories=[order[0], "Gone", *order[1:]])
    cells.write_h5ad(tmp_path / "cells.h5ad")
    steps.filter_dataset(str(tmp_path / "cells.h5ad"), str(tmp_path / "filtered.h5ad"), "h5ad", "annotation")
    filtered = ad.read_h5ad(tmp_path / "filtered.h5ad")
    assert list(filtered.obs["cell_type"].cat.categories) == order
    assert list(filtered.obs["cell_type"]) == list(small_cells.obs["cell_type"])


def test_an_h5ad_without_labels_is_labelled_by_an_annotation_table(small_cells, tmp_path):
    """Raw counts from one place, the cell types from a paper's table: the table labels the cells."""
    cells = small_cells.copy()
    cells.obs = cells.obs.drop(columns="cell_type").assign(leiden="0")  # an obs column the table's name is not
    cells.obs_names = cells.obs_names.str.removesuffix("-1")  # and barcodes without the suffix the table's have
    cells.write_h5ad(tmp_path / "cells.h5ad")
    table = write_annotation(tmp_path / "cells.tsv", small_cells.copy()[10:])
    steps.filter_dataset(str(tmp_path / "cells.h5ad"), str(tmp_path / "filtered.h5ad"), "h5ad", "celltype",
                         annotation=str(table))
    filtered = ad.read_h5ad(tmp_path / "filtered.h5ad")
    assert list(filtered.obs_names) == list(cells.obs_names[10:])
    assert list(filtered.obs["cell_type"]) == list(small_cells.obs["cell_type"][10:])
    assert (filtered.X != small_cells.X[10:]).nnz == 0
    # Without the table, the label column is the .h5ad's, as before.
    with pytest.raises(InputError, match="cells.h5ad: obs has no label column 'celltype'; its columns are 'leiden'"):
        steps.filter_dataset(str(tmp_path / "cells.h5ad"), str(tmp_path / "unlabelled.h5ad"), "h5ad", "celltype")


def test_integer_cluster_ids_are_named_and_ordered_as_numbers(small_cells):
    cells = small_cells.copy()
    ids = np.arange(cells.n_obs) % 12
    with_missing = np.where(np.arange(cells.n_obs) == 0, np.nan, ids)  # floats: 3.0 where 3 was meant
    # As text from an annotation table, as integers, as floats with a missing value, as a categorical of floats.
    for labels in (ids.astype(str), ids, with_missing, pd.Categorical(with_missing)):
        cells.obs["cell_type"] = labels
        filtered = filter_cells_and_genes(cells, FilterThresholds(), "cells.h5ad")
        assert list(filtered.obs["cell_type"].cat.categories) == [str(i) for i in range(12)]
        assert list(filtered.obs["cell_type"]) == [str(i) for i in ids[cells.n_obs - filtered.n_obs:]]

def test_thresholds_drop_cells_genes_and_small_types(small_cells, caplog):
    totals = np.asarray(small_cells.X.sum(axis=1)).ravel()
    cutoff = int(np.median(totals))
    thresholds = FilterThresholds(min_counts_per_cell=cutoff, min_cells_per_gene=5, min_cells_per_type=1000)
    with pytest.raises(InputError, match="no cells or genes pass"):
        filter_cells_and_genes(small_cells, thresholds, "cells.h5ad")
    # The log names the types dropped: the first ten of many.
    rare = small_cells.copy()
    rare.obs["cell_type"] = ["common"] * 100 + [f"rare{i:02d}" for i in range(20)]
    with caplog.at_level(logging.WARNING):
        assert filter_cells_and_genes(rare, FilterThresholds(min_cells_per_type=2), "cells.h5ad").n_obs == 100
    assert ("cells.h5ad: dropping 20 cell types with fewer than 2 cells: rare00, rare01, rare02, rare03, rare04, "
            "rare05, rare06, rare07, rare08, rare09 and 10 more") in caplog.text
    filtered = filter_cells_and_genes(small_cells, FilterThresholds(min_counts_per_cell=cutoff, min_cells_per_gene=5),
                                      "cells.h5ad")
    assert filtered.n_obs == (totals >= cutoff).sum()
    assert (np.bincount(filtered.X.indices, minlength=filtered.n_vars) >= 5).all()


def test_top_genes_keeps_the_most_variable_genes_in_their_order_and_drops_cells_left_without_counts(caplog):
    cells = random_counts(400, 300, ["a", "b", "c"], seed=4)
    detected = cells.X.getnnz(axis=0) > 0  # min_cells_per_gene 1: of the genes any cell has
    assert not detected.all()
    values = ad.AnnData(cells.X[:, detected].astype(np.float32))  # scanpy's tutorials' preparation, in float32
    sc.pp.normalize_total(values, target_sum=1e4)
    sc.pp.log1p(values)
    variable = np.zeros(cells.n_vars, dtype=bool)
    variable[detected] = sc.pp.highly_variable_genes(values, n_top_genes=50, inplace=False)["highly_variable"]
    top = filter_cells_and_genes(cells, FilterThresholds(top_genes=50), "cells.h5ad")
    assert list(top.var_names) == list(cells.var_names[variable]) and top.n_vars == 50
    assert list(top.obs_names) == list(cells.obs_names)
    assert (top.X != cells[:, variable].X).nnz == 0 and top.X.dtype == np.int32
    # More genes asked for than there are: every detected gene, as without the key.
    every = filter_cells_and_genes(cells, FilterThresholds(top_genes=1000), "cells.h5ad")
    assert list(every.var_names) == list(cells.var_names[detected])
    # A cell whose only counts are in a gene left out (top_genes chooses among genes detected in min_cells_per_gene
    # cells) has none left: dropped, with a warning.
    rare = np.flatnonzero(~detected)[0]
    lone = np.zeros((1, cells.n_vars), dtype=np.int32)
    lone[0, rare] = 5
    with_lone = ad.concat([cells, ad.AnnData(sp.csr_matrix(lone), obs=pd.DataFrame({"cell_type": ["a"]}, index=["lone"]),
                                             var=cells.var)])
    for thresholds in (FilterThresholds(top_genes=50, min_cells_per_gene=2), FilterThresholds(min_cells_per_gene=2)):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            kept = filter_cells_and_genes(with_lone, thresholds, "cells.h5ad")
        assert "lone" not in kept.obs_names and cells.var_names[rare] not in kept.var_names
        assert kept.n_obs == cells.n_obs and (np.asarray(kept.X.sum(axis=1)).ravel() > 0).all()
        assert list(kept.obs["cell_type"]) == list(cells.obs["cell_type"])
        assert f"cells.h5ad: 1 cells have no count in the {kept.n_vars} genes kept and are dropped" in caplog.text


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


def test_no_label_at_all_and_an_empty_matrix_are_errors_that_say_so(small_cells):
    with pytest.raises(InputError, match=r"a.tsv: no barcode has a label \(3 rows, every label missing\)"):
        attach_labels(small_cells, pd.Series([None, np.nan, None], index=small_cells.obs_names[:3]), "m", "a.tsv")
    with pytest.raises(InputError, match=r"a.tsv: no barcode has a label \(the table has no rows\)"):
        attach_labels(small_cells, pd.Series([], dtype=object), "m", "a.tsv")
    with pytest.raises(InputError, match=r"m.h5ad: the matrix holds no cells \(0 x 50\)"):
        attach_labels(small_cells[:0].copy(), small_cells.obs["cell_type"], "m.h5ad", "a.tsv")
    unlabelled = small_cells.copy()
    unlabelled.obs["cell_type"] = "NA"
    with pytest.raises(InputError, match="cells.h5ad: none of its 120 cells has a label"):
        filter_cells_and_genes(unlabelled, FilterThresholds(), "cells.h5ad")
    with pytest.raises(InputError, match=r"cells.h5ad: the matrix holds no cells \(0 x 50\)"):
        filter_cells_and_genes(small_cells[:0].copy(), FilterThresholds(), "cells.h5ad")
    with pytest.raises(InputError, match=r"cells.h5ad: the matrix holds no genes \(120 x 0\)"):
        filter_cells_and_genes(small_cells[:, :0].copy(), FilterThresholds(), "cells.h5ad")


@pytest.mark.parametrize("side", ["annotation", "matrix"])
def test_barcodes_are_joined_where_only_one_side_carries_the_gem_well_suffix(small_cells, caplog, side):
    labels = small_cells.obs["cell_type"].copy()
    labels.index = small_cells.obs_names.str.replace("-1", "")  # as tools that drop the suffix write them
    cells = small_cells
    if side == "matrix":  # the annotation keeps the suffix and the matrix has none
        labels.index, cells = small_cells.obs_names, small_cells.copy()
        cells.obs_names = small_cells.obs_names.str.replace("-1", "")
    with caplog.at_level(logging.WARNING):
        labelled = attach_labels(cells, labels, "m.tar.gz", "a.tsv")
    assert list(labelled.obs_names) == list(cells.obs_names)
    assert list(labelled.obs["cell_type"]) == list(small_cells.obs["cell_type"])
    carrier = "it" if side == "matrix" else "the matrix"
    assert (f"a.tsv: its barcodes are those of m.tar.gz but for the GEM-well suffix ('-1') that {carrier} carries; "
            "120 of its 120 labelled barcodes joined that way" in caplog.text)


def test_barcodes_of_other_gem_wells_or_ambiguous_ones_are_not_joined(small_cells):
    two_wells = small_cells.copy()
    two_wells.obs_names = [f"CELL{i // 2:05d}-{1 + i % 2}" for i in range(two_wells.n_obs)]  # each core in both wells
    labels = pd.Series("T", index=[f"CELL{i:05d}" for i in range(60)])
    with pytest.raises(InputError, match="none of its 60 labelled barcodes"):
        attach_labels(two_wells, labels, "m.tar.gz", "a.tsv")
    other_well = pd.Series("T", index=small_cells.obs_names.str.replace("-1", "-2"))
    with pytest.raises(InputError, match="none of its 120 labelled barcodes"):
        attach_labels(small_cells, other_well, "m.tar.gz", "a.tsv")


@pytest.mark.parametrize("tag", ["GSM2_{}", "ctrl:{}", "{}_2", "{}-1"])
def test_an_annotation_of_several_samples_is_joined_through_the_sample_s_tag(small_cells, caplog, tag):
    # As Seurat's merge (a prefix) or integration and anndata.concat (a suffix) name the cells of several samples:
    # this matrix is the second sample; the first and third share some of its barcodes by chance.
    this = small_cells.obs["cell_type"].iloc[5:]
    others = {tag.replace("2", "1").replace("ctrl", "stim").replace("-1", "-0"):
              [*small_cells.obs_names[:3], *(f"OTHER{i:04d}-1" for i in range(37))],
              tag.replace("2", "3").replace("ctrl", "pbs").replace("-1", "-2"): [f"OTHER{i:04d}-1" for i in range(50)]}
    labels = pd.concat([pd.Series(this.to_numpy(), index=[tag.format(name) for name in this.index])]
                       + [pd.Series("Other", index=[other.format(name) for name in names])
                          for other, names in others.items()])
    with caplog.at_level(logging.WARNING):
        labelled = attach_labels(small_cells, labels.sample(frac=1, random_state=0), "m.tar.gz", "a.tsv")
    assert list(labelled.obs_names) == list(small_cells.obs_names[5:])
    assert list(labelled.obs["cell_type"]) == list(this)
    assert (f"a.tsv: its barcodes are those of m.tar.gz with a sample's tag around them ({tag.format('<barcode>')}; "
            "other tags are other samples'); 115 of its 205 labelled barcodes joined that way" in caplog.text)
    assert "5 of 120 cells in m.tar.gz have no label" in caplog.text
    # Only other samples' cells, sharing some barcodes with this one by chance: not joined.
    with pytest.raises(InputError, match="a.tsv: none of its 90 labelled barcodes is in m.tar.gz"):
        attach_labels(small_cells, labels[len(this):], "m.tar.gz", "a.tsv")
    # Two tags each holding the matrix's barcodes: which sample's labels hold is unknown, so not joined.
    twice = pd.concat([labels[:len(this)], pd.Series("Other", index=["copy_" + name for name in this.index])])
    with pytest.raises(InputError, match="none of its 230 labelled barcodes"):
        attach_labels(small_cells, twice, "m.tar.gz", "a.tsv")


def test_a_loom_of_velocyto_is_joined_to_cell_rangers_barcodes(small_cells, caplog):
    rng = np.random.default_rng(0)
    cores = ["".join(rng.choice(list("ACGT"), 16)) for _ in range(small_cells.n_obs)]
    loom = small_cells.copy()
    loom.obs_names = [f"possorted_genome_bam_7YT2K:{core}x" for core in cores]  # velocyto's cell names
    labels = pd.Series(small_cells.obs["cell_type"].to_numpy()[10:], index=[f"{core}-1" for core in cores[10:]])
    with caplog.at_level(logging.WARNING):
        labelled = attach_labels(loom, labels, "cells.loom", "a.tsv")
    assert list(labelled.obs_names) == list(loom.obs_names[10:])
    assert list(labelled.obs["cell_type"]) == list(small_cells.obs["cell_type"][10:])
    assert ("a.tsv: its barcodes are those of cells.loom as velocyto names them ('sample:BARCODEx'); 110 of its 110 "
            "labelled barcodes joined that way" in caplog.text)
    # An annotation of two samples' cells sharing these barcodes: which is this loom's, the names do not say.
    two_samples = pd.concat([labels, labels.set_axis([name.replace("-1", "-2") for name in labels.index])])
    with pytest.raises(InputError, match="none of its 220 labelled barcodes is in cells.loom"):
        attach_labels(loom, two_samples, "cells.loom", "a.tsv")


def test_a_tag_needs_a_separator(small_cells):
    # 'CELL00001-11' is GEM well 11's cell, not well 1's with a tag; 'XCELL00001-1' no tag either.
    for names in ([f"{name}1" for name in small_cells.obs_names], [f"X{name}" for name in small_cells.obs_names]):
        with pytest.raises(InputError, match="none of its 120 labelled barcodes"):
            attach_labels(small_cells, pd.Series("T", index=names), "m.tar.gz", "a.tsv")


def test_embedded_dataset_filters_like_the_original():
    adata = attach_labels(read_10x_tarball(EMBEDDED_TARBALL),
                          read_annotation(EMBEDDED_ANNOTATION, "barcodes", "celltype"),
                          EMBEDDED_TARBALL, EMBEDDED_ANNOTATION)
    filtered = filter_cells_and_genes(adata, FilterThresholds(), EMBEDDED_TARBALL)
    assert filtered.n_obs == 700
    assert filtered.obs["cell_type"].cat.categories.size == 10


def barcode_names(n_cells: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("ACGT"), size=16)) + "-1" for _ in range(n_cells)]


def test_cells_without_types_are_typed_by_their_leiden_clusters(tmp_path):
    cells = random_counts(600, 300, ["a", "b", "c", "d"], seed=1)
    truth = cells.obs["cell_type"].to_numpy()
    counts = cells.X.toarray()
    counts[:3] = 0
    counts[:3, 0] = 1  # three cells under the filter's min_counts_per_cell: not clustered
    unlabelled = ad.AnnData(sp.csr_matrix(counts), obs=pd.DataFrame(index=cells.obs_names), var=cells.var)
    unlabelled.write_h5ad(tmp_path / "cells.h5ad")
    thresholds = {"min_counts_per_cell": 10}
    for name in ("clusters.tsv", "again.tsv"):
        steps.cluster(str(tmp_path / "cells.h5ad"), str(tmp_path / name), "h5ad", resolution=1.0, seed=3,
                      thresholds=thresholds)
    assert (tmp_path / "clusters.tsv").read_bytes() == (tmp_path / "again.tsv").read_bytes()  # seeded
    # The cells are clustered on every gene: the filter's top_genes (the genes to simulate) changes nothing here.
    steps.cluster(str(tmp_path / "cells.h5ad"), str(tmp_path / "top.tsv"), "h5ad", resolution=1.0, seed=3,
                  thresholds={**thresholds, "top_genes": 20})
    assert (tmp_path / "top.tsv").read_bytes() == (tmp_path / "clusters.tsv").read_bytes()
    clusters = pd.read_csv(tmp_path / "clusters.tsv", sep="\t", dtype=str)
    assert list(clusters.columns) == ["barcode", "cluster"]
    assert list(clusters["barcode"]) == list(cells.obs_names[3:])
    # Four well-separated types come back as four clusters, whatever their names.
    assert adjusted_rand_score(truth[3:], clusters["cluster"]) > 0.95
    # The filter reads them as the dataset's annotation.
    steps.filter_dataset(str(tmp_path / "cells.h5ad"), str(tmp_path / "filtered.h5ad"), "h5ad", "cluster",
                         annotation=str(tmp_path / "clusters.tsv"), barcode_column="barcode", thresholds=thresholds)
    filtered = ad.read_h5ad(tmp_path / "filtered.h5ad")
    assert list(filtered.obs_names) == list(clusters["barcode"])
    assert list(filtered.obs["cell_type"].astype(str)) == list(clusters["cluster"])
    assert list(filtered.obs["cell_type"].cat.categories) == sorted(set(clusters["cluster"]), key=int)


def test_too_few_cells_to_cluster_are_refused_naming_the_file(tmp_path):
    cells = random_counts(30, 50, ["a"], seed=1)
    ad.AnnData(cells.X, obs=pd.DataFrame(index=cells.obs_names), var=cells.var).write_h5ad(tmp_path / "few.h5ad")
    with pytest.raises(InputError, match=f"{tmp_path / 'few.h5ad'}: 30 cells pass the filter, too few to cluster "
                                         r"\(at least 45\); give the cell types with label_column instead"):
        steps.cluster(str(tmp_path / "few.h5ad"), str(tmp_path / "clusters.tsv"), "h5ad", resolution=1.0, seed=0)
    assert not (tmp_path / "clusters.tsv").exists()


@pytest.mark.parametrize("cells_in_rows", [False, True])
def test_a_count_table_without_annotation_finds_its_cells_by_their_barcode_names(tmp_path, cells_in_rows):
    cells = random_counts(60, 80, ["a"], seed=2)
    cells.obs_names = barcode_names(60)
    table = pd.DataFrame(cells.X.toarray(), index=cells.obs_names, columns=cells.var_names)
    (table if cells_in_rows else table.T).to_csv(tmp_path / "counts.csv")
    read = steps.read_counts(str(tmp_path / "counts.csv"), "counts_table", False, None, None)
    assert list(read.obs_names) == list(cells.obs_names) and list(read.var_names) == list(cells.var_names)
    assert (read.X != cells.X).nnz == 0


def test_a_count_table_written_from_an_r_data_frame_is_joined_through_r_s_names(tmp_path, caplog):
    # R's data.frame() and read.csv() rewrite column names with make.names: 'AAAC-1' becomes 'AAAC.1', and
    # '1_AAAC-1' (a sample's number before the barcode) 'X1_AAAC.1'. The annotation keeps the names as they were.
    cells = random_counts(80, 40, ["a", "b"], seed=3)
    cells.obs_names = [*barcode_names(40), *(f"{i % 3 + 1}_{name}" for i, name in enumerate(barcode_names(40, 1)))]
    r_names = [("X" if name[0].isdigit() else "") + name.replace("-", ".") for name in cells.obs_names]
    pd.DataFrame(cells.X.toarray().T, index=cells.var_names, columns=r_names).to_csv(tmp_path / "counts.csv")
    annotation = write_annotation(tmp_path / "a.tsv", cells)
    with caplog.at_level(logging.INFO):
        steps.filter_dataset(str(tmp_path / "counts.csv"), str(tmp_path / "filtered.h5ad"), "counts_table",
                             "celltype", annotation=str(annotation))
    filtered = ad.read_h5ad(tmp_path / "filtered.h5ad")
    detected = cells[:, np.asarray((cells.X > 0).sum(axis=0)).ravel() > 0]  # the filter drops genes never seen
    assert list(filtered.obs_names) == r_names and list(filtered.var_names) == list(detected.var_names)
    assert list(filtered.obs["cell_type"]) == list(cells.obs["cell_type"])
    assert (filtered.X != detected.X).nnz == 0
    assert ("read with a cell in each column (of the annotation's barcodes as R's make.names rewrites them, "
            in caplog.text)
    assert ("a.tsv: its barcodes are those of " in caplog.text and "counts.csv rewritten there by R's make.names "
            "('AAACATACAACCAC.1' for 'AAACATACAACCAC-1', as a table written from an R data.frame names its columns); "
            "80 of its 80 labelled barcodes joined that way" in caplog.text)


def test_barcodes_that_r_s_names_would_make_alike_are_not_joined(small_cells):
    # 'CELL00000-1' and 'CELL00000+1' both read 'CELL00000.1' in R's names: which label is that cell's is unknown.
    matrix = small_cells.copy()
    matrix.obs_names = small_cells.obs_names.str.replace("-", ".")
    labels = pd.Series("T", index=[*small_cells.obs_names, "CELL00000+1"])
    with pytest.raises(InputError, match="a.tsv: none of its 121 labelled barcodes is in m.csv"):
        attach_labels(matrix, labels, "m.csv", "a.tsv")
    assert len(attach_labels(matrix, labels[:-1], "m.csv", "a.tsv")) == small_cells.n_obs


def test_a_label_column_giving_most_cells_a_type_of_their_own_is_refused_naming_it(tmp_path):
    # The annotation's other columns, named by mistake: its barcodes, or a t-SNE coordinate.
    cells = random_counts(60, 30, ["T", "B"], seed=4)
    cells.obs_names = barcode_names(60)
    cells.write_h5ad(tmp_path / "cells.h5ad")
    table = pd.DataFrame({"barcodes": cells.obs_names, "tsne_1": np.random.default_rng(0).normal(size=60),
                          "celltype": cells.obs["cell_type"].to_numpy()})
    table.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    # Refused whatever the thresholds (min_cells_per_type would otherwise drop every one-cell type, and say only
    # that no cell passes).
    for column, example, thresholds in (("barcodes", cells.obs_names[0], None),
                                        ("tsne_1", str(table["tsne_1"][0]), {"min_cells_per_type": 2})):
        with pytest.raises(InputError, match=rf"a.tsv: label_column '{column}' gives 60 distinct labels to 60 cells "
                                             rf"\(e.g. '{example}', .*\), most cells a type of their own"):
            steps.filter_dataset(str(tmp_path / "cells.h5ad"), str(tmp_path / "filtered.h5ad"), "h5ad", column,
                                 annotation=str(tmp_path / "a.tsv"), thresholds=thresholds)
        assert not (tmp_path / "filtered.h5ad").exists()
    steps.filter_dataset(str(tmp_path / "cells.h5ad"), str(tmp_path / "filtered.h5ad"), "h5ad", "celltype",
                         annotation=str(tmp_path / "a.tsv"))
    # Twenty types of about three cells each are cell types still.
    cells.obs["cluster"] = [str(i % 20) for i in range(60)]
    cells.write_h5ad(tmp_path / "clusters.h5ad")
    steps.filter_dataset(str(tmp_path / "clusters.h5ad"), str(tmp_path / "clustered.h5ad"), "h5ad", "cluster")
    assert ad.read_h5ad(tmp_path / "clustered.h5ad").obs["cell_type"].nunique() == 20


def test_an_unfiltered_matrix_of_empty_droplets_is_refused_before_clustering(tmp_path, monkeypatch):
    """Cell Ranger's raw matrix: the called cells among many barcodes of a few counts each."""
    cells = random_counts(300, 200, ["a", "b", "c"], seed=2)
    rng = np.random.default_rng(2)
    droplets = sp.random(3_000, 200, density=0.01, random_state=rng, data_rvs=lambda n: np.ones(n), format="csr")
    droplets = droplets[np.asarray(droplets.sum(axis=1)).ravel() > 0]
    raw = ad.AnnData(sp.vstack([cells.X, droplets.astype(np.int32)]).tocsr(), var=cells.var,
                     obs=pd.DataFrame(index=[*cells.obs_names, *(f"DROP{i:05d}-1" for i in range(droplets.shape[0]))]))
    raw.write_h5ad(tmp_path / "raw.h5ad")
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'raw.h5ad'}: the {raw.n_obs} barcodes that pass the "
                                                   "filter have a median of 2 counts, as an unfiltered matrix")):
        steps.cluster(str(tmp_path / "raw.h5ad"), str(tmp_path / "clusters.tsv"), "h5ad", resolution=1.0, seed=0)
    assert not (tmp_path / "clusters.tsv").exists()
    # The cells kept by a library-size threshold, as the message says, are clustered.
    steps.cluster(str(tmp_path / "raw.h5ad"), str(tmp_path / "clusters.tsv"), "h5ad", resolution=1.0, seed=0,
                  thresholds={"min_counts_per_cell": 20})
    clustered = pd.read_csv(tmp_path / "clusters.tsv", sep="\t", dtype=str)["barcode"]
    assert list(clustered) == list(cells.obs_names)
