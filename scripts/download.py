import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import download

log_to_file(snakemake.log[0])
download(
    snakemake.params.source,
    snakemake.output[0],
    snakemake.params.sha256,
    snakemake.params.sample,
)
