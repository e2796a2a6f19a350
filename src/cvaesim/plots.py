"""Figures that are not scanpy's."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_history(history: pd.DataFrame, path) -> None:
    """Per-epoch loss, reconstruction and KL terms; dashed lines are the test cells'."""
    terms = ["loss", "reconstruction_loss", "kl_loss"]
    figure, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.5))
    for axis, term in zip(axes, terms):
        axis.plot(history["epoch"], history[term], label="training cells")
        if f"val_{term}" in history:
            axis.plot(history["epoch"], history[f"val_{term}"], linestyle="--", label="test cells")
        axis.set_xlabel("epoch")
        axis.set_title(term.replace("_", " "))
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
