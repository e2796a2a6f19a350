import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import cluster

log_to_file(snakemake.log[0])
cluster(
    matrix=snakemake.input.matrix,
    output=snakemake.output[0],
    format=snakemake.params.format,
    resolution=snakemake.params.resolution,
    seed=snakemake.params.seed,
    counts_layer=snakemake.params.counts_layer,
    thresholds=snakemake.params.thresholds,
    round_counts=snakemake.params.round_counts,
    sample=snakemake.params.sample,
)
