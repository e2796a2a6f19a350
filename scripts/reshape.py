import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import reshape

log_to_file(snakemake.log[0])
reshape(
    filtered=snakemake.input[0],
    store=snakemake.output.store,
    layout=snakemake.output.layout,
    side=snakemake.params.side,
    side_multiple=snakemake.params.side_multiple,
    scaling=snakemake.params.scaling,
    gene_order=snakemake.params.gene_order,
    test_fraction=snakemake.params.test_fraction,
    seed=snakemake.params.seed,
)
