"""Simulate labelled single-cell RNA-seq count matrices with a conditional convolutional VAE."""

import difflib
import os
from collections.abc import Iterable

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


def did_you_mean(wanted: Iterable[str], names: Iterable[str]) -> str:
    """' (did you mean ...?)' naming the names close to the wanted ones (another case, a typo), else ''."""
    names = [str(name) for name in names]
    close = []
    for name in wanted:
        same_but_case = [candidate for candidate in names if candidate.casefold() == name.casefold()]
        close += same_but_case or difflib.get_close_matches(name, names, n=1, cutoff=0.8)
    return f" (did you mean {' and '.join(map(repr, dict.fromkeys(close)))}?)" if close else ""
