import random
import time

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from scipy.stats import nbinom

from cvaesim.model import ConditionalConvVAE
from cvaesim.images import build_image_store, to_images
from cvaesim.counts import draw_counts
from cvaesim import InputError
from cvaesim.simulation import (ExpectedExpression, Posteriors, Simulator, SortedColumns, gene_moments_by_type,
                                rank_matched, simulate, sorted_counts_by_type)
from cvaesim.writers import original_table

from conftest import AWKWARD_TYPES


@pytest.fixture
def store(small_cells):
    small_cells.obs["cell_type"] = pd.Categorical(small_cells.obs["cell_type"])
    return build_image_store(small_cells, None, "log1p_gene_max", 0.4, seed=0)


class CountingDecoder:
    """Wraps a decoder to count how often it is called."""

    def __init__(self, decoder):
        self.decoder = decoder
        self.calls = 0

    def predict_on_batch(self, inputs):
        self.calls += 1
        return self.decoder.predict_on_batch(inputs)


def test_cells_are_generated_in_batches_with_names_and_integer_counts(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, seed=0)
    model.decoder = CountingDecoder(model.decoder)
    wanted = {AWKWARD_TYPES[0]: 250, AWKWARD_TYPES[3]: 7}
    simulated = simulate(model, store, wanted, seed=1, batch_size=100)
    assert model.decoder.calls == 3 + 1  # ceil(250 / 100) + ceil(7 / 100), never one per cell
    # Batches of a type about equal in size, not 100, 100 and 50.
    assert [len(batch.indptr) - 1 for batch, _ in Simulator(model, store, batch_size=100).batches(wanted, 1)] == [
        84, 83, 83, 7]
    assert simulated.shape == (257, store.n_vars)
    assert list(simulated.var_names) == list(store.var_names)
    assert simulated.obs["cell_type"].value_counts()[AWKWARD_TYPES[0]] == 250
    assert list(simulated.obs["cell_type"].cat.categories) == list(store.obs["cell_type"].cat.categories)
    assert simulated.X.dtype == np.int32 and simulated.X.min() >= 0
    assert simulated.obs_names.is_unique


class SlowDecoder(CountingDecoder):
    """Takes an unpredictable time, as a busy machine would."""

    def predict_on_batch(self, inputs):
        time.sleep(random.uniform(0, 0.03))
        return super().predict_on_batch(inputs)


def test_simulation_is_seeded(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, seed=0)
    wanted = dict.fromkeys(AWKWARD_TYPES, 20)
    first = simulate(model, store, wanted, seed=5, batch_size=8)
    assert (first.X != simulate(model, store, wanted, seed=5, batch_size=8).X).nnz == 0
    assert (first.X != simulate(model, store, wanted, seed=6, batch_size=8).X).nnz > 0
    # Decoding runs in a second thread; how long it takes must not change a cell.
    model.decoder = SlowDecoder(model.decoder)
    assert (first.X != simulate(model, store, wanted, seed=5, batch_size=8).X).nnz == 0


def test_unknown_type_is_refused(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, seed=0)
    with pytest.raises(ValueError, match="unknown cell types \\['NK'\\]"):
        simulate(model, store, {"NK": 3}, seed=0)


def test_count_sampling_is_integer_and_centred_on_the_expectation():
    rng = np.random.default_rng(0)
    expected = np.full((2000, 3), [0.2, 3.0, 40.0])
    drawn = draw_counts(expected, expected.sum(axis=1), "poisson", rng).toarray()
    assert drawn.dtype == np.int32
    lam = np.array([0.2, 3.0, 40.0])
    assert (np.abs(drawn.mean(axis=0) - lam) < 4 * np.sqrt(lam / len(drawn))).all()  # within 4 standard errors
    # Poisson: variance equals the mean, genes independent.
    assert np.allclose(drawn.var(axis=0), [0.2, 3.0, 40.0], rtol=0.1)
    assert abs(np.corrcoef(drawn[:, 1], drawn[:, 2])[0, 1]) < 0.06
    assert draw_counts(np.array([[0.4, 0.6, 2.5, 0.0]]), [3.5], "round", rng).toarray().tolist() == [[0, 1, 2, 0]]
    # A cell whose profile is all zero stays empty, whatever its library size.
    empty = draw_counts(np.zeros((2, 3)), np.array([10, 0]), "poisson", rng)
    assert empty.nnz == 0 and empty.shape == (2, 3)
    some = draw_counts(np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]]), np.array([50, 50]), "poisson", rng)
    assert some.has_sorted_indices and some.indices.tolist() == [1] and some.indptr.tolist() == [0, 1, 1]


def test_a_drawn_cell_expecting_any_count_has_one_as_every_real_cell_does():
    """Cells of tiny libraries (the draw would leave half of them empty) are drawn given at least one count."""
    n, expected_total = 20_000, 0.7
    profiles = np.tile([1.0, 2.0, 0.0], (n, 1))
    poisson = draw_counts(profiles, np.full(n, expected_total), "poisson", np.random.default_rng(0)).toarray()
    totals = poisson.sum(axis=1)
    assert totals.min() == 1
    # A Poisson total given at least one: P(1) = lambda e^-lambda / (1 - e^-lambda), not one count added to each.
    p_zero = np.exp(-expected_total)
    assert abs((totals == 1).mean() - expected_total * p_zero / (1 - p_zero)) < 0.01
    assert abs(totals.mean() - expected_total / (1 - p_zero)) < 4 * totals.std() / np.sqrt(n)
    assert abs(poisson[:, 0].sum() / totals.sum() - 1 / 3) < 0.01 and poisson[:, 2].sum() == 0
    # Negative binomial: each gene's counts as the draw's, given that the cell has any.
    theta = np.array([0.5, np.inf, 1.0])
    drawn = draw_counts(profiles, np.full(n, expected_total), "negative_binomial", np.random.default_rng(1),
                        dispersion=theta).toarray()
    assert drawn.sum(axis=1).min() == 1
    mean_0, mean_1 = expected_total / 3, 2 * expected_total / 3
    pmf_0 = nbinom.pmf(np.arange(4), theta[0], theta[0] / (theta[0] + mean_0))
    zero_1 = np.exp(-mean_1)
    given_any = pmf_0 / (1 - pmf_0[0] * zero_1)
    given_any[0] = pmf_0[0] * (1 - zero_1) / (1 - pmf_0[0] * zero_1)
    assert np.allclose(np.bincount(drawn[:, 0], minlength=4)[:4] / n, given_any, atol=0.01)
    # Nothing to draw from: cells expecting no count stay empty, and rounding is what it is.
    nothing = draw_counts(np.array([[0.0, 0.0], [1.0, 1.0]]), np.array([5, 0]), "poisson", np.random.default_rng(2))
    assert nothing.nnz == 0
    assert draw_counts(np.array([[0.1, 0.2]]), np.array([0.5]), "round", np.random.default_rng(3)).nnz == 0


def test_negative_binomial_counts_have_the_dispersion_asked_for():
    mean, theta = np.array([0.5, 5.0, 50.0, 5.0]), np.array([0.5, 2.0, 10.0, np.inf])
    drawn = draw_counts(np.tile(mean, (20_000, 1)), np.full(20_000, mean.sum()), "negative_binomial",
                        np.random.default_rng(0), dispersion=theta).toarray()
    assert np.allclose(drawn.mean(axis=0), mean, rtol=0.05)
    # var = mu + mu^2 / theta; an infinite theta is a Poisson.
    assert np.allclose(drawn.var(axis=0), mean + mean**2 / theta, rtol=0.08)
    # Not only the two moments: the whole distribution, e.g. the share of each small count.
    for gene in range(3):
        p = theta[gene] / (theta[gene] + mean[gene])
        observed = np.bincount(drawn[:, gene], minlength=4)[:4] / len(drawn)
        assert np.allclose(observed, nbinom.pmf(np.arange(4), theta[gene], p), atol=0.01), gene
    with pytest.raises(ValueError, match="one dispersion per gene"):
        draw_counts(np.ones((2, 3)), np.ones(2), "negative_binomial", np.random.default_rng(0), dispersion=np.ones(2))


def test_negative_binomial_model_draws_with_its_dispersions(store):
    multinomial = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                                     reconstruction_loss="multinomial", n_genes=store.n_vars)
    with pytest.raises(ValueError, match="negative_binomial loss; this one was trained with multinomial"):
        simulate(multinomial, store, {AWKWARD_TYPES[0]: 5}, seed=0, count_sampling="negative_binomial")
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="negative_binomial", n_genes=store.n_vars)
    wanted = {AWKWARD_TYPES[0]: 3000}
    poisson = simulate(model, store, wanted, seed=0, count_sampling="poisson").X.toarray()
    model.dispersion.set_weights([np.full(store.n_vars, np.log(0.5), dtype=np.float32)])
    overdispersed = simulate(model, store, wanted, seed=0, count_sampling="negative_binomial").X.toarray()
    model.dispersion.set_weights([np.full(store.n_vars, np.log(1e4), dtype=np.float32)])
    nearly_poisson = simulate(model, store, wanted, seed=0, count_sampling="negative_binomial").X.toarray()
    # The same model and libraries: same means, more zeros and spread with a small theta.
    assert np.allclose(overdispersed.mean(axis=0).sum(), poisson.mean(axis=0).sum(), rtol=0.02)
    assert (overdispersed == 0).mean() > (poisson == 0).mean() + 0.1
    assert overdispersed.var(axis=0).sum() > 1.5 * poisson.var(axis=0).sum()
    assert abs((nearly_poisson == 0).mean() - (poisson == 0).mean()) < 0.01
    # Calibrated means keep the model's own negative-binomial draw.
    model.dispersion.set_weights([np.full(store.n_vars, np.log(0.5), dtype=np.float32)])
    calibrated = simulate(model, store, wanted, seed=0, count_sampling="negative_binomial",
                          calibration="type_means").X.toarray()
    assert (calibrated == 0).mean() > (poisson == 0).mean() + 0.1


def test_original_table_layout(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, seed=0)
    simulated = simulate(model, store, {AWKWARD_TYPES[1]: 3}, seed=0)
    table = original_table(simulated)
    assert list(table.columns) == [*simulated.var_names, "cell_type"]
    assert (table["cell_type"] == AWKWARD_TYPES[1]).all()
    assert np.array_equal(table.iloc[:, :-1].to_numpy(), simulated.X.toarray())
    assert isinstance(simulated, ad.AnnData)


def test_resampled_libraries_come_from_training_cells_of_the_type(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, seed=0)
    wanted = {AWKWARD_TYPES[2]: 200}
    simulated = simulate(model, store, wanted, seed=0, count_sampling="round")
    of_type = (store.obs["cell_type"] == AWKWARD_TYPES[2]) & (store.obs["split"] == "train")
    real = store.obs["total_counts"][of_type].to_numpy()
    totals = np.asarray(simulated.X.sum(axis=1)).ravel()
    # Rounding each gene moves a total by at most half the number of genes.
    assert (totals >= real.min() - store.n_vars / 2).all() and (totals <= real.max() + store.n_vars / 2).all()
    decoded = simulate(model, store, wanted, seed=0, count_sampling="round", library_sizes="decoded")
    assert (decoded.X != simulated.X).nnz > 0


def test_library_normalised_stores_draw_library_sizes_from_the_training_cells(small_cells):
    small_cells.obs["cell_type"] = pd.Categorical(small_cells.obs["cell_type"])
    store = build_image_store(small_cells, None, "log1p_cp10k_gene_max", 0.4, seed=0)
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, seed=0)  # an MSE model: it decodes values
    # The decoder's totals are counts per 10,000, not library sizes.
    with pytest.raises(ValueError, match="library-normalised images decodes counts per 10,000"):
        simulate(model, store, {AWKWARD_TYPES[2]: 5}, seed=0, library_sizes="decoded")
    simulated = simulate(model, store, {AWKWARD_TYPES[2]: 200}, seed=0, count_sampling="round")
    of_type = (store.obs["cell_type"] == AWKWARD_TYPES[2]) & (store.obs["split"] == "train")
    real = store.obs["total_counts"][of_type].to_numpy()
    totals = np.asarray(simulated.X.sum(axis=1)).ravel()
    assert (totals >= real.min() - store.n_vars / 2).all() and (totals <= real.max() + store.n_vars / 2).all()


def test_counts_follow_the_profile_scaled_to_the_library_size():
    profiles = np.array([[1.0, 3.0], [0.0, 0.0]])
    rounded = draw_counts(profiles, np.array([100, 50]), "round", np.random.default_rng(0))
    assert rounded.toarray().tolist() == [[25, 75], [0, 0]]
    drawn = draw_counts(np.tile([1.0, 3.0], (4000, 1)), np.full(4000, 100), "poisson", np.random.default_rng(0))
    assert np.allclose(drawn.toarray().mean(axis=0), [25, 75], rtol=0.02)


def test_multinomial_model_and_posterior_draws(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    with pytest.raises(ValueError, match="library sizes must be 'resampled'"):
        simulate(model, store, {AWKWARD_TYPES[0]: 5}, seed=0, library_sizes="decoded")
    cell_type = AWKWARD_TYPES[1]
    prior = simulate(model, store, {cell_type: 300}, seed=0, count_sampling="round")
    posterior = simulate(model, store, {cell_type: 300}, seed=0, count_sampling="round", latent="posterior")
    assert posterior.uns["simulation"]["latent"] == "posterior"
    assert (prior.X != posterior.X).nnz > 0
    # Proportions times resampled libraries: totals are training libraries (up to rounding).
    of_type = (store.obs["cell_type"] == cell_type) & (store.obs["split"] == "train")
    real = store.obs["total_counts"][of_type].to_numpy()
    totals = np.asarray(posterior.X.sum(axis=1)).ravel()
    assert (totals >= real.min() - store.n_vars / 2).all() and (totals <= real.max() + store.n_vars / 2).all()


def test_a_count_model_refuses_a_store_of_other_genes(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, seed=0, reconstruction_loss="multinomial",
                               n_genes=store.n_vars - 1)
    with pytest.raises(InputError, match=f"the image store: image side 8, cell types 4, genes {store.n_vars}, but the "
                                         f"model was trained on a store with image side 8, cell types 4, genes "
                                         f"{store.n_vars - 1}; give the images.h5ad it was trained on"):
        Simulator(model, store)


def test_paired_libraries_are_those_of_the_training_cells_whose_posteriors_gave_the_latents(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    with pytest.raises(ValueError, match="they need posterior latent draws"):
        Simulator(model, store, library_sizes="paired", latent="prior")
    simulator = Simulator(model, store, library_sizes="paired", latent="posterior")
    cell_type = AWKWARD_TYPES[1]
    _, totals = simulator.expected_profiles(cell_type, 50, np.random.default_rng(7))
    labels = np.eye(4, dtype=np.float32)[np.full(50, simulator.cell_types.index(cell_type))]
    _, origins = simulator.draw_latent(cell_type, labels, np.random.default_rng(7))  # the same draws again
    assert set(origins) <= set(simulator.training_rows[cell_type])
    training = store.obs[store.obs["split"] == "train"]
    assert np.array_equal(totals, training["total_counts"].to_numpy()[origins])
    assert (training["cell_type"].to_numpy()[origins] == cell_type).all()
    # Each library stays with its cell: resampling draws them independently of the latents.
    _, resampled = Simulator(model, store, latent="posterior").expected_profiles(cell_type, 50,
                                                                               np.random.default_rng(7))
    assert not np.array_equal(resampled, totals)


def origins_of(simulator: Simulator, cells_per_type: dict[str, int]) -> np.ndarray:
    """The training cells whose posteriors gave the latents of the simulated cells, in order."""
    origins, draw_latent = [], simulator.draw_latent

    def recording(*arguments):
        latent, rows = draw_latent(*arguments)
        origins.append(rows)
        return latent, rows

    simulator.draw_latent = recording
    list(simulator.batches(cells_per_type, seed=3))
    return np.concatenate(origins)


def test_balanced_origins_use_each_training_cell_once_before_any_twice(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    with pytest.raises(ValueError, match="unknown origins 'twice'"):
        Simulator(model, store, latent="posterior", origins="twice")
    cell_type, other = AWKWARD_TYPES[0], AWKWARD_TYPES[2]
    balanced = Simulator(model, store, batch_size=7, latent="posterior")  # balanced by default
    members = balanced.training_rows[cell_type]
    n_training = len(members)
    assert n_training > 14  # several batches of 7
    # Fewer cells than training cells, over several batches: no posterior twice.
    fewer = origins_of(balanced, {cell_type: n_training - 1, other: 0})
    assert len(fewer) == len(set(fewer)) == n_training - 1 and set(fewer) <= set(members)
    # Two and a half times as many: every training cell gives two or three cells.
    many = origins_of(Simulator(model, store, batch_size=7, latent="posterior"), {cell_type: 5 * n_training // 2})
    uses = pd.Series(many).value_counts()
    assert set(uses.index) == set(members) and set(uses) == {2, 3} and (uses == 3).sum() == n_training // 2
    # Independent draws repeat training cells long before all are used.
    independent = origins_of(Simulator(model, store, batch_size=7, latent="posterior", origins="independent"),
                             {cell_type: n_training})
    assert len(set(independent)) < n_training
    assert simulate(model, store, {cell_type: 3}, seed=0, latent="posterior").uns["simulation"]["origins"] == \
        "balanced"


def test_posterior_draws_encode_each_training_cell_once(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    simulator = Simulator(model, store, batch_size=16, latent="posterior")
    counting = CountingEncoder(model.encoder)
    model.encoder = counting
    cell_type = AWKWARD_TYPES[1]
    n_training = len(simulator.training_rows[cell_type])
    list(simulator.batches({cell_type: 40 * n_training}, seed=0))
    # Every training cell of the type is drawn in 40x as many cells, and encoded exactly once.
    assert counting.cells == n_training == simulator.is_encoded.sum()
    rows = simulator.training_rows[cell_type]
    images = to_images(simulator.training_values[rows], simulator.pixel, simulator.side)
    labels = np.eye(4, dtype=np.float32)[np.full(len(rows), simulator.cell_types.index(cell_type))]
    z_mean, z_log_var = counting.encoder.predict_on_batch([images, labels])
    assert np.allclose(simulator.z_mean[rows], z_mean, atol=1e-6)
    assert np.allclose(simulator.z_log_var[rows], z_log_var, atol=1e-6)


def test_posteriors_saved_after_training_replace_encoding(store, tmp_path):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    wanted = dict.fromkeys(AWKWARD_TYPES, 30)
    lazy = Simulator(model, store, batch_size=16, latent="posterior")
    lazily_drawn = lazy.to_anndata(wanted, seed=2)
    path = tmp_path / "posteriors.npz"
    Posteriors.of_training_cells(model, store).save(path)
    saved = Posteriors.load(path)
    assert list(saved.cells) == list(store.obs_names[store.obs["split"] == "train"])
    assert np.allclose(saved.z_mean[lazy.is_encoded], lazy.z_mean[lazy.is_encoded], atol=1e-5)
    assert np.allclose(saved.z_log_var[lazy.is_encoded], lazy.z_log_var[lazy.is_encoded], atol=1e-5)
    model.encoder = counting = CountingEncoder(model.encoder)
    drawn = Simulator(model, store, batch_size=16, latent="posterior", posteriors=saved).to_anndata(wanted, seed=2)
    assert counting.cells == 0
    # The same posteriors up to float rounding, hence (nearly always) the same cells.
    assert (drawn.X != lazily_drawn.X).nnz <= 0.01 * drawn.X.nnz
    # Posteriors of other cells, or no posteriors file at all, are refused with the file's name.
    other = Posteriors(saved.cells[::-1], saved.z_mean, saved.z_log_var, str(path))
    with pytest.raises(InputError, match="posteriors.npz: its cells are not the training cells"):
        Simulator(model, store, latent="posterior", posteriors=other)
    wider = Posteriors(saved.cells, np.hstack([saved.z_mean] * 2), np.hstack([saved.z_log_var] * 2), str(path))
    with pytest.raises(InputError, match="posteriors.npz: 6 latent dimensions, the model has 3"):
        Simulator(model, store, latent="posterior", posteriors=wider)
    (tmp_path / "broken.npz").write_bytes(b"not numpy")
    whole = path.read_bytes()
    (tmp_path / "cut.npz").write_bytes(whole[: len(whole) // 2])  # numpy raised zipfile's BadZipFile
    for name in ("broken.npz", "cut.npz"):
        with pytest.raises(InputError, match=f"{name}: not a posteriors file written by the train rule, or one cut off"):
            Posteriors.load(tmp_path / name)
    with pytest.raises(InputError, match="absent.npz: no such file"):
        Posteriors.load(tmp_path / "absent.npz")


@pytest.mark.parametrize("scaling", ["log1p_gene_max", "log1p_cp10k_gene_max"])
def test_training_moments_are_those_of_the_training_counts_of_each_type(small_cells, scaling):
    small_cells.obs["cell_type"] = pd.Categorical(small_cells.obs["cell_type"])
    store = build_image_store(small_cells, None, scaling, 0.4, seed=0)
    training = (store.obs["split"] == "train").to_numpy()
    moments = gene_moments_by_type(store, np.flatnonzero(training), chunk_size=7)  # chunks split the types
    counts = small_cells[store.obs_names].X.toarray()
    for cell_type in AWKWARD_TYPES:
        of_type = counts[training & (store.obs["cell_type"] == cell_type).to_numpy()]
        mean, variance = moments[cell_type]
        assert np.allclose(mean, of_type.mean(axis=0)) and np.allclose(variance, of_type.var(axis=0))


def training_shares(store: ad.AnnData) -> dict[str, np.ndarray]:
    moments = gene_moments_by_type(store, np.flatnonzero((store.obs["split"] == "train").to_numpy()))
    return {name: mean / mean.sum() for name, (mean, _) in moments.items()}


def simulated_shares(simulated: ad.AnnData, cell_type: str) -> np.ndarray:
    pooled = np.asarray(simulated[simulated.obs["cell_type"] == cell_type].X.sum(axis=0), dtype=float).ravel()
    return pooled / pooled.sum()


def test_type_mean_calibration_brings_each_type_to_its_training_means(store):
    # An untrained decoder: its mean profiles are far from any type's.
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    wanted = dict.fromkeys(AWKWARD_TYPES[:2], 3000)
    plain = simulate(model, store, wanted, seed=3, latent="posterior")
    calibrated = simulate(model, store, wanted, seed=3, latent="posterior", calibration="type_means")
    assert calibrated.uns["simulation"]["calibration"] == "type_means"
    shares = training_shares(store)
    for cell_type in wanted:
        plain_error = np.abs(simulated_shares(plain, cell_type) - shares[cell_type]).sum()
        calibrated_error = np.abs(simulated_shares(calibrated, cell_type) - shares[cell_type]).sum()
        # What is left is the Poisson noise of the draw and of 1,024 calibration cells.
        assert calibrated_error < 0.1 and calibrated_error < plain_error / 4
        # A gene no training cell of the type expressed is never drawn.
        absent = shares[cell_type] == 0
        assert absent.any() and simulated_shares(calibrated, cell_type)[absent].sum() == 0
    # The cells still differ from one another as before: calibration scales genes, not cells.
    plain_spread = np.std(np.log1p(plain.X.toarray()), axis=0).mean()
    assert np.std(np.log1p(calibrated.X.toarray()), axis=0).mean() == pytest.approx(plain_spread, rel=0.25)
    assert (calibrated.X != simulate(model, store, wanted, seed=3, latent="posterior",
                                     calibration="type_means").X).nnz == 0
    with pytest.raises(ValueError, match="unknown calibration 'gene'"):
        Simulator(model, store, calibration="gene")


def test_type_moment_calibration_tops_up_the_variance_of_each_gene(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    moments = gene_moments_by_type(store, np.flatnonzero((store.obs["split"] == "train").to_numpy()))
    cell_type = AWKWARD_TYPES[0]
    lower_quartiles = {}
    for calibration in ("type_means", "type_moments"):
        simulated = simulate(model, store, {cell_type: 3000}, seed=3, latent="posterior", calibration=calibration)
        counts = simulated.X.toarray()
        real_mean, real_variance = moments[cell_type]
        varies = real_variance > 0
        assert np.median(counts.mean(axis=0)[varies] / real_mean[varies]) == pytest.approx(1, abs=0.05)
        lower_quartiles[calibration] = np.quantile(counts.var(axis=0)[varies] / real_variance[varies], 0.25)
    # Means alone leave a quarter of the genes at under 3/4 of their real variance; the
    # negative-binomial top-up brings them up (it cannot take surplus variance away).
    assert lower_quartiles["type_means"] < 0.75 and lower_quartiles["type_moments"] > 0.9
    with pytest.raises(ValueError, match="cannot be combined with 'round' count sampling"):
        Simulator(model, store, count_sampling="round", calibration="type_moments")
    # Unset (the CLI's default): type moments where the draws are Poisson, type means otherwise.
    assert Simulator(model, store, calibration=None).calibration == "type_moments"
    assert Simulator(model, store, count_sampling="round", calibration=None).calibration == "type_means"


def test_sorted_columns_give_the_count_at_each_rank_of_each_gene():
    import scipy.sparse as sp
    columns = SortedColumns.of(sp.csr_matrix(np.array([[0, 5], [2, 0], [0, 1], [2, 0], [7, 0]])))
    assert list(columns.zeros) == [2, 3] and list(columns.values) == [2, 2, 7, 1, 5]
    assert columns.quantiles(np.array([[0.1, 0.1], [0.5, 0.65], [0.99, 0.99], [1.0, 1.0]])).tolist() == [
        [0, 0], [2, 1], [7, 5], [7, 5]]


def test_rank_matching_gives_each_gene_the_training_counts_in_the_simulated_cells_order():
    import scipy.sparse as sp
    rng = np.random.default_rng(1)
    training = rng.negative_binomial(2, 0.3, size=(60, 40))
    simulated = rng.poisson(rng.gamma(1.0, 3.0, size=(60, 1)) * np.ones((1, 40)))  # cells with a depth of their own
    matched = rank_matched(sp.csr_matrix(simulated), SortedColumns.of(sp.csr_matrix(training)), rng).toarray()
    assert matched.dtype == np.int32
    # As many cells as training cells: each gene's counts are the training counts, reordered.
    assert np.array_equal(np.sort(matched, axis=0), np.sort(training, axis=0))
    # Whichever cell had more of a gene has at least as much after.
    for gene in range(40):
        more = simulated[:, gene][:, None] > simulated[:, gene][None, :]
        assert np.all((matched[:, gene][:, None] >= matched[:, gene][None, :])[more])
    # The cells' depth, shared by every gene, survives: deep cells stay deep.
    assert np.corrcoef(simulated.sum(axis=1), matched.sum(axis=1))[0, 1] > 0.8


def test_type_quantile_calibration_gives_each_gene_its_training_distribution(store):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    training = (store.obs["split"] == "train").to_numpy()
    counts = {name: columns for name, columns in sorted_counts_by_type(store, np.flatnonzero(training),
                                                                        chunk_size=7).items()}
    wanted = {name: columns.n_cells for name, columns in counts.items()}  # one batch each, as many as trained on
    simulated = simulate(model, store, wanted, seed=3, latent="posterior", calibration="type_quantiles",
                         batch_size=512)
    assert simulated.uns["simulation"]["calibration"] == "type_quantiles"
    for cell_type, columns in counts.items():
        of_type = simulated[simulated.obs["cell_type"] == cell_type].X.toarray()
        real = store[training & (store.obs["cell_type"] == cell_type).to_numpy()]
        expected = columns.quantiles((np.arange(columns.n_cells)[:, None] + 0.5) / columns.n_cells
                                     * np.ones((1, store.n_vars)))
        assert np.array_equal(np.sort(of_type, axis=0), expected)  # the training counts, gene by gene
        assert of_type.sum() == pytest.approx(real.obs["total_counts"].sum(), rel=1e-6)
    assert (simulated.X != simulate(model, store, wanted, seed=3, latent="posterior", calibration="type_quantiles",
                                    batch_size=512).X).nnz == 0


@pytest.mark.parametrize(("calibration", "count_sampling"), [("type_moments", "poisson"), ("type_quantiles", "poisson"),
                                                           ("none", "poisson"), ("none", "round")])
def test_the_expected_expression_is_what_the_simulated_counts_scatter_around(store, calibration, count_sampling):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    simulator = Simulator(model, store, batch_size=500, latent="posterior", library_sizes="paired",
                          calibration=calibration, count_sampling=count_sampling)
    wanted = {AWKWARD_TYPES[2]: 3000, AWKWARD_TYPES[0]: 7}
    truth = ExpectedExpression(simulator.var.index)
    simulated = simulator.to_anndata(wanted, seed=4, truth=truth)
    assert (simulated.X != simulator.to_anndata(wanted, seed=4).X).nnz == 0  # gathering it changes no count
    table = truth.table()
    assert list(table.columns) == ["cell_type", "gene", "mean_count", "mean_per_10k"]
    assert list(table["cell_type"].unique()) == list(wanted)
    for cell_type in wanted:
        of_type = table[table["cell_type"] == cell_type]
        assert list(of_type["gene"]) == list(store.var_names)
        # Each cell's shares add up to 10,000, but for cells rounded to no count at all.
        counted = (simulated[simulated.obs["cell_type"] == cell_type].X.sum(axis=1) > 0).mean()
        assert of_type["mean_per_10k"].sum() == pytest.approx(1e4 * (counted if count_sampling == "round" else 1))
    cell_type, n_cells = AWKWARD_TYPES[2], wanted[AWKWARD_TYPES[2]]
    of_type = table[table["cell_type"] == cell_type]
    counts = simulated[simulated.obs["cell_type"] == cell_type].X.toarray().astype(float)
    totals = counts.sum(axis=1, keepdims=True)
    per_10k = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0) * 1e4
    if calibration == "type_quantiles" or count_sampling == "round":
        # Rounded counts, and a batch's counts of each gene at fixed training quantiles, are their own expectation.
        assert np.allclose(counts.mean(axis=0), of_type["mean_count"], rtol=1e-5)
        assert np.allclose(per_10k.mean(axis=0), of_type["mean_per_10k"], rtol=1e-5)
        return
    # Each gene's mean over 3,000 cells within a few standard errors of the truth, and far from the training
    # cells' mean where an uncalibrated decoder (untrained here) puts the cells elsewhere.
    for observed, expected in ((counts, of_type["mean_count"].to_numpy()),
                               (per_10k, of_type["mean_per_10k"].to_numpy())):
        expressed = expected > 0.05 * expected.max()
        standard_error = observed.std(axis=0)[expressed] / np.sqrt(n_cells)
        assert np.abs(observed.mean(axis=0)[expressed] - expected[expressed]).max() < 5 * standard_error.max()
        # About the half-normal's 0.67: an expectation, not the drawn counts' own means (0).
        assert 0.3 < np.median(np.abs(observed.mean(axis=0)[expressed] - expected[expressed]) / standard_error) < 1.5
    training_mean = gene_moments_by_type(store, np.flatnonzero((store.obs["split"] == "train").to_numpy()))[
        cell_type][0]
    off_by = np.abs(of_type["mean_count"].to_numpy() - training_mean).sum() / training_mean.sum()
    assert off_by < 0.05 if calibration == "type_moments" else off_by > 0.2


def test_type_quantiles_warn_of_types_asked_for_too_few_cells_to_rank(store, caplog):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    with caplog.at_level("WARNING"):
        simulate(model, store, {AWKWARD_TYPES[0]: 3, AWKWARD_TYPES[1]: 40}, seed=0, latent="posterior",
                 calibration="type_quantiles")
    assert f"with fewer than 10 ({AWKWARD_TYPES[0]}: 3)" in caplog.text


def test_share_moments_saved_with_the_posteriors_spare_the_calibration_decoding(store, tmp_path):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    path = tmp_path / "posteriors.npz"
    Posteriors.of_training_cells(model, store, seed=4).save(path)
    saved = Posteriors.load(path)
    assert saved.share_mean.shape == saved.share_square.shape == (4, store.n_vars)
    assert np.allclose(saved.share_mean.sum(axis=1), 1)  # shares of each type's expression
    # The same seeded decoding a simulation does when the file has no moments.
    bare = Posteriors(saved.cells, saved.z_mean, saved.z_log_var, str(path))
    cell_types = list(store.obs["cell_type"].cat.categories)
    decoded = Simulator(model, store, latent="posterior", posteriors=bare).share_moments(
        cell_types, np.random.default_rng(4))
    for i, cell_type in enumerate(cell_types):
        assert np.allclose(saved.share_mean[i], decoded[cell_type][0], rtol=1e-5)
        assert np.allclose(saved.share_square[i], decoded[cell_type][1], rtol=1e-5)
    wanted = {AWKWARD_TYPES[0]: 50, AWKWARD_TYPES[1]: 50}
    for posteriors, calls in ((saved, 2), (bare, 2 + 2 * 1024 // 256)):
        model.decoder = counting = CountingDecoder(getattr(model.decoder, "decoder", model.decoder))
        Simulator(model, store, latent="posterior", posteriors=posteriors, calibration="type_means").to_anndata(
            wanted, seed=0)
        assert counting.calls == calls
    other_genes = Posteriors(saved.cells, saved.z_mean, saved.z_log_var, str(path), saved.share_mean[:, :-1],
                             saved.share_square[:, :-1])
    with pytest.raises(InputError, match=r"posteriors.npz: its decoded share moments have shape \(4, 49\), the store"):
        Simulator(model, store, latent="posterior", posteriors=other_genes)


class CountingEncoder:
    """Wraps an encoder to count the cells it encodes."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.cells = 0

    def predict_on_batch(self, inputs):
        self.cells += len(inputs[0])
        return self.encoder.predict_on_batch(inputs)


def test_asking_for_more_cells_than_a_type_has_training_cells_is_warned(store, caplog):
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, latent_dim=3, seed=0,
                               reconstruction_loss="multinomial", n_genes=store.n_vars)
    simulator = Simulator(model, store, latent="posterior")
    rare, common = AWKWARD_TYPES[1], AWKWARD_TYPES[0]
    n_rare = int(((store.obs["cell_type"] == rare) & (store.obs["split"] == "train")).sum())
    list(simulator.batches({rare: n_rare, common: 1}, seed=0))
    assert not caplog.records
    list(simulator.batches({rare: n_rare + 1, common: 1}, seed=0))
    assert [record.levelname for record in caplog.records] == ["WARNING"]
    assert f"{rare}: {n_rare + 1} from {n_rare}" in caplog.text and f"{common}:" not in caplog.text
    caplog.clear()
    # Prior draws take no training cell's posterior.
    list(Simulator(model, store, latent="prior").batches({rare: 3 * n_rare}, seed=0))
    assert not caplog.records
