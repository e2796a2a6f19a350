import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import train

log_to_file(snakemake.log[0])
train(
    store=snakemake.input[0],
    model_path=snakemake.output.model,
    history_tsv=snakemake.output.history,
    history_plot=snakemake.output.plot,
    settings=snakemake.params.settings,
    seed=snakemake.params.seed,
    posteriors=snakemake.output.posteriors,
    simulation=snakemake.params.simulation,
    threads=snakemake.threads,
)
