"""The Slurm tier: a real Slurm 22.05 cluster on this machine (slurmctld, slurmdbd + MariaDB, 4 virtual nodes
topdn1-topdn4, each in its own network namespace on a private bridge; scripts/slurm_local.sh), started for this package
and stopped after it. Jobs run the real roles with real SGLang CPU servers and the real trainer, each task as in a stock
container image (slurm/bare_task.sh). Needs root (daemons, namespaces, /etc/hosts): the only opt-out is a non-root
run, which skips the tests that need the cluster (test_static.py needs neither and always runs).
Without the packages these tests FAIL: `make setup-slurm setup-nemorun` (make test does it)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NEMORUN_PYTHON = REPO / ".venv-nemorun" / "bin" / "python"
TRAINER_PYTHON = REPO / ".venv" / "bin" / "python"


NODES = ("topdn1", "topdn2", "topdn3", "topdn4")  # scripts/slurm_local.sh's names; namespace topdsl-<node>


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="the local Slurm cluster needs root (daemons, namespaces, /etc/hosts)")
        for item in items:
            if "tests/slurm" in str(item.fspath) and "cluster" in getattr(item, "fixturenames", ()):
                item.add_marker(skip)


def pytest_generate_tests(metafunc):
    """--job-runs N: the fixtures that take `job_run` (the fault job) are made N times, each run's tests against it."""
    runs = metafunc.config.getoption("--job-runs")
    if runs > 1 and "job_run" in metafunc.fixturenames:
        metafunc.parametrize("job_run", range(1, runs + 1), scope="module", ids=lambda n: f"job{n}")


@pytest.fixture(scope="module")
def job_run() -> int:
    """Which run of a repeated job this is: 1 unless --job-runs repeats it (then parametrized, see above)."""
    return 1


def node_processes(node: str) -> list[str]:
    """`pid command` of every process in a node's network namespace except its slurmd (the job's leftovers)."""
    pids = subprocess.run(["ip", "netns", "pids", f"topdsl-{node}"], capture_output=True, text=True).stdout.split()
    out = []
    for pid in pids:
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cmd and not cmd.startswith("slurmd "):
            out.append(f"{pid} {cmd[:200]}")
    return out


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed: run `make setup-slurm` (apt: Slurm, munge, slurmdbd, "
                    "MariaDB, shellcheck, iproute2, util-linux)")


@pytest.fixture(scope="package")
def cluster(tmp_path_factory):
    """SLURM_CONF of a running local cluster (also exported into os.environ for the package's tests)."""
    require("slurmctld", "slurmd", "slurmdbd", "mariadbd", "munged", "sbatch", "sacct", "ip", "nsenter", "unshare")
    # Not under pytest's private tmp folder: MariaDB runs as user mysql and must reach its data folder.
    state = Path(tempfile.mkdtemp(prefix="topd-slurm-"))
    script = REPO / "scripts" / "slurm_local.sh"
    hosts_before = Path("/etc/hosts").read_text()
    started = subprocess.run(["bash", str(script), "start", str(state)], capture_output=True, text=True, timeout=180)
    if started.returncode != 0:
        subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, timeout=120)
        pytest.fail(f"local Slurm cluster did not start:\n{started.stdout}\n{started.stderr}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield os.environ["SLURM_CONF"]
    finally:
        stopped = subprocess.run(["bash", str(script), "stop", str(state)], capture_output=True, text=True, timeout=180)
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        # Nothing left behind: /etc/hosts as before, no node namespace, no process started from the cluster's folder.
        netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        left = [line for line in subprocess.run(["ps", "-eo", "pid,args"], capture_output=True, text=True).stdout
                .splitlines() if str(state) in line]
        shutil.rmtree(state, ignore_errors=True)
        assert Path("/etc/hosts").read_text() == hosts_before, "the cluster's /etc/hosts lines were not removed"
        assert "topdsl-" not in netns, netns
        assert not left and stopped.returncode == 0, (left, stopped.stdout, stopped.stderr)


@pytest.fixture(scope="package")
def assets(demo_assets):
    """The CPU demo's tiny student/teacher (HF + Megatron) and prompts (shared with the integration tier)."""
    return demo_assets


def asset_overrides(assets) -> list[str]:
    return [f"train.student_checkpoint={assets['student_ckpt']}", f"train.student_hf_path={assets['student_hf']}",
            f"teacher.checkpoint={assets['teacher_ckpt']}", f"teacher.hf_path={assets['teacher_hf']}",
            f"train.prompts_path={assets['prompts']}"]


def job_field(job_id: str, field: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    for token in out.split():
        if token.startswith(field + "="):
            return token.split("=", 1)[1]
    return ""


def sacct_steps(job_id: str) -> list[dict]:
    """Every step of every attempt: name, node list, state, exit code (from Slurm's accounting, not our logs)."""
    out = subprocess.run(["sacct", "-j", job_id, "--duplicates", "-n", "-P", "-o", "JobID,JobName,NodeList,State,ExitCode"],
                         capture_output=True, text=True, check=True).stdout
    rows = [dict(zip(("id", "name", "nodes", "state", "exit"), line.split("|"))) for line in out.splitlines() if line]
    return rows


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"({path} missing)"
