"""The workflow on a real single-node Slurm cluster on 127.0.0.1, with the Slurm profile.

Needs root and Debian's packages (installed here when missing). Where the machine cannot
run Slurm, the test is skipped with the reason.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import anndata as ad
import pytest

from conftest import QUICK, QUICK_RUN, copy_repository, snakemake, write_config

pytestmark = pytest.mark.workflow

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
CONFIG_DIR = Path("/etc/slurm")
CLUSTER_RULES = {"filter", "reshape", "train", "simulate", "original_table", "simulated_10x", "qc", "evaluate"}


def why_slurm_cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "the Slurm test needs root (to start munged, slurmctld and slurmd)"
    if all(shutil.which(name) for name in ("slurmctld", "slurmd", "sinfo", "munged")):
        return None
    if not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=environment)
    installed = subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
                               capture_output=True, text=True, env=environment)
    if installed.returncode != 0:
        return f"apt-get could not install Slurm: {installed.stderr.strip()[-300:]}"
    return None


def slurm_conf(scratch: Path) -> str:
    return f"""ClusterName=cvaesim-test
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=500
ReturnToService=2
MinJobAge=600
GresTypes=gpu
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={scratch}/state
SlurmdSpoolDir={scratch}/spool
SlurmctldPidFile={scratch}/slurmctld.pid
SlurmdPidFile={scratch}/slurmd.pid
SlurmctldLogFile={scratch}/slurmctld.log
SlurmdLogFile={scratch}/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=4000 Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def stop(pid_file: Path) -> None:
    """Stop a daemon by its pid file and wait until it has gone."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text().split()[0])
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            os.kill(pid, 0)
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    reason = why_slurm_cannot_run()
    if reason:
        pytest.skip(reason)
    ours = []
    for name in ("slurm.conf", "gres.conf"):
        if (CONFIG_DIR / name).exists() or (CONFIG_DIR / name).is_symlink():
            pytest.skip(f"{CONFIG_DIR / name} exists: not touching this machine's own Slurm configuration")
    scratch = tmp_path_factory.mktemp("slurm")
    for folder in ("state", "spool"):
        (scratch / folder).mkdir()
    (scratch / "slurm.conf").write_text(slurm_conf(scratch))
    (scratch / "gres.conf").write_text("NodeName=localhost Name=gpu File=/dev/null\n")
    munge_pid = Path("/run/munge/munged.pid")
    started = []
    try:
        # The jobstep plugin strips SLURM_CONF inside jobs, so the config must be at /etc/slurm.
        CONFIG_DIR.mkdir(exist_ok=True)
        for name in ("slurm.conf", "gres.conf"):
            (CONFIG_DIR / name).symlink_to(scratch / name)
            ours.append(CONFIG_DIR / name)
        subprocess.run(["install", "-d", "-o", "munge", "-g", "munge", "/run/munge"], check=True)
        if not munge_pid.exists():
            subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
            started.append(munge_pid)
        subprocess.run(["/usr/sbin/slurmctld"], check=True)
        started.append(scratch / "slurmctld.pid")
        subprocess.run(["/usr/sbin/slurmd", "-N", "localhost"], check=True)
        started.append(scratch / "slurmd.pid")
        for _ in range(300):
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True).stdout.strip()
            if state == "idle":
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"the Slurm node did not become idle (state {state!r}); see {scratch}/slurmctld.log")
        yield scratch
    finally:
        for pid_file in reversed(started):
            stop(pid_file)
        for link in ours:
            link.unlink(missing_ok=True)


def jobs_by_rule() -> dict[str, str]:
    """Each finished or running job's scontrol record, by the rule named in its comment."""
    listing = subprocess.run(["scontrol", "show", "job", "--oneliner"], capture_output=True, text=True,
                             check=True).stdout
    records = {}
    for line in listing.splitlines():
        fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
        # The executor's comment reads rule_<rule>_wildcards_<values>.
        rule = fields.get("Comment", "").removeprefix("rule_").split("_wildcards_")[0]
        records[rule] = line
    return records


def test_workflow_runs_on_slurm_like_locally(slurm_cluster, workdir, tmp_path):
    cluster_copy = copy_repository(tmp_path / "repo")
    write_config(cluster_copy / "quick.yaml", QUICK)
    result = snakemake(cluster_copy, "--profile", str(cluster_copy / "tests" / "slurm"), *QUICK_RUN)
    records = jobs_by_rule()
    assert CLUSTER_RULES <= set(records), (set(records), result.stdout[-3000:])
    assert "download" not in records and "compare_datasets" not in records  # local rules: on the submit host
    assert "gpu:1" in records["train"] or "gpu=1" in records["train"], records["train"]
    assert all("JobState=COMPLETED" in records[rule] for rule in CLUSTER_RULES)

    local = workdir / "results" / "pbmc68k_reduced"
    on_cluster = cluster_copy / "results" / "pbmc68k_reduced"
    for path in ("filtered.h5ad", "images/images.h5ad", "simulated/simulated.h5ad"):
        left, right = ad.read_h5ad(local / path), ad.read_h5ad(on_cluster / path)
        assert (left.X != right.X).nnz == 0, path
        assert left.obs.equals(right.obs) and list(left.var_names) == list(right.var_names), path
