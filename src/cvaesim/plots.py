"""Figures that are not scanpy's."""

from __future__ import annotations

import textwrap

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402


def plot_history(history: pd.DataFrame, path, warning: str | None = None) -> None:
    """Per-epoch loss, reconstruction and KL terms; dashed lines are the test cells'. ``warning``
    (e.g. a collapsed latent) is printed in red above the panels, so the report shows it too."""
    terms = ["loss", "reconstruction_loss", "kl_loss"]
    figure, axes = plt.subplots(1, len(terms), figsize=(4 * len(terms), 3.5 + (0.5 if warning else 0)))
    if warning:
        figure.suptitle(textwrap.fill(f"Warning: {warning}", 110), color="red", fontsize=9)
    for axis, term in zip(axes, terms):
        axis.plot(history["epoch"], history[term], label="training cells")
        if f"val_{term}" in history:
            axis.plot(history["epoch"], history[f"val_{term}"], linestyle="--", label="test cells")
        axis.set_xlabel("epoch")
        axis.set_title(term.replace("_", " "))
    axes[0].legend()
    figure.tight_layout(rect=(0, 0, 1, 0.9 if warning else 1))  # room for the warning
    figure.savefig(path, dpi=100)
    plt.close(figure)


PANEL_METRICS = ("rf_auc", "mmd", "fidelity_accuracy", "ks_library_size", "marker_correlation", "memorisation_ratio")


def plot_per_type(metrics: pd.DataFrame, path, cells: pd.DataFrame | None = None,
                  names: tuple[str, ...] = PANEL_METRICS) -> None:
    """One panel per metric: each cell type's value for the model, the baselines and the control;
    ``cells`` (training and test cells per type) goes under each type's name."""
    figure, axes = metric_panels(metrics[metrics["cell_type"] != "overall"], "cell_type", names)
    if cells is not None:
        names_shown = [tick.get_text() for tick in axes[-1].get_xticklabels()]
        axes[-1].set_xticks(axes[-1].get_xticks(), [
            f"{name}\n{cells.loc[name, 'training']} training, {cells.loc[name, 'test']} test" if name in cells.index
            else name for name in names_shown])
        axes[-1].set_xlabel("cell type")
    save_panels(figure, axes, path)


def plot_by_dataset(table: pd.DataFrame, path, names: tuple[str, ...] = PANEL_METRICS) -> None:
    """The compared datasets' overall table (a row per metric and dataset, a column per source) as
    panels: each dataset's value for the model, the baselines and the control."""
    scores = table.melt(id_vars=["metric", "dataset"], var_name="source", value_name="value")
    figure, axes = metric_panels(scores, "dataset", names)
    axes[-1].set_xlabel("dataset")
    save_panels(figure, axes, path)


def metric_panels(scores: pd.DataFrame, group: str, names: tuple[str, ...]):
    """A bar panel per metric of ``scores`` (columns ``group``, source, metric, value), the groups in the
    order they come (the data's cell types, the run's datasets), the sources side by side."""
    groups = list(dict.fromkeys(scores[group]))
    figure, axes = plt.subplots(len(names), 1, figsize=(max(8, 0.9 * len(groups)), 2.6 * len(names)), sharex=True)
    for axis, name in zip(axes, names):
        table = scores[scores["metric"] == name].pivot(index=group, columns="source", values="value").reindex(groups)
        if not table.empty:
            table.plot.bar(ax=axis, width=0.8, legend=False)
        axis.set_ylabel(name.replace("_", " "))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:  # beside the panels, where it hides no bar
        axes[0].legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1), title="source")
    return figure, axes


def save_panels(figure, axes, path) -> None:
    axes[-1].tick_params(axis="x", labelrotation=60)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def plot_mean_variance(gene_statistics: dict[str, tuple], path, real: str = "real test cells") -> None:
    """Per-gene mean against variance of log2(CPM + 1): each simulator over the real test cells."""
    real_mean, real_variance = gene_statistics[real]
    simulators = {name: values for name, values in gene_statistics.items() if name != real}
    figure, axes = plt.subplots(1, len(simulators), figsize=(4 * len(simulators), 3.8), sharex=True, sharey=True,
                                squeeze=False)
    axes = axes[0]
    for axis, (name, (mean, variance)) in zip(axes, simulators.items()):
        axis.scatter(real_mean, real_variance, s=3, alpha=0.4, label="real test cells")
        axis.scatter(mean, variance, s=3, alpha=0.4, label=name)
        axis.set_title(name)
        axis.set_xlabel("mean log2(CPM + 1)")
        axis.legend(markerscale=4, fontsize=8)
    axes[0].set_ylabel("variance")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
