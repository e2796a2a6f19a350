import use_workflow_package  # noqa: F401  (first: puts the workflow's src/ on sys.path)
from cvaesim.logs import log_to_file
from cvaesim.steps import original_table

log_to_file(snakemake.log[0])
original_table(simulated=snakemake.input[0], output=snakemake.output[0])
