import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import evaluate

log_to_file(snakemake.log[0])
evaluate(
    real=snakemake.input.real,
    store=snakemake.input.store,
    simulated=snakemake.input.simulated,
    outputs=dict(snakemake.output.items()),
    settings=snakemake.params.settings,
    seed=snakemake.params.seed,
    threads=snakemake.threads,
)
