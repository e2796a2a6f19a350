"""The model's own training and test steps on Keras's JAX backend, and under mixed precision.

The workflow trains with TensorFlow; the same model also runs on JAX (the GPU benchmark used
it where TensorFlow could not be installed). Each backend runs in its own process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HELPER = Path(__file__).with_name("backend_run.py")


def run(backend: str, *arguments: str) -> dict:
    environment = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, str(HELPER), *arguments], capture_output=True, text=True, env=environment)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("loss", ["mse", "multinomial", "negative_binomial"])
def test_jax_steps_train_exactly_as_tensorflow_steps(loss, tmp_path):
    pytest.importorskip("jax")
    weights = str(tmp_path / "start.weights.h5")
    tensorflow = run("tensorflow", loss, weights, "--save")
    jax = run("jax", loss, weights)
    assert (tensorflow["backend"], jax["backend"]) == ("tensorflow", "jax")
    # Equal up to float32 summation order over 24 steps (a wrong gradient moves far more).
    for name, values in tensorflow["history"].items():
        np.testing.assert_allclose(jax["history"][name], values, rtol=1e-3, err_msg=name)
    assert tensorflow["history"]["loss"][-1] < tensorflow["history"]["loss"][0]
    np.testing.assert_allclose(jax["evaluation"], tensorflow["evaluation"], rtol=1e-3)
    # The sampler's seed moves with every step on both, so each batch draws new noise.
    assert tensorflow["sampler_advanced"] and jax["sampler_advanced"]


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_mixed_precision_trains_with_float32_weights(backend, tmp_path):
    if backend == "jax":
        pytest.importorskip("jax")
    result = run(backend, "multinomial", str(tmp_path / "unused.weights.h5"), "--mixed")
    losses = result["history"]["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
    assert result["weight_dtypes"] == ["float32"]
