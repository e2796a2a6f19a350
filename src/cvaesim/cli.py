"""Command line: simulate cells on demand from a trained model, and score them as the evaluate rule does.

    cvaesim simulate --model results/pbmc68k/model/cvae.keras \\
        --store results/pbmc68k/images/images.h5ad --cells 1000000 --output cells.h5ad
    cvaesim evaluate --real results/pbmc68k/filtered.h5ad --store results/pbmc68k/images/images.h5ad \\
        --simulated cells.h5ad --output cells_scores/
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import InputError
from .choices import CALIBRATIONS, LATENT_DRAWS, LIBRARY_SIZES, ORIGINS
from .counts import COUNT_SAMPLING
from .formats import FORMATS, model_file_problem
from .io import IMAGE_STORE, TENX_OUTPUT_FILES, open_h5ad
from .plans import store_cell_plan
from .writers import table_problem

log = logging.getLogger("cvaesim")

# The output format each suffix names: the original's table for .h5, a 10x folder for none.
FORMAT_OF_SUFFIX = {".h5ad": "h5ad", ".h5": "table", "": "10x"}


def chosen_cell_types(items: list[str]) -> dict[str, int]:
    """``--cell-type NAME=N`` arguments as a plan; a type named twice gets both numbers."""
    plan = {}
    for item in items:
        name, _, number = item.rpartition("=")
        if not name or not number.isdigit():
            raise InputError(f"--cell-type {item!r}: expected NAME=NUMBER, e.g. 'CD14+ Monocyte=500'")
        plan[name] = plan.get(name, 0) + int(number)
    return plan


def output_format_of(output: Path) -> str:
    """The format a suffix names: .h5ad, .h5 (the original's table), or none for a 10x folder."""
    if output.suffix not in FORMAT_OF_SUFFIX:  # 'cells.csv' would otherwise become a folder of that name
        raise InputError(f"{output}: the output format follows the suffix (.h5ad, .h5 for the original's table, "
                         f"none for a 10x folder), and {output.suffix!r} is none of them; --format 10x writes a "
                         "10x folder of this name")
    return FORMAT_OF_SUFFIX[output.suffix]


def check_output(output: Path, output_format: str) -> None:
    """Refuse, before simulating, an output path whose file or folder the writer would not replace."""
    if output_format != "10x":
        if output.is_dir():
            raise InputError(f"{output}: is a folder; the {output_format} output is a file")
        return
    if output.is_file():
        raise InputError(f"{output}: is a file; a 10x output is a folder")
    if output.is_dir():
        # A former 10x output is replaced, as a former .h5ad is; a folder with anything else in it is the user's.
        others = sorted({entry.name for entry in output.iterdir()} - set(TENX_OUTPUT_FILES))
        if others:
            raise InputError(f"{output}: a folder holding other files than a 10x output's ({', '.join(others[:3])}"
                             f"{', ...' if len(others) > 3 else ''}); give a new or empty folder")


def at_least_one(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def simulate_command(arguments: argparse.Namespace) -> None:
    output_format = arguments.format or output_format_of(arguments.output)
    check_output(arguments.output, output_format)
    if arguments.expected is not None and (arguments.expected.is_dir() or arguments.expected == arguments.output):
        raise InputError(f"--expected {arguments.expected}: "
                         f"{'is a folder' if arguments.expected.is_dir() else 'is the --output'}; give a new .tsv file")
    requested = chosen_cell_types(arguments.cell_type) or arguments.cells_per_type
    for path in (arguments.model, arguments.store):
        if not path.exists():
            raise InputError(f"{path}: no such file")
    if problem := model_file_problem(arguments.model):
        raise InputError(f"{arguments.model}: {problem}")
    meta = open_h5ad(arguments.store, *IMAGE_STORE)
    plan = store_cell_plan(meta.obs["cell_type"], requested, arguments.cells, asked_by="--cell-type")
    n_cells = sum(plan.values())
    if output_format == "table" and (problem := table_problem(n_cells, meta.n_vars)):
        raise InputError(f"{arguments.output}: {problem}; write .h5ad or 10x")
    # Only now, with the request checked: these load TensorFlow, which takes seconds.
    from .simulation import ExpectedExpression, Simulator
    from .steps import load_model
    from .training import use_threads
    from .writers import write_10x, write_expected, write_h5ad, write_table

    if arguments.threads is not None:
        use_threads(arguments.threads)
    posteriors = arguments.posteriors
    if posteriors is None and (arguments.model.parent / "posteriors.npz").is_file():
        posteriors = arguments.model.parent / "posteriors.npz"
    library_sizes = arguments.library_sizes or ("paired" if arguments.latent == "posterior" else "resampled")
    simulator = Simulator(load_model(str(arguments.model)), meta, arguments.batch_size, arguments.count_sampling,
                          library_sizes, arguments.latent, posteriors, arguments.calibration, arguments.origins)
    meta.file.close()
    log.info("simulating %d cells (%s) to %s as %s", n_cells,
             ", ".join(f"{name}: {n}" for name, n in plan.items()), arguments.output, output_format)
    truth = ExpectedExpression(simulator.var.index) if arguments.expected else None
    if output_format == "h5ad":
        write_h5ad(simulator.batches(plan, arguments.seed, truth), simulator.var, simulator.cell_types,
                   simulator.settings(arguments.seed), arguments.output)
    elif output_format == "10x":
        write_10x(simulator.batches(plan, arguments.seed, truth), simulator.var, arguments.output)
    else:
        write_table(simulator.to_anndata(plan, arguments.seed, truth), arguments.output)
    if truth is not None:
        write_expected(truth.table(), arguments.expected)


def evaluate_command(arguments: argparse.Namespace) -> None:
    from .steps import EVALUATION_FILES, evaluate

    if arguments.output.is_file():
        raise InputError(f"{arguments.output}: is a file; the scores go into a folder")
    settings = {"repeats": arguments.repeats, "training_cells": arguments.training_cells,
                "max_cells_per_type": arguments.max_cells_per_type}
    evaluate(str(arguments.real), str(arguments.store), str(arguments.simulated),
             {name: str(arguments.output / file) for name, file in EVALUATION_FILES.items()}, settings,
             arguments.seed, arguments.threads, arguments.label_column, arguments.format,
             arguments.annotation and str(arguments.annotation), arguments.barcode_column, arguments.counts_layer,
             arguments.round_counts)
    log.info("scores in %s (overall.tsv: the model beside the baselines and the real-vs-real control)",
             arguments.output)


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="cvaesim", description="Simulate single-cell counts with a conv-CVAE.")
    commands = main.add_subparsers(dest="command", required=True)
    command = commands.add_parser("simulate", help="write simulated cells from a trained model")
    command.add_argument("--model", type=Path, required=True, help="the trained model (cvae.keras)")
    command.add_argument("--store", type=Path, required=True,
                         help="the image store the model was trained on (images.h5ad): types, genes, scaling")
    command.add_argument("--output", type=Path, required=True,
                         help="an .h5ad file, an .h5 file (the original's table) or a folder without suffix (10x)")
    command.add_argument("--format", choices=sorted(FORMAT_OF_SUFFIX.values()),
                         help="default: from the output's suffix")
    which = command.add_mutually_exclusive_group()
    which.add_argument("--cells-per-type", type=at_least_one, default=100, help="cells of every type (default 100)")
    which.add_argument("--cells", type=at_least_one, help="a total, split by the real data's cell-type proportions")
    which.add_argument("--cell-type", action="append", default=[], metavar="NAME=N",
                       help="N cells of type NAME (repeatable)")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--batch-size", type=at_least_one, default=256, help="cells per decoder call")
    command.add_argument("--count-sampling", choices=COUNT_SAMPLING,
                         help="default: the model's own likelihood (negative_binomial for a model trained with "
                              "it, else poisson)")
    command.add_argument("--library-sizes", choices=LIBRARY_SIZES,
                         help="default: paired with posterior latent draws (each cell keeps the library size of the "
                              "training cell its latent came from), resampled with prior draws")
    command.add_argument("--latent", choices=LATENT_DRAWS, default="posterior",
                         help="z from N(0, I), or from the posterior of a random training cell of the type")
    command.add_argument("--origins", choices=ORIGINS, default="balanced",
                         help="with posterior draws, which training cells' posteriors: balanced (each training cell "
                              "of the type once before any twice; default) or independent (at random, with repeats)")
    command.add_argument("--calibration", choices=CALIBRATIONS,
                         help="type_means: scale each gene so that every type's mean expression matches its "
                              "training cells'; type_moments: that, and a negative-binomial draw for each gene that "
                              "would vary less than in its training cells; type_quantiles: each gene's counts in a "
                              "batch replaced by the type's training counts at the same rank (see the README); "
                              "default: type_moments with Poisson count sampling, else type_means")
    command.add_argument("--expected", type=Path, metavar="FILE.tsv",
                         help="also write the known truth: per cell type and gene, the mean count the cells' counts "
                              "were drawn around (mean_count) and per 10,000 counts (mean_per_10k)")
    command.add_argument("--threads", type=at_least_one,
                         help="cores TensorFlow may use (default: every core, TensorFlow's own choice)")
    command.add_argument("--posteriors", type=Path,
                         help="the training cells' posteriors from the train rule (default: posteriors.npz beside "
                              "the model, when there; without them, drawn training cells are encoded here)")
    command.set_defaults(run=simulate_command)

    command = commands.add_parser("evaluate", help="score simulated cells against a dataset's held-out real cells")
    command.add_argument("--real", type=Path, required=True, help="the dataset's filtered cells (filtered.h5ad)")
    command.add_argument("--store", type=Path, required=True,
                         help="its image store (images.h5ad), which says which cells were held out")
    command.add_argument("--simulated", type=Path, required=True,
                         help="the simulated cells: an .h5ad, or another simulator's in any format a dataset may "
                              "have (a 10x folder, a count table, ...; see --format and --annotation)")
    command.add_argument("--output", type=Path, required=True,
                         help="a folder for overall.tsv, metrics.tsv, metrics.json, confusion.tsv and the figures")
    command.add_argument("--seed", type=int, default=0)
    command.add_argument("--repeats", type=at_least_one, default=1,
                         help="matched samples the forest AUC, MMD and memorisation are averaged over")
    command.add_argument("--training-cells", action="store_true",
                         help="also score a sample of the real training cells (the floor a simulator can reach)")
    command.add_argument("--max-cells-per-type", type=at_least_one, default=250,
                         help="real and simulated cells per type for the forest, MMD and memorisation")
    command.add_argument("--threads", type=at_least_one, default=1, help="cores for the random forests")
    command.add_argument("--label-column", default="cell_type",
                         help="the column with the simulated cells' types: of an .h5ad's obs, a loom file's column "
                              "attributes, or the --annotation table (another simulator's, such as 'Group')")
    command.add_argument("--format", choices=FORMATS,
                         help="the simulated cells' format, as a dataset's in the config (default: told by the "
                              "file's bytes; a folder is a 10x matrix folder)")
    command.add_argument("--annotation", type=Path,
                         help="a table of the simulated cells' types, for a format that does not carry them "
                              "(default for a folder: its cell_types.tsv, as cvaesim simulate writes)")
    command.add_argument("--barcode-column", default="barcode",
                         help="the --annotation table's column of cell names (default 'barcode'; a first column "
                              "without header, as R's write.csv leaves, is taken too)")
    command.add_argument("--counts-layer",
                         help="the layer of an .h5ad or loom file that holds the counts, or 'raw' (default: X, or "
                              "loom's main matrix), for a file that keeps normalised values in X")
    command.add_argument("--round-counts", action="store_true",
                         help="round counts that are not whole numbers (expected counts) to the nearest integer")
    command.set_defaults(run=evaluate_command)
    return main


def main(argv: list[str] | None = None) -> int:
    arguments = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        arguments.run(arguments)
    except (InputError, ValueError) as error:
        print(f"cvaesim: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
