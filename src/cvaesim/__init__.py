"""Simulate labelled single-cell RNA-seq count matrices with a conditional convolutional VAE."""

__version__ = "0.1.0"


class InputError(ValueError):
    """An input file is missing, malformed or inconsistent; the message names the file."""
