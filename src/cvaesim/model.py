"""The conditional convolutional VAE, after the keras.io VAE example plus a label input.

Architecture of the original (UMIche's deepconvcvae): the one-hot cell type is embedded
as a second image channel for the encoder and concatenated to z for the decoder.
"""

from __future__ import annotations

import keras
from keras import layers, ops

RECONSTRUCTION_LOSSES = ("mse", "multinomial", "negative_binomial")
COUNT_LOSSES = ("multinomial", "negative_binomial")  # the decoder gives logits of expression proportions


def log_gamma(values):
    """log Gamma(values) on whichever backend Keras runs (keras.ops has no lgamma)."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.lax.lgamma(values)
    import tensorflow as tf

    return tf.math.lgamma(values)


@keras.saving.register_keras_serializable(package="cvaesim")
class Sampling(layers.Layer):
    """z = mean + exp(log_var / 2) * eps, eps ~ N(0, I), from a seeded generator."""

    def __init__(self, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        epsilon = keras.random.normal(ops.shape(z_mean), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon

    def get_config(self):
        return {**super().get_config(), "seed": self.seed}


@keras.saving.register_keras_serializable(package="cvaesim")
class GeneOffsets(layers.Layer):
    """A learned value per pixel, added to the decoded image: each gene's own baseline.

    Convolutions share their weights across pixels, so without it every gene's typical level
    must come through the dense layer at a quarter of the resolution. Training starts it at
    the training cells' mean (see ``training.initial_gene_offsets``).
    """

    def build(self, input_shape):
        self.offsets = self.add_weight(shape=tuple(input_shape[1:]), initializer="zeros", name="offsets")

    def call(self, images):
        return images + ops.cast(self.offsets, images.dtype)


@keras.saving.register_keras_serializable(package="cvaesim")
class GeneDispersion(layers.Layer):
    """Each gene's negative-binomial inverse dispersion theta (variance mu + mu^2 / theta), learned as log theta.

    One value per gene, as in scVI: the counts' spread beyond a Poisson that the latent does
    not explain. Starts at theta = 1.
    """

    def __init__(self, n_genes: int, **kwargs):
        super().__init__(**kwargs)
        self.n_genes = n_genes

    def build(self, input_shape=None):
        self.log_theta = self.add_weight(shape=(self.n_genes,), initializer="zeros", name="log_theta")

    def call(self, inputs=None):
        return self.log_theta

    def get_config(self):
        return {**super().get_config(), "n_genes": self.n_genes}


def build_encoder(side, n_cell_types, filters, kernel_size, strides, dense_units, latent_dim) -> keras.Model:
    images = keras.Input(shape=(side, side, 1), name="image")
    labels = keras.Input(shape=(n_cell_types,), name="cell_type")
    label_channel = layers.Reshape((side, side, 1))(layers.Dense(side * side, name="label_embedding")(labels))
    x = layers.Concatenate()([images, label_channel])
    x = layers.Conv2D(filters, kernel_size, strides=strides, padding="same", activation="relu")(x)
    x = layers.Conv2D(filters * 2, kernel_size, strides=strides, padding="same", activation="relu")(x)
    x = layers.Dense(dense_units, activation="relu")(layers.Flatten()(x))
    # float32 outputs, so that losses stay float32 under mixed precision.
    z_mean = layers.Dense(latent_dim, name="z_mean", dtype="float32")(x)
    z_log_var = layers.Dense(latent_dim, name="z_log_var", dtype="float32")(x)
    return keras.Model([images, labels], [z_mean, z_log_var], name="encoder")


def build_decoder(side, n_cell_types, filters, kernel_size, strides, latent_dim, activation,
                  gene_offsets=False) -> keras.Model:
    z = keras.Input(shape=(latent_dim,), name="z")
    labels = keras.Input(shape=(n_cell_types,), name="cell_type")
    reduced = side // strides**2
    x = layers.Concatenate()([z, labels])
    x = layers.Dense(reduced * reduced * filters * 2, activation="relu")(x)
    x = layers.Reshape((reduced, reduced, filters * 2))(x)
    x = layers.Conv2DTranspose(filters, kernel_size, strides=strides, padding="same", activation="relu")(x)
    x = layers.Conv2DTranspose(filters // 2, kernel_size, strides=strides, padding="same", activation="relu")(x)
    x = layers.Conv2DTranspose(1, kernel_size, padding="same", dtype="float32")(x)
    if gene_offsets:
        x = GeneOffsets(name="gene_offsets", dtype="float32")(x)
    images = layers.Activation(activation, name="decoded", dtype="float32")(x)
    return keras.Model([z, labels], images, name="decoder")


@keras.saving.register_keras_serializable(package="cvaesim")
class ConditionalConvVAE(keras.Model):
    """Loss per cell: reconstruction + beta x KL (the KL weight rising from 0 over ``kl_warmup_steps``
    optimiser steps where that is set).

    ``reconstruction_loss='mse'`` (the original): a sigmoid image, squared error summed over
    the pixels (MSE x side^2). ``'multinomial'``: the decoder gives logits, a softmax over the
    first ``n_genes`` pixels (the genes; the rest is padding) gives expression proportions,
    and the loss is the multinomial negative log-likelihood of the cell's counts,
    -sum(counts x log p): a count likelihood, which keeps the latent in use.
    ``'negative_binomial'``: the same proportions times the cell's library size are the means
    of independent negative binomials, one learned dispersion per gene (:class:`GeneDispersion`).
    Both count likelihoods leave out the terms that depend on the counts alone.
    """

    def __init__(
        self,
        image_side: int,
        n_cell_types: int,
        filters: int = 16,
        kernel_size: int = 3,
        strides: int = 2,
        dense_units: int = 16,
        latent_dim: int = 2,
        beta: float = 1.0,
        seed: int | None = None,
        reconstruction_loss: str = "mse",
        n_genes: int | None = None,
        gene_offsets: bool = False,
        kl_warmup_steps: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if image_side % strides**2:
            raise ValueError(f"image side {image_side} must be a multiple of strides^2 = {strides**2}")
        if reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"unknown reconstruction loss {reconstruction_loss!r}; choose one of {RECONSTRUCTION_LOSSES}")
        self.hyperparameters = dict(
            image_side=image_side, n_cell_types=n_cell_types, filters=filters, kernel_size=kernel_size,
            strides=strides, dense_units=dense_units, latent_dim=latent_dim, beta=beta, seed=seed,
            reconstruction_loss=reconstruction_loss, n_genes=n_genes, gene_offsets=gene_offsets,
            kl_warmup_steps=kl_warmup_steps,
        )
        self.reconstruction_loss = reconstruction_loss
        self.n_genes = n_genes if n_genes is not None else image_side**2
        self.image_side = image_side
        self.latent_dim = latent_dim
        self.beta = beta
        self.kl_warmup_steps = kl_warmup_steps
        self.encoder = build_encoder(image_side, n_cell_types, filters, kernel_size, strides, dense_units, latent_dim)
        self.decoder = build_decoder(image_side, n_cell_types, filters, kernel_size, strides, latent_dim,
                                     None if reconstruction_loss in COUNT_LOSSES else "sigmoid", gene_offsets)
        # float32 like z_mean and z_log_var: under mixed precision, float16 would meet float32 noise.
        self.sampling = Sampling(seed, name="z", dtype="float32")
        if reconstruction_loss == "negative_binomial":
            self.dispersion = GeneDispersion(self.n_genes, name="dispersion", dtype="float32")
            self.dispersion.build()
        self.total_loss_tracker = keras.metrics.Mean(name="loss")
        self.reconstruction_loss_tracker = keras.metrics.Mean(name="reconstruction_loss")
        self.kl_loss_tracker = keras.metrics.Mean(name="kl_loss")
        self.built = True  # every weight exists once the functional encoder and decoder do

    @property
    def metrics(self):
        return [self.total_loss_tracker, self.reconstruction_loss_tracker, self.kl_loss_tracker]

    def call(self, inputs, training=False):
        images, labels = inputs[:2]
        z_mean, z_log_var = self.encoder([images, labels], training=training)
        return self.decoder([self.sampling([z_mean, z_log_var]), labels], training=training)

    def compute_losses(self, images, labels, counts=None, training=False):
        z_mean, z_log_var = self.encoder([images, labels], training=training)
        decoded = self.decoder([self.sampling([z_mean, z_log_var]), labels], training=training)
        if self.reconstruction_loss == "mse":
            reconstruction = ops.mean(ops.sum(ops.square(images - decoded), axis=(1, 2, 3)))
        else:
            log_proportions = ops.log_softmax(ops.reshape(decoded, (-1, self.image_side**2))[:, :self.n_genes], axis=1)
            counts = ops.reshape(counts, (-1, self.image_side**2))[:, :self.n_genes]
            if self.reconstruction_loss == "multinomial":
                reconstruction = -ops.mean(ops.sum(counts * log_proportions, axis=1))
            else:
                reconstruction = -ops.mean(ops.sum(self.negative_binomial_log_likelihood(counts, log_proportions), axis=1))
        kl = ops.mean(-0.5 * ops.sum(1 + z_log_var - ops.square(z_mean) - ops.exp(z_log_var), axis=1))
        weight = self.beta
        if training and self.kl_warmup_steps:
            # KL warm-up: the weight rises from 0 to beta over the first steps, so the latent is shaped by the
            # cells before the prior pulls it in; the test loss always has the full weight.
            weight = self.beta * ops.minimum(1.0, ops.cast(self.optimizer.iterations, "float32") / self.kl_warmup_steps)
        return reconstruction + weight * kl, reconstruction, kl

    def negative_binomial_log_likelihood(self, counts, log_proportions):
        """log NB(counts | mu, theta) per gene without the -log(counts!) term, mu = library x proportions."""
        library = ops.maximum(ops.sum(counts, axis=1, keepdims=True), 1.0)
        log_mu = log_proportions + ops.log(library)
        log_theta = self.dispersion.log_theta
        theta = ops.exp(log_theta)
        log_theta_plus_mu = ops.logaddexp(log_theta, log_mu)
        return (log_gamma(counts + theta) - log_gamma(theta)
                + theta * (log_theta - log_theta_plus_mu) + counts * (log_mu - log_theta_plus_mu))

    def _track(self, total, reconstruction, kl):
        self.total_loss_tracker.update_state(total)
        self.reconstruction_loss_tracker.update_state(reconstruction)
        self.kl_loss_tracker.update_state(kl)
        return {metric.name: metric.result() for metric in self.metrics}

    def train_step(self, *args):
        """One optimiser step on TensorFlow (the workflow's backend) or, with KERAS_BACKEND=jax, on JAX."""
        if keras.backend.backend() == "jax":
            return self._jax_train_step(*args)
        import tensorflow as tf

        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(args[0])
        with tf.GradientTape() as tape:
            total, reconstruction, kl = self.compute_losses(*inputs, training=True)
            # Under mixed precision the optimizer scales the loss up and the gradients back down.
            scaled = self.optimizer.scale_loss(total)
        gradients = tape.gradient(scaled, self.trainable_weights)
        self.optimizer.apply_gradients(zip(gradients, self.trainable_weights))
        return self._track(total, reconstruction, kl)

    def test_step(self, *args):
        if keras.backend.backend() == "jax":
            return self._jax_test_step(*args)
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(args[0])
        return self._track(*self.compute_losses(*inputs))

    # JAX steps are pure functions of the variables' values, after the Keras guide
    # "Customizing what happens in fit() with JAX": the same losses, run in a stateless scope.

    def _jax_losses(self, trainable, non_trainable, inputs, optimizer_variables=None):
        """The losses on these variable values, with the non-trainable values they leave (the sampler's seed).

        With ``optimizer_variables`` (training), the first value is the loss as the optimizer scales it.
        """
        mapping = [*zip(self.trainable_variables, trainable), *zip(self.non_trainable_variables, non_trainable)]
        training = optimizer_variables is not None
        if training:
            mapping += zip(self.optimizer.variables, optimizer_variables)
        with keras.StatelessScope(state_mapping=mapping) as scope:
            total, reconstruction, kl = self.compute_losses(*inputs, training=training)
            scaled = self.optimizer.scale_loss(total) if training else total
        moved = [scope.get_current_value(variable) for variable in self.non_trainable_variables]
        non_trainable = [old if new is None else new for new, old in zip(moved, non_trainable)]
        return scaled, (total, reconstruction, kl, non_trainable)

    def _jax_track(self, metrics_variables, *losses):
        updated, logs = [], {}
        for metric, value in zip(self.metrics, losses):
            own = metric.stateless_update_state(metrics_variables[len(updated):len(updated) + len(metric.variables)], value)
            logs[metric.name] = metric.stateless_result(own)
            updated += own
        return updated, logs

    def _jax_train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_variables, metrics_variables = state
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        gradient_of = jax.value_and_grad(self._jax_losses, has_aux=True)
        (_, (total, reconstruction, kl, non_trainable)), gradients = gradient_of(
            trainable, non_trainable, inputs, optimizer_variables)
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, gradients, trainable)
        metrics_variables, logs = self._jax_track(metrics_variables, total, reconstruction, kl)
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)

    def _jax_test_step(self, state, data):
        trainable, non_trainable, metrics_variables = state
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        _, (total, reconstruction, kl, non_trainable) = self._jax_losses(trainable, non_trainable, inputs)
        metrics_variables, logs = self._jax_track(metrics_variables, total, reconstruction, kl)
        return logs, (trainable, non_trainable, metrics_variables)

    def get_config(self):
        return {**super().get_config(), **self.hyperparameters}
