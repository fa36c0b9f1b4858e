"""Static checks of the sbatch scripts and the rendered 70B/8B plans (no cluster, no GPU, no root: always run)."""
from __future__ import annotations

import json
import os
import shlex
import subprocess

import pytest

from tests.slurm.conftest import REPO, TRAINER_PYTHON, require

SCRIPTS = sorted((REPO / "slurm").glob("*.sh"))
CPU_OK = ["precision.fp8=null"]  # FP8 is validated against the GPU: on this CPU machine render in bf16


def test_scripts_parse_and_are_shellcheck_clean():
    require("shellcheck")
    assert {p.name for p in SCRIPTS} >= {"job.sh", "topd_70b.sh", "topd_8b.sh", "topd_cpu.sh", "convert.sh"}
    for path in SCRIPTS:
        subprocess.run(["bash", "-n", str(path)], check=True)
    out = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout
    for path in SCRIPTS:  # preemption-ready and no folder Slurm must find before the job starts
        text = path.read_text()
        assert "--output=logs/" not in text
        if path.name.startswith("topd_"):
            assert "#SBATCH --requeue" in text and "#SBATCH --signal=B:USR1@" in text and "--open-mode=append" in text


def plan(config: str, nodelist: str, *overrides: str, servers: bool = True):
    out = subprocess.run([str(TRAINER_PYTHON), "-m", "megatron_topd.launch.plan", "--config", config, "--nodelist",
                          nodelist, "--job-id", "4242", *(["--servers"] if servers else []), *CPU_OK, *overrides],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return out


@pytest.mark.parametrize("config,nodes,split", [
    ("examples/topd_70b.yaml", "gpu[001-017]", {"trainer": 8, "student": 8, "teacher": 1, "per_node": 1, "ranks": 64}),
    ("examples/topd_8b.yaml", "gpu[101-104]", {"trainer": 2, "student": 1, "teacher": 1, "per_node": 4, "ranks": 16}),
])
def test_rendered_plan_splits_nodes_and_binds_routable_addresses(config, nodes, split):
    out = plan(config, nodes)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    trainer = lines[-1]
    assert trainer["role"] == "trainer" and len(trainer["nodes"]) == split["trainer"]
    assert trainer["ranks"] == split["ranks"]
    servers = lines[:-1]
    student_nodes = {s["node"] for s in servers if s["role"] == "student"}
    teacher_nodes = {s["node"] for s in servers if s["role"] == "teacher"}
    assert len(student_nodes) == split["student"] and len(teacher_nodes) == split["teacher"]
    assert not (set(trainer["nodes"]) & student_nodes) and not (student_nodes & teacher_nodes)
    assert not (set(trainer["nodes"]) & teacher_nodes)
    assert sum(s["role"] == "student" for s in servers) == split["student"] * split["per_node"]
    for s in servers:  # each server binds every interface of its node and is reached at the node's name
        assert s["command"][s["command"].index("--host") + 1] == "0.0.0.0"
        assert s["host"] == s["node"] and s["host"] not in ("127.0.0.1", "localhost", "0.0.0.0")
        assert s["command"][0] == "python3"  # the SGLang image's interpreter, not a local venv
    gpu_ids = sorted(int(s["command"][s["command"].index("--base-gpu-id") + 1]) for s in servers
                     if s["role"] == "student" and s["node"] == sorted(student_nodes)[0])
    assert gpu_ids == [i * (8 // split["per_node"]) for i in range(split["per_node"])]  # disjoint GPU slices
    # The weight-sync master is trainer rank 0's node, reachable from the server nodes.
    assert trainer["sync_master_address"] == trainer["nodes"][0] and not trainer["loopback_servers"]


def test_dryrun_of_topd_70b_sh_places_each_role_on_its_nodes():
    env = {**os.environ, "TOPD_DRYRUN": "1", "SLURM_JOB_NODELIST": "gpu[001-017]", "SLURM_JOB_ID": "4242",
           "SLURM_SUBMIT_DIR": str(REPO), "TRAINER_IMAGE": "/images/trainer.sqsh",
           "SGLANG_IMAGE": "nvcr.io#nvidia/sglang:25.10-py3", "TRAINER_PYTHON": str(TRAINER_PYTHON)}
    out = subprocess.run(["bash", "slurm/topd_70b.sh", *CPU_OK], cwd=REPO, capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    sruns = {}
    for line in out.stdout.splitlines():
        if line.startswith("srun"):
            args = shlex.split(line)
            sruns[next(a for a in args if a.startswith("--job-name=")).split("=", 1)[1]] = args
    assert set(sruns) == {"plan", "student", "teacher", "trainer"}
    assert "--nodelist=" + ",".join(f"gpu{i:03d}" for i in range(9, 17)) in sruns["student"]
    assert "--nodelist=gpu017" in sruns["teacher"]
    assert "--nodelist=" + ",".join(f"gpu{i:03d}" for i in range(1, 9)) in sruns["trainer"]
    assert "--ntasks=64" in sruns["trainer"] and "--container-image=/images/trainer.sqsh" in sruns["trainer"]
    assert "--container-image=nvcr.io#nvidia/sglang:25.10-py3" in sruns["student"]
    assert any(a.startswith("--export=ALL,MASTER_ADDR=gpu001,") for a in sruns["trainer"])
    assert "--nodelist=gpu001" in sruns["plan"]  # the batch script found the first node without Slurm's client


@pytest.mark.parametrize("nodelist,first", [("n[08-11],gpu1", "n08"), ("gpu7,n[1-2]", "gpu7"), ("solo", "solo"),
                                            ("rack[2-3]-n[01-02]", "rack2-n01"), ("a[1,3]", "a1")])
def test_job_sh_first_node_without_slurm(nodelist, first):
    """slurm/job.sh places the plan on the list's first node with shell code alone (no scontrol needed)."""
    body = (REPO / "slurm" / "job.sh").read_text()
    func = body[body.index("first_node() {"):body.index("first_node=$(")]
    out = subprocess.run(["bash", "-c", func + 'first_node "$1"', "x", nodelist], capture_output=True, text=True)
    assert out.stdout.strip() == first, out.stderr


def test_missing_fields_are_named_before_anything_starts():
    out = plan("examples/topd_70b.yaml", "gpu[001-017]", "teacher.hf_path=", servers=False)
    assert out.returncode != 0 and "teacher.hf_path is empty" in out.stderr
    out = plan("examples/topd_70b.yaml", "gpu[001-016]", servers=False)
    assert out.returncode != 0 and "--nodes=17" in out.stderr
    out = plan("examples/topd_70b.yaml", "gpu[001-017]", "rollout.num_servers=4", servers=False)
    assert out.returncode != 0 and "rollout.num_servers=4" in out.stderr


def test_job_sh_refuses_a_second_job_on_one_output_dir(tmp_path):
    """slurm/job.sh's lock on train.output_dir: the first job takes it, its requeued attempts keep it, a second job
    fails naming the holder while that one is queued or running, and takes over once the holder has ended."""
    body = (REPO / "slurm" / "job.sh").read_text()
    func = body[body.index("lock_run_dir() {"):body.index('[[ $DRYRUN == 1 ]] || lock_run_dir')]
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "squeue").write_text('#!/bin/bash\necho "$FAKE_STATE"\n')  # squeue -h -j ID -o %T
    (bin_dir / "squeue").chmod(0o755)
    run_dir = tmp_path / "run"

    def lock(job: str, holder_state: str = "") -> subprocess.CompletedProcess:
        return subprocess.run(["bash", "-c", func + 'lock_run_dir "$1" "$2"', "x", str(run_dir), job],
                              capture_output=True, text=True,
                              env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_STATE": holder_state})

    assert lock("100").returncode == 0 and (run_dir / ".job.lock").read_text().strip() == "100"
    assert lock("100", "RUNNING").returncode == 0                       # a requeued attempt of the holder
    refused = lock("200", "RUNNING")
    assert refused.returncode != 0 and "in use by Slurm job 100 (RUNNING)" in refused.stderr
    assert "scancel 100" in refused.stderr and "train.output_dir" in refused.stderr
    assert lock("200", "PENDING").returncode != 0                       # requeued, waiting to start again
    assert lock("200", "COMPLETED").returncode == 0                     # the holder ended without releasing it
    assert (run_dir / ".job.lock").read_text().strip() == "200"
