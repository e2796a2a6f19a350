import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import compare_datasets

log_to_file(snakemake.log[0])
compare_datasets(
    overall_tables=list(snakemake.input),
    datasets=snakemake.params.datasets,
    outputs=dict(snakemake.output.items()),
)
