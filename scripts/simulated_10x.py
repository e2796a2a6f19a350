import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import simulated_10x

log_to_file(snakemake.log[0])
simulated_10x(simulated=snakemake.input[0], output=snakemake.output[0])
