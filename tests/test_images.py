import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cvaesim import InputError
from cvaesim.images import (build_image_store, fit_scale, from_images, gene_pixels, image_side, scale_counts,
                            stratified_split, to_images, unscale, unscale_counts)


@pytest.mark.parametrize(("n_genes", "side"), [(765, 28), (20387, 144), (16, 4), (17, 8), (784, 28), (785, 32)])
def test_image_side_is_smallest_multiple_of_four_that_holds_the_genes(n_genes, side):
    assert image_side(n_genes) == side


def test_configured_side_is_checked():
    assert image_side(765, 32) == 32
    with pytest.raises(InputError, match="side 24 cannot be used.*765 genes.*smallest is 28"):
        image_side(765, 24)
    with pytest.raises(InputError, match="multiple of 4"):
        image_side(765, 30)


@pytest.mark.parametrize("method", ["global_max", "log1p_gene_max"])
def test_scaling_maps_to_unit_interval_and_inverts_exactly(small_cells, method):
    counts = small_cells.X
    scale = fit_scale(counts, method)
    scaled = scale_counts(counts, scale, method)
    assert scaled.nnz == counts.nnz  # zeros stay zeros: sparse
    assert scaled.data.min() > 0 and scaled.data.max() <= 1
    recovered = unscale(scaled.toarray().astype(np.float64), scale, method)
    assert np.allclose(recovered, counts.toarray(), rtol=1e-5, atol=1e-4)
    assert np.array_equal(np.rint(recovered), counts.toarray())


def test_library_normalised_scaling_removes_depth_and_gives_the_counts_back_with_the_library_sizes(small_cells):
    counts = sp.csr_matrix(small_cells.X)
    # A copy of the first cells at three times their depth: same composition, other library sizes.
    deeper = sp.vstack([counts, counts[:20] * 3], format="csr")
    totals = np.asarray(deeper.sum(axis=1)).ravel()
    method = "log1p_cp10k_gene_max"
    scale = fit_scale(counts, method)
    scaled = scale_counts(deeper, scale, method)
    assert scaled.nnz == deeper.nnz and scaled.data.min() > 0 and scaled.data.max() <= 1
    assert np.allclose(scaled[-20:].toarray(), scaled[:20].toarray(), atol=1e-6)  # depth gone from the images
    by_counts = scale_counts(deeper, fit_scale(counts, "log1p_gene_max"), "log1p_gene_max").toarray()
    assert not np.allclose(by_counts[-20:], by_counts[:20])  # the default scaling keeps it
    recovered = unscale_counts(scaled, scale, method, totals)
    assert np.array_equal(recovered.toarray(), deeper.toarray())
    # Without the library sizes the values are counts per 10,000, not counts.
    per_10k = unscale(scaled.toarray().astype(np.float64), scale, method)
    assert np.allclose(per_10k.sum(axis=1), 1e4, rtol=1e-4)
    with pytest.raises(ValueError, match="need each cell's library size"):
        unscale_counts(scaled, scale, method)


def test_split_reproduces_the_original_sizes_and_is_stratified():
    rng = np.random.default_rng(1)
    proportions = rng.dirichlet(np.ones(11))
    labels = rng.choice([f"type {i}" for i in range(11)], size=68579, p=proportions)
    is_test = stratified_split(labels, 0.4, seed=0)
    assert is_test.sum() == 27432 and (~is_test).sum() == 41147
    for name in np.unique(labels):
        members = labels == name
        assert abs(is_test[members].mean() - 0.4) < 1.0 / members.sum() + 1e-9
    assert np.array_equal(is_test, stratified_split(labels, 0.4, seed=0))
    assert not np.array_equal(is_test, stratified_split(labels, 0.4, seed=1))


def test_a_singleton_type_stays_in_training():
    labels = np.array(["rare"] + ["common"] * 9)
    is_test = stratified_split(labels, 0.4, seed=0)
    assert not is_test[0] and is_test.sum() == 4


def test_images_round_trip_and_padding(small_cells):
    side = image_side(small_cells.n_vars)
    pixel = np.arange(small_cells.n_vars)
    images = to_images(small_cells.X[:5], pixel, side)
    assert images.shape == (5, side, side, 1) and images.dtype == np.float32
    assert np.array_equal(from_images(images, pixel), small_cells.X[:5].toarray())
    assert not images.reshape(5, -1)[:, small_cells.n_vars:].any()


def test_store_records_layout_scaling_and_split(small_cells):
    small_cells.obs["cell_type"] = pd.Categorical(small_cells.obs["cell_type"])
    store = build_image_store(small_cells, None, "log1p_gene_max", 0.4, seed=3)
    assert store.uns["image"]["side"] == 8
    assert sp.issparse(store.X) and store.X.dtype == np.float32
    assert set(store.obs["split"]) == {"train", "test"}
    assert store.obs["split"].eq("test").sum() == 48
    training = small_cells.X[store.obs["split"].eq("train").to_numpy()]
    assert np.allclose(store.var["scale"], np.log1p(np.maximum(training.max(axis=0).toarray().ravel(), 1)))


def test_correlation_order_places_co_expressed_genes_side_by_side():
    # Two programmes of 12 genes each, interleaved in the matrix: even genes on in one half of
    # the cells, odd genes in the other.
    rng = np.random.default_rng(0)
    n_cells, n_genes, side = 400, 24, 8
    high = rng.random(n_cells) < 0.5
    rates = np.where(high[:, None] == (np.arange(n_genes) % 2 == 0)[None, :], 20.0, 0.2)
    counts = sp.csr_matrix(rng.poisson(rates))
    matrix_order = gene_pixels(counts, side, "matrix", seed=0)
    assert matrix_order.tolist() == list(range(n_genes))
    pixels = gene_pixels(counts, side, "correlation", seed=0)
    assert sorted(pixels.tolist()) == list(range(n_genes))  # the first n_genes pixels, each once
    # Side by side in a row: in matrix order no such pair shares a programme; here all but one do.
    row, column = pixels // side, pixels % side
    gene_at = {(r, c): gene for gene, (r, c) in enumerate(zip(row, column))}
    pairs = [(gene_at[r, c], gene_at[r, c + 1]) for (r, c) in gene_at if (r, c + 1) in gene_at]
    assert len(pairs) == 21
    assert sum(left % 2 == right % 2 for left, right in pairs) >= 20
    assert np.array_equal(pixels, gene_pixels(counts, side, "correlation", seed=0))
    with pytest.raises(ValueError, match="unknown gene order"):
        gene_pixels(counts, side, "alphabetical", seed=0)


@pytest.mark.parametrize(("n_cells", "detected"), [(5, 2), (5, 0), (2, 10)])
def test_correlation_order_falls_back_to_matrix_order_on_too_little_data(n_cells, detected):
    counts = np.zeros((n_cells, 10), dtype=np.int64)
    counts[:, :detected] = np.random.default_rng(0).poisson(3, (n_cells, detected)) + 1
    assert gene_pixels(sp.csr_matrix(counts), 4, "correlation", seed=0).tolist() == list(range(10))


def test_images_from_sparse_rows_equal_images_from_dense_rows():
    rng = np.random.default_rng(0)
    dense = rng.random((6, 10)) * (rng.random((6, 10)) < 0.3)
    pixel = rng.permutation(16)[:10]
    sparse = sp.csr_matrix(dense)
    np.testing.assert_array_equal(to_images(sparse, pixel, 4), to_images(dense, pixel, 4))
    # Entries stored twice (a CSR matrix not in canonical form) are summed, as scipy sums them.
    doubled = sp.csr_matrix((np.ones(2), np.array([3, 3]), np.array([0, 2, 2, 2, 2, 2, 2])), shape=(6, 10))
    assert to_images(doubled, pixel, 4).reshape(6, 16)[0, pixel[3]] == 2.0
