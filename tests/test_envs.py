"""Each rule's conda environment holds what its script imports: the scanpy one has no TensorFlow; and the
version bounds agree across pyproject.toml, envs/ and .ci/lower-bounds.txt."""

import ast
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TENSORFLOW_FREE_ENV = "../envs/scanpy.yaml"
TENSORFLOW_ENV = "../envs/tensorflow.yaml"
# A stand-in for conda that answers the questions Snakemake asks before it lists the environments it would build.
CONDA_STUB = """#!/bin/sh
case "$1" in
  --version) echo "conda 24.9.2" ;;
  info) echo '{"conda_prefix": "/nonexistent/conda", "platform": "linux-64"}' ;;
  config) echo '{"get": {"channel_priority": "strict"}}' ;;
  *) echo "not a real conda" >&2; exit 1 ;;
esac
"""
# Import names whose package is named otherwise (conda-forge, PyPI); Keras comes with TensorFlow.
PACKAGE_OF_IMPORT = {"sklearn": "scikit-learn", "matplotlib": "matplotlib", "keras": "tensorflow"}
# Not needed to run the workflow: the tests check the model on Keras's JAX backend.
OPTIONAL_IMPORTS = {"jax"}
# Import these in a fresh interpreter with TensorFlow, Keras and JAX made unimportable.
BLOCKED_IMPORT = """
import importlib, importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "jax"):
            raise ModuleNotFoundError(f"No module named {name!r} (not in envs/scanpy.yaml)")
sys.meta_path.insert(0, Blocked())
for module in sys.argv[1:]:
    importlib.import_module(module)
"""


def rules_by_environment():
    """(rule, conda environment, script) of every rule, read from rules/*.smk."""
    found = []
    for path in sorted((ROOT / "rules").glob("*.smk")):
        for block in re.split(r"\n(?=rule )", path.read_text()):
            name = re.match(r"rule (\w+):", block)
            env = re.search(r'conda:\s*(?:"([^"]+)"|(tensorflow_env))', block)
            script = re.search(r'script:\s*"([^"]+)"', block)
            if name and env and script:
                # tensorflow_env picks the CPU or the CUDA build of one environment (see the test below).
                found.append((name[1], env[1] or TENSORFLOW_ENV, script[1]))
    return found


def modules_of_step(script: Path) -> list[str]:
    """The package modules a script's step imports, at the top of steps.py and inside the step itself."""
    step = re.search(r"from cvaesim\.steps import (\w+)", script.read_text())[1]
    steps_source = (ROOT / "src" / "cvaesim" / "steps.py").read_text()
    body = re.search(rf"\ndef {step}\(.*?(?=\ndef |\Z)", steps_source, re.S)[0]
    return ["cvaesim.steps", *(f"cvaesim.{module}" for module in re.findall(r"from \.(\w+) import", body))]


def test_every_rule_names_an_environment_that_exists():
    rules = rules_by_environment()
    assert {name for name, _, _ in rules} >= {"filter", "train", "simulate", "original_table", "simulated_10x"}
    for name, env, _ in rules:
        assert "dependencies" in yaml.safe_load((ROOT / "rules" / env).read_text()), name


def test_steps_run_in_the_tensorflow_free_environment_never_import_tensorflow():
    checked = []
    for name, env, script in rules_by_environment():
        if env != TENSORFLOW_FREE_ENV:
            continue
        modules = modules_of_step((ROOT / "rules" / script).resolve())
        result = subprocess.run([sys.executable, "-c", BLOCKED_IMPORT, *modules], capture_output=True, text=True,
                                cwd=ROOT)
        assert result.returncode == 0, f"rule {name} ({', '.join(modules)}): {result.stderr.strip().splitlines()[-1]}"
        checked.append(name)
    assert {"download", "filter", "original_table", "simulated_10x", "qc", "evaluate"} <= set(checked)


def imported_packages() -> set[str]:
    """The third-party packages the package imports anywhere (module level or inside functions)."""
    names = set()
    for path in (ROOT / "src" / "cvaesim").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module.split(".")[0])
    third_party = names - set(sys.stdlib_module_names) - {"cvaesim", "__future__"} - OPTIONAL_IMPORTS
    return {PACKAGE_OF_IMPORT.get(name, name) for name in third_party}


def listed_packages(requirements: list[str]) -> set[str]:
    """Package names of requirement lines ('scanpy >=1.10', 'matplotlib-base', 'tensorflow-cpu==2.21.0')."""
    names = {re.match(r"[A-Za-z0-9_.-]+", line.strip())[0].lower() for line in requirements}
    return {re.sub(r"-(base|cpu)$", "", name) for name in names}


def test_every_package_the_code_imports_is_a_declared_dependency():
    needed = imported_packages()
    assert {"numpy", "anndata", "scanpy", "scikit-learn", "tensorflow"} <= needed
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = listed_packages(project["dependencies"] + project["optional-dependencies"]["cpu"])
    assert needed <= declared, f"pyproject.toml lacks {sorted(needed - declared)}"
    for env, tensorflow_free in (("scanpy", True), ("tensorflow", False)):
        dependencies = yaml.safe_load((ROOT / "envs" / f"{env}.yaml").read_text())["dependencies"]
        lines = [entry for entry in dependencies if isinstance(entry, str)]
        lines += [line for entry in dependencies if isinstance(entry, dict) for line in entry.get("pip", [])]
        missing = needed - listed_packages(lines) - ({"tensorflow"} if tensorflow_free else set())
        assert not missing, f"envs/{env}.yaml lacks {sorted(missing)}"


def test_the_tensorflow_rules_build_the_cpu_or_the_cuda_build_as_the_config_says(tmp_path):
    cpu, cuda = (yaml.safe_load((ROOT / "envs" / name).read_text()) for name in ("tensorflow.yaml", "tensorflow-cuda.yaml"))
    assert cpu["dependencies"][:-1] == cuda["dependencies"][:-1] and cpu["channels"] == cuda["channels"]
    assert cpu["dependencies"][-1] == {"pip": ["tensorflow-cpu==2.21.0"]}
    assert cuda["dependencies"][-1] == {"pip": ["tensorflow[and-cuda]==2.21.0"]}
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "conda").write_text(CONDA_STUB)
    (tmp_path / "bin" / "conda").chmod(0o755)
    shutil.copytree(ROOT / "config", tmp_path / "work" / "config")
    environment = {**os.environ, "PATH": f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    listed = {}
    for build in ("cpu", "cuda"):
        result = subprocess.run([str(Path(sys.executable).parent / "snakemake"), "--snakefile", str(ROOT / "Snakefile"),
                                 "--directory", str(tmp_path / "work"), "--list-conda-envs", "--config",
                                 f"conda_tensorflow={build}"], capture_output=True, text=True, env=environment)
        assert result.returncode == 0, result.stderr
        listed[build] = set(re.findall(r"^\S*/(envs/[\w.-]+\.yaml)\t", result.stdout, re.M))
    assert listed == {"cpu": {"envs/scanpy.yaml", "envs/tensorflow.yaml"},
                      "cuda": {"envs/scanpy.yaml", "envs/tensorflow-cuda.yaml"}}


# conda-forge's names of packages that PyPI names otherwise.
PYPI_NAME_OF_CONDA = {"python-igraph": "igraph", "pytables": "tables", "matplotlib-base": "matplotlib"}


def test_the_conda_environments_and_the_lower_bounds_file_follow_pyproject_s_version_bounds():
    """The bounds are written in four places: each env keeps pyproject.toml's, and .ci/lower-bounds.txt pins
    every dependency with a lower bound at a release that pyproject.toml allows, no older than that bound."""
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    bounds = {requirement.name: requirement.specifier
              for requirement in map(Requirement, project["dependencies"])}
    for env in ("scanpy", "tensorflow", "tensorflow-cuda"):
        dependencies = yaml.safe_load((ROOT / "envs" / f"{env}.yaml").read_text())["dependencies"]
        listed = {PYPI_NAME_OF_CONDA.get(name, name): SpecifierSet(specifier.replace(" ", ""))
                  for name, _, specifier in (line.partition(" ") for line in dependencies if isinstance(line, str))
                  if name not in ("python", "pip")}
        assert listed == bounds, f"envs/{env}.yaml"
    pinned = dict(line.split("==") for line in (ROOT / ".ci" / "lower-bounds.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    lower = {name: Version(spec.version) for name, specifier in bounds.items()
             for spec in specifier if spec.operator == ">="}
    assert set(pinned) == set(lower)
    for name, version in pinned.items():
        assert Version(version) >= lower[name] and bounds[name].contains(version), name
