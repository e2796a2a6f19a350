import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import simulate

log_to_file(snakemake.log[0])
simulate(
    model_path=snakemake.input.model,
    store=snakemake.input.store,
    output=snakemake.output.simulated,
    expected=snakemake.output.expected,
    cells_per_type=snakemake.params.cells_per_type,
    cells=snakemake.params.cells,
    seed=snakemake.params.seed,
    batch_size=snakemake.params.batch_size,
    count_sampling=snakemake.params.count_sampling,
    library_sizes=snakemake.params.library_sizes,
    latent=snakemake.params.latent,
    calibration=snakemake.params.calibration,
    origins=snakemake.params.origins,
    write_table=snakemake.params.write_table,
    posteriors=snakemake.input.posteriors,
    threads=snakemake.threads,
)
