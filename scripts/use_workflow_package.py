"""Imported first by every rule script: puts this workflow's own ``src/`` first on sys.path.

The scripts then use the package version that ships with the workflow, whatever environment
runs them (the project's virtual environment, a conda env, a cluster node). Snakemake puts
the scripts' folder on sys.path, which is how this module is found.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
