"""Helper for test_backends.py, run as a script under one Keras backend (chosen by KERAS_BACKEND).

Trains a small model for three epochs from given weights, with the sampler's noise switched off
(so that both backends see the same inputs) and no shuffling, then evaluates it; prints JSON.
With --mixed, trains under the mixed_float16 policy from fresh weights instead.
"""

import argparse
import json

import keras
import numpy as np

from cvaesim.model import ConditionalConvVAE

parser = argparse.ArgumentParser()
parser.add_argument("loss")
parser.add_argument("weights")
parser.add_argument("--save", action="store_true", help="write the starting weights there first")
parser.add_argument("--mixed", action="store_true")
arguments = parser.parse_args()

keras.utils.set_random_seed(0)
if arguments.mixed:
    keras.mixed_precision.set_global_policy("mixed_float16")
model = ConditionalConvVAE(image_side=16, n_cell_types=3, seed=0, latent_dim=4,
                           reconstruction_loss=arguments.loss, n_genes=200)
model.compile(optimizer=keras.optimizers.RMSprop(1e-3))
rng = np.random.default_rng(0)
images = (rng.random((256, 16, 16, 1)) * (rng.random((256, 16, 16, 1)) < 0.2)).astype("float32")
counts = np.floor(images * 10)
labels = np.eye(3, dtype="float32")[rng.integers(0, 3, 256)]
data = (images, labels, counts) if arguments.loss != "mse" else (images, labels)
if not arguments.mixed:
    if arguments.save:
        model.save_weights(arguments.weights)
    model.load_weights(arguments.weights)
    z_log_var = model.encoder.get_layer("z_log_var")
    kernel, bias = z_log_var.get_weights()
    z_log_var.set_weights([kernel * 0, bias * 0 - 60])  # variance e^-60: z = z_mean
seed_before = np.array(model.sampling.seed_generator.state.value)
history = model.fit(data, batch_size=32, epochs=3, verbose=0, shuffle=False).history
print(json.dumps({
    "backend": keras.backend.backend(),
    "history": {name: [float(value) for value in values] for name, values in history.items()},
    "evaluation": [float(value) for value in model.evaluate(data, batch_size=64, verbose=0)],
    "sampler_advanced": not np.array_equal(seed_before, np.array(model.sampling.seed_generator.state.value)),
    "weight_dtypes": sorted({str(weight.dtype) for weight in model.weights}),
}))
