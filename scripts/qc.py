import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import qc

log_to_file(snakemake.log[0])
qc(
    real=snakemake.input.real,
    simulated=snakemake.input.simulated,
    outputs=dict(snakemake.output.items()),
    seed=snakemake.params.seed,
    max_real_cells=snakemake.params.max_real_cells,
    n_markers=snakemake.params.n_markers,
)
