import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import filter_dataset

log_to_file(snakemake.log[0])
filter_dataset(
    matrix=snakemake.input.matrix,
    annotation=snakemake.input.get("annotation"),
    output=snakemake.output[0],
    format=snakemake.params.format,
    label_column=snakemake.params.label_column,
    barcode_column=snakemake.params.barcode_column,
    counts_layer=snakemake.params.counts_layer,
    thresholds=snakemake.params.thresholds,
    round_counts=snakemake.params.round_counts,
    sample=snakemake.params.sample,
    exclude_types=snakemake.params.exclude_types,
)
