"""Simulate labelled single-cell RNA-seq count matrices with a conditional convolutional VAE."""

import os

# TensorFlow turns its oneDNN kernels on by default only for CPUs with AVX-512 VNNI/BF16 or
# AMX. On AVX2 CPUs they run this model's convolutions 2-3x faster (measured with
# perf/speed.py), so they are on unless the user chose; this must happen before TensorFlow loads.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
# Training needs Keras's TensorFlow backend (resumable checkpoints, operation determinism). Without this,
# a ~/.keras/keras.json left by other work naming another backend would apply; KERAS_BACKEND set by the
# user still does (the model itself also runs on JAX), and training then says what to change.
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

__version__ = "0.1.0"


class InputError(ValueError):
    """An input file is missing, malformed or inconsistent; the message names the file."""
