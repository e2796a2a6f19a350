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


def test_training_runs_on_tensorflow_whatever_keras_json_says_and_refuses_another_backend_up_front(tmp_path):
    # A ~/.keras/keras.json naming JAX (left by other work) once made the train rule run on JAX and fail at its
    # first checkpoint, after an epoch, with "Checkpoint was expecting model to be a trackable object".
    pytest.importorskip("jax")
    (tmp_path / ".keras").mkdir()
    (tmp_path / ".keras" / "keras.json").write_text('{"backend": "jax"}')
    environment = {name: value for name, value in os.environ.items() if name not in ("KERAS_BACKEND", "KERAS_HOME")}
    result = subprocess.run([sys.executable, "-c", "import cvaesim, keras\nprint(keras.backend.backend())"],
                            capture_output=True, text=True, cwd=tmp_path, env={**environment, "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["tensorflow"]
    # Set on purpose, the other backend is kept, and training says what to change before it starts.
    script = ("import keras\nfrom cvaesim.training import TrainingSettings, train\nprint(keras.backend.backend())\n"
              "try:\n    train(None, TrainingSettings(), seed=0)\nexcept RuntimeError as error:\n    print(error)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                            env={**environment, "HOME": str(tmp_path), "KERAS_BACKEND": "jax"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines() == [
        "jax", "training needs Keras's TensorFlow backend (resumable checkpoints, operation determinism), but Keras "
        "runs on 'jax', as KERAS_BACKEND in the environment says; unset it or set KERAS_BACKEND=tensorflow"]
