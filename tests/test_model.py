import json
import logging
import subprocess
import sys

import anndata as ad
import keras
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from cvaesim.images import build_image_store, scale_counts
from cvaesim.model import ConditionalConvVAE
from cvaesim.plots import plot_history
from cvaesim.steps import filter_dataset, load_model
from cvaesim.training import (TrainingSettings, batches_for, collapse_warning, initial_gene_offsets, train,
                              use_threads)

from conftest import EMBEDDED_ANNOTATION, EMBEDDED_TARBALL, random_counts


@pytest.fixture
def store(small_cells):
    small_cells.obs["cell_type"] = pd.Categorical(small_cells.obs["cell_type"])
    return build_image_store(small_cells, None, "log1p_gene_max", 0.4, seed=0)


def test_original_architecture_has_the_original_parameter_count():
    model = ConditionalConvVAE(image_side=144, n_cell_types=11)
    assert model.encoder.count_params() == 917_412
    assert model.decoder.count_params() == 586_465
    assert model.count_params() == 1_503_877
    assert model.decoder.output_shape == (None, 144, 144, 1)


def test_side_must_suit_the_strides():
    with pytest.raises(ValueError, match="multiple of strides"):
        ConditionalConvVAE(image_side=30, n_cell_types=3)


def test_batches_are_dense_only_per_batch(store):
    batches = batches_for(store, "train", batch_size=16, seed=0)
    (images, labels), = batches[0]
    assert images.shape == (16, 8, 8, 1) and labels.shape == (16, 4)
    assert labels.sum(axis=1).tolist() == [1.0] * 16
    assert len(batches) == int(np.ceil(72 / 16))
    first_epoch = batches.order.copy()
    assert sorted(first_epoch) == list(np.flatnonzero(store.obs["split"] == "train"))
    batches.on_epoch_end()
    assert sorted(batches.order) == sorted(first_epoch) and not np.array_equal(batches.order, first_epoch)
    test_batches = batches_for(store, "test", batch_size=100, seed=None)
    (images, labels), = test_batches[0]
    assert images.shape[0] == 48 and list(test_batches.order) == list(np.flatnonzero(store.obs["split"] == "test"))


def test_type_balance_evens_out_the_cell_types_in_the_batches():
    # 300 training cells: types of 200, 80 and 20 cells.
    store = random_counts(300, 20, ["big"])
    store.obs["cell_type"] = pd.Categorical(["big"] * 200 + ["middle"] * 80 + ["small"] * 20)
    store = build_image_store(store, None, "log1p_gene_max", 0.0, seed=0)
    types = store.obs["cell_type"].to_numpy()
    shares = {}
    for balance in (0.0, 0.5, 1.0):
        batches = batches_for(store, "train", batch_size=32, seed=0, type_balance=balance)
        drawn = []
        for _ in range(20):  # epochs
            drawn.extend(types[batches.order])
            assert len(batches.order) == 300
            batches.on_epoch_end()
        shares[balance] = pd.Series(drawn).value_counts(normalize=True)
    assert shares[0.0].to_dict() == pytest.approx({"big": 2 / 3, "middle": 0.8 / 3, "small": 0.2 / 3})
    # Shares as n^(1 - balance): sqrt(200) : sqrt(80) : sqrt(20) at 0.5, equal at 1.
    half = np.sqrt([200, 80, 20]) / np.sqrt([200, 80, 20]).sum()
    assert shares[0.5][["big", "middle", "small"]].to_numpy() == pytest.approx(half, abs=0.02)
    assert shares[1.0].to_numpy() == pytest.approx([1 / 3] * 3, abs=0.02)


def test_count_split_gives_the_encoder_and_the_loss_disjoint_shares_of_each_cell(store):
    batches = batches_for(store, "train", batch_size=16, seed=0, with_counts=True, count_split=0.5)
    whole = batches_for(store, "train", batch_size=16, seed=0, with_counts=True)
    (images, _, targets), = batches[0]
    (whole_images, _, whole_counts), = whole[0]
    assert images.shape == whole_images.shape and targets.shape == whole_counts.shape
    rows = batches.order[:16]
    counts = batches.to_counts(batches.values[rows], rows)
    encoded, rest = batches.split(counts, 0)
    # Each share scaled back is a binomial part of the counts, and the two parts add up to them.
    encoded_part, rest_part = encoded.toarray() * 0.5, rest.toarray() * 0.5
    assert np.allclose(encoded_part, np.rint(encoded_part)) and np.allclose(rest_part, np.rint(rest_part))
    assert (encoded_part >= 0).all() and (rest_part >= 0).all()
    assert np.allclose(encoded_part + rest_part, counts.toarray())
    assert 0.4 < encoded_part.sum() / counts.sum() < 0.6
    pixels = store.var["pixel"].to_numpy()
    assert np.allclose(targets.reshape(16, -1)[:, pixels], rest.toarray())
    # The encoder's image is its share at the cell's depth, scaled as the store scales counts.
    expected = scale_counts(sp.csr_matrix(encoded), store.var["scale"].to_numpy(), "log1p_gene_max").toarray()
    assert np.allclose(images.reshape(16, -1)[:, pixels], expected)
    # The same split for the same epoch and batch (batches are prepared in parallel threads); a new one next epoch.
    assert np.array_equal(batches.split(counts, 0)[0].toarray(), encoded.toarray())
    batches.on_epoch_end()
    assert not np.array_equal(batches.split(counts, 0)[0].toarray(), encoded.toarray())
    with pytest.raises(ValueError, match="count loss"):
        train(store, TrainingSettings(epochs=1, count_split=0.5), seed=0)
    with pytest.raises(ValueError, match="at least 0 and below 1; got 1.0"):
        train(store, TrainingSettings(epochs=1, reconstruction_loss="multinomial", count_split=1.0), seed=0)


def test_training_is_seeded_and_the_saved_model_reloads(store, tmp_path):
    settings = TrainingSettings(epochs=3, batch_size=16, latent_dim=3, filters=4)
    model, history = train(store, settings, seed=7)
    # Deterministic ops, in full float32 where a GPU would round to TF32 (which cost realism on an H100).
    import tensorflow as tf

    assert not tf.config.experimental.tensor_float_32_execution_enabled()
    assert list(history["epoch"]) == [1, 2, 3]
    assert {"loss", "reconstruction_loss", "kl_loss", "val_loss"} <= set(history.columns)
    assert np.isfinite(history.to_numpy()).all()
    again, history_again = train(store, settings, seed=7)
    for left, right in zip(model.get_weights(), again.get_weights()):
        assert np.array_equal(left, right)
    path = tmp_path / "cvae.keras"
    model.save(path)
    reloaded = load_model(str(path))
    assert reloaded.get_config()["latent_dim"] == 3
    z = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    labels = np.eye(4, dtype=np.float32)[[0, 1, 2, 3, 0]]
    assert np.array_equal(model.decoder.predict_on_batch([z, labels]), reloaded.decoder.predict_on_batch([z, labels]))
    different, _ = train(store, settings, seed=8)
    assert not np.array_equal(model.get_weights()[0], different.get_weights()[0])


def test_a_collapsed_latent_is_reported_and_a_working_one_is_not(tmp_path, caplog):
    # On the embedded cells (structure within types to learn): the original design (MSE on a [0, 1]
    # image, beta 1, latent 2) collapses; the default count likelihood keeps a latent.
    filtered = tmp_path / "filtered.h5ad"
    filter_dataset(str(EMBEDDED_TARBALL), str(filtered), "10x_tarball", "celltype", str(EMBEDDED_ANNOTATION))
    store = build_image_store(ad.read_h5ad(filtered), None, "log1p_gene_max", 0.4, seed=0, gene_order="correlation")
    collapsing = TrainingSettings(epochs=5)  # the original's settings
    working = TrainingSettings(epochs=5, latent_dim=16, beta=0.5, reconstruction_loss="multinomial", gene_offsets=True)
    with caplog.at_level(logging.WARNING, logger="cvaesim.training"):
        _, collapsed = train(store, collapsing, seed=0)
    assert collapsed["kl_loss"].iloc[-1] < 2 and "the latent carries almost nothing" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cvaesim.training"):
        _, kept = train(store, working, seed=0)
    assert kept["kl_loss"].iloc[-1] > 2 and "the latent carries almost nothing" not in caplog.text
    # The report's history figure carries the warning: drawn above the panels, it makes the figure taller.
    assert collapse_warning(kept) is None and collapse_warning(collapsed).startswith("the latent carries")
    heights = {}
    for name, history in (("kept", kept), ("collapsed", collapsed)):
        plot_history(history, tmp_path / f"{name}.png", collapse_warning(history))
        heights[name] = plt.imread(tmp_path / f"{name}.png").shape[0]
    assert heights["collapsed"] > heights["kept"]


def test_loss_is_summed_squared_error_plus_kl():
    keras.utils.set_random_seed(0)
    model = ConditionalConvVAE(image_side=4, n_cell_types=2, filters=2, latent_dim=2, beta=0.5, seed=0)
    images = np.random.default_rng(0).random((3, 4, 4, 1)).astype(np.float32)
    labels = np.eye(2, dtype=np.float32)[[0, 1, 1]]
    total, reconstruction, kl = (
        float(value) for value in model.compute_losses(keras.ops.convert_to_tensor(images),
                                                       keras.ops.convert_to_tensor(labels))
    )
    assert total == pytest.approx(reconstruction + 0.5 * kl, rel=1e-5)
    assert kl >= 0
    z_mean, z_log_var = (np.asarray(value) for value in model.encoder.predict_on_batch([images, labels]))
    expected_kl = (-0.5 * (1 + z_log_var - z_mean**2 - np.exp(z_log_var)).sum(axis=1)).mean()
    assert kl == pytest.approx(expected_kl, rel=1e-3, abs=1e-6)


def test_kl_warmup_raises_the_kl_weight_to_beta_over_its_steps_while_training(store, tmp_path):
    batches = batches_for(store, "train", batch_size=16, seed=0, with_counts=True)
    (images, labels, counts), = batches[0]
    inputs = [keras.ops.convert_to_tensor(part) for part in (images, labels, counts)]
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, reconstruction_loss="multinomial",
                               n_genes=store.n_vars, beta=0.5, kl_warmup_steps=10, seed=0)
    model.compile(optimizer="rmsprop")
    model.optimizer.build(model.trainable_variables)
    for step, weight in ((0, 0.0), (4, 0.2), (10, 0.5), (25, 0.5)):
        model.optimizer.iterations.assign(step)
        total, reconstruction, kl = (float(value) for value in model.compute_losses(*inputs, training=True))
        assert kl > 0 and total == pytest.approx(reconstruction + weight * kl, rel=1e-5), step
    model.optimizer.iterations.assign(0)
    total, reconstruction, kl = (float(value) for value in model.compute_losses(*inputs))  # the test cells' loss
    assert total == pytest.approx(reconstruction + 0.5 * kl, rel=1e-5)
    # Training sets the steps from the epochs (5 batches an epoch here), and the saved model keeps them.
    settings = TrainingSettings(epochs=1, batch_size=16, filters=4, reconstruction_loss="multinomial",
                                kl_warmup_epochs=3)
    trained, _ = train(store, settings, seed=0)
    assert len(batches) == 5 and trained.kl_warmup_steps == 15
    trained.save(tmp_path / "warm.keras")
    assert load_model(tmp_path / "warm.keras").kl_warmup_steps == 15


class Interrupt(keras.callbacks.Callback):
    """Stops training after ``epochs`` epochs, as a cluster time limit would."""

    def __init__(self, epochs):
        super().__init__()
        self.epochs = epochs

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epochs:
            raise KeyboardInterrupt("time limit")


def test_an_interrupted_training_resumes_from_its_last_epoch(store, tmp_path):
    settings = TrainingSettings(epochs=4, batch_size=16, filters=4)
    uninterrupted, full_history = train(store, settings, seed=3)
    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(KeyboardInterrupt):
        train(store, settings, seed=3, checkpoint=checkpoint, fingerprint="run", callbacks=(Interrupt(2),))
    assert json.loads((checkpoint / "state.json").read_text())["epoch"] == 2
    resumed, history = train(store, settings, seed=3, checkpoint=checkpoint, fingerprint="run")
    assert list(history["epoch"]) == [1, 2, 3, 4]
    assert not checkpoint.exists()
    # Weights, optimizer state, sampler state and batch order all resumed: the same model.
    for left, right in zip(uninterrupted.get_weights(), resumed.get_weights()):
        assert np.allclose(left, right, atol=1e-6)
    assert np.allclose(history["loss"], full_history["loss"], rtol=1e-5)


def test_a_checkpoint_of_other_settings_is_not_resumed(store, tmp_path):
    settings = TrainingSettings(epochs=2, batch_size=16, filters=4)
    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(KeyboardInterrupt):
        train(store, settings, seed=3, checkpoint=checkpoint, fingerprint="old", callbacks=(Interrupt(1),))
    _, history = train(store, settings, seed=3, checkpoint=checkpoint, fingerprint="new")
    assert list(history["epoch"]) == [1, 2]


def test_multinomial_loss_is_the_count_likelihood_over_gene_pixels(store):
    keras.utils.set_random_seed(0)
    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, reconstruction_loss="multinomial",
                               n_genes=store.n_vars, seed=0)
    batches = batches_for(store, "train", batch_size=16, seed=0, with_counts=True)
    (images, labels, counts), = batches[0]
    assert np.array_equal(counts.reshape(16, -1)[:, :50], small_counts_of(store, batches.order[:16]))
    assert not counts.reshape(16, -1)[:, 50:].any()
    total, reconstruction, kl = (float(value) for value in model.compute_losses(
        *(keras.ops.convert_to_tensor(part) for part in (images, labels, counts))))
    # A multinomial negative log-likelihood is at least that of the cells' own proportions.
    flat = counts.reshape(16, -1)[:, :50].astype(np.float64)
    own = flat / flat.sum(axis=1, keepdims=True)
    floor = -np.mean(np.sum(np.where(flat > 0, flat * np.log(np.where(own > 0, own, 1)), 0), axis=1))
    assert reconstruction >= floor - 1e-3
    assert total == pytest.approx(reconstruction + kl, rel=1e-5)
    settings = TrainingSettings(epochs=2, batch_size=16, filters=4, latent_dim=4, reconstruction_loss="multinomial")
    trained, history = train(store, settings, seed=0)
    assert history["reconstruction_loss"].iloc[-1] < history["reconstruction_loss"].iloc[0]


def test_library_normalised_images_train_on_each_cells_own_counts(small_cells):
    small_cells.obs["cell_type"] = pd.Categorical(small_cells.obs["cell_type"])
    store = build_image_store(small_cells, None, "log1p_cp10k_gene_max", 0.4, seed=0)
    pixel = store.var["pixel"].to_numpy()
    batches = batches_for(store, "train", batch_size=16, seed=0, with_counts=True)
    (images, labels, counts), = batches[0]
    own = small_cells[store.obs_names[batches.order[:16]]].X.toarray()
    assert np.array_equal(counts.reshape(16, -1)[:, pixel], own)
    training = small_cells[store.obs_names[store.obs["split"] == "train"]].X.toarray().sum(axis=0)
    offsets = initial_gene_offsets(store, "multinomial").reshape(-1)[pixel]
    assert np.allclose(np.exp(offsets) / np.exp(offsets).sum(), training / training.sum(), atol=1e-6)
    settings = TrainingSettings(epochs=2, batch_size=16, filters=4, latent_dim=4, reconstruction_loss="multinomial")
    _, history = train(store, settings, seed=0)
    assert history["reconstruction_loss"].iloc[-1] < history["reconstruction_loss"].iloc[0]


def small_counts_of(store, rows):
    from cvaesim.images import unscale

    values = store.X[rows].toarray().astype(np.float64)
    return np.rint(unscale(values, store.var["scale"].to_numpy(), store.uns["image"]["scaling"]))


@pytest.mark.parametrize("loss", ["multinomial", "mse"])
def test_gene_offsets_start_the_decoder_at_the_training_mean_and_reload(store, tmp_path, loss):
    plain = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, reconstruction_loss=loss, n_genes=50)
    with_offsets = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, reconstruction_loss=loss, n_genes=50,
                                      gene_offsets=True)
    assert with_offsets.count_params() == plain.count_params() + 8 * 8
    settings = TrainingSettings(epochs=1, batch_size=16, filters=4, latent_dim=3, reconstruction_loss=loss,
                                gene_offsets=True, learning_rate=1e-12)  # so that training leaves the start as it is
    model, _ = train(store, settings, seed=0)
    offsets = model.decoder.get_layer("gene_offsets").get_weights()[0].reshape(-1)
    training = np.flatnonzero(store.obs["split"] == "train")
    pixel = store.var["pixel"].to_numpy()
    if loss == "multinomial":
        share = small_counts_of(store, training).sum(axis=0)
        share /= share.sum()
        proportions = np.exp(offsets[pixel]) / np.exp(offsets[pixel]).sum()
        assert np.allclose(proportions, share, atol=1e-6)
    else:
        mean = np.clip(np.asarray(store.X[training].mean(axis=0)).ravel(), 1e-4, 1 - 1e-4)
        assert np.allclose(1 / (1 + np.exp(-offsets[pixel])), mean, atol=1e-5)
    model.save(tmp_path / "model.keras")
    reloaded = load_model(str(tmp_path / "model.keras"))
    assert np.array_equal(reloaded.decoder.get_layer("gene_offsets").get_weights()[0].reshape(-1), offsets)


def test_early_stopping_keeps_the_best_epoch_on_the_test_loss(store):
    # A learning rate too large for this small model makes the test loss stop improving early.
    settings = TrainingSettings(epochs=25, batch_size=16, filters=4, latent_dim=3, learning_rate=0.1,
                                reconstruction_loss="multinomial", early_stopping_patience=2)
    _, history = train(store, settings, seed=0)
    best = int(np.argmin(history["val_loss"].to_numpy()))
    assert len(history) < 25
    assert len(history) == best + 1 + 2  # the best epoch, then two without improvement


def test_negative_binomial_loss_is_the_negative_binomial_likelihood(store, tmp_path):
    from scipy.special import gammaln
    from scipy.stats import nbinom

    model = ConditionalConvVAE(image_side=8, n_cell_types=4, filters=4, reconstruction_loss="negative_binomial",
                               n_genes=store.n_vars, seed=0)
    rng = np.random.default_rng(0)
    theta = rng.uniform(0.2, 20, store.n_vars)
    model.dispersion.set_weights([np.log(theta).astype(np.float32)])
    counts = rng.poisson(3.0, (5, store.n_vars)).astype(np.float32)
    logits = rng.normal(size=(5, store.n_vars))
    log_proportions = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    ours = np.asarray(model.negative_binomial_log_likelihood(keras.ops.convert_to_tensor(counts),
                                                             keras.ops.convert_to_tensor(log_proportions.astype(np.float32))))
    mu = counts.sum(axis=1, keepdims=True) * np.exp(log_proportions)
    expected = nbinom.logpmf(counts, theta, theta / (theta + mu)) + gammaln(counts + 1)  # ours leaves out -log(x!)
    assert np.allclose(ours, expected, rtol=1e-4, atol=1e-3)
    # Trained, the dispersions move from their start and travel with the saved model.
    settings = TrainingSettings(epochs=3, batch_size=16, filters=4, latent_dim=3, reconstruction_loss="negative_binomial")
    trained, history = train(store, settings, seed=0)
    assert history["val_reconstruction_loss"].iloc[-1] < history["val_reconstruction_loss"].iloc[0]
    learned = trained.dispersion.get_weights()[0]
    assert learned.shape == (store.n_vars,) and np.isfinite(learned).all() and np.abs(learned).max() > 0
    trained.save(tmp_path / "model.keras")
    assert np.array_equal(load_model(str(tmp_path / "model.keras")).dispersion.get_weights()[0], learned)


def test_training_uses_the_threads_the_job_was_given(caplog):
    # In a new process, as the train rule's script runs: TensorFlow's pools take the job's threads, not every core.
    probe = ("from cvaesim.training import use_threads; use_threads(1); import tensorflow as tf; "
             "print(tf.config.threading.get_intra_op_parallelism_threads(), "
             "tf.config.threading.get_inter_op_parallelism_threads(), float(tf.reduce_sum(tf.ones(3))))")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["1", "1", "3.0"]
    # Once TensorFlow has run an operation its pools are fixed: training goes on, and says so.
    import tensorflow as tf

    float(tf.reduce_sum(tf.ones(3)))
    with caplog.at_level(logging.WARNING, logger="cvaesim.training"):
        use_threads(1)
    assert "TensorFlow's threads could not be limited to 1" in caplog.text
