"""Real jobs on the local cluster: the CPU TOPD job split into roles (trainer n1, student servers n2, teacher n3).

1. NeMo-Run submits the experiment through LocalTunnel (heterogeneous job, one group per role, shipped code): it runs
   3 TOPD steps and reports SUCCEEDED; this run is also the uninterrupted reference for 2.
2. `sbatch slurm/topd_cpu.sh`, stopped by SIGUSR1 to the batch script (what --signal=B:USR1@<s> sends) while the
   servers start: the request is kept (<endpoints>/stop), so the trainer stops after step 1, checkpoints, exits 75;
   the job requeues itself, resumes from the checkpoint, runs the rest and ends with the steps, checkpoints, rollout
   files and metrics lines of the uninterrupted run. (A signal sent once step 1's rollouts were on disk raced a
   fast trainer: on CI all 3 steps ended before it arrived.)
3. A trainer that fails makes the NeMo-Run experiment report FAILED (not the servers' result).
"""
from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.slurm.conftest import (NEMORUN_PYTHON, REPO, TRAINER_PYTHON, asset_overrides, job_field, sacct_steps, tail,
                                  wait_until)

CONFIG = "examples/topd_cpu_slurm.yaml"
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
VOLATILE = ("_s", "sync_mb", "peak_mem_gb")  # timings and process sizes differ between runs


def common_overrides(assets, out: Path) -> list[str]:
    return [*asset_overrides(assets), f"train.output_dir={out}", f"rollout.server_python={SGLANG_PYTHON}"]


def reduced(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith(VOLATILE)} for r in rows]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def nemo_run(assets, out: Path, job_dir: Path, *extra: str, name: str) -> subprocess.CompletedProcess:
    if not NEMORUN_PYTHON.exists():
        pytest.fail(f"{NEMORUN_PYTHON} missing: run `make setup-nemorun` (nemo-run 0.11.1, leptonai 0.27.3)")
    cmd = [str(NEMORUN_PYTHON), "-c",
           "import sys; from megatron_topd.launch.nemo_run import experiment, status; "
           "import json; a = json.loads(sys.argv[1]); i = experiment(**a); print('STATUS', json.dumps(status(i)))",
           json.dumps({"config": CONFIG, "overrides": common_overrides(assets, out) + list(extra), "name": name,
                       "account": "topd", "partition": "cpu", "job_dir": str(job_dir), "time": "00:20:00",
                       "trainer_python": str(TRAINER_PYTHON), "server_python": str(TRAINER_PYTHON),
                       "env_vars": {"OMP_NUM_THREADS": "1"}, "group_wait_s": 2, "max_retries": 0})]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "NEMORUN_HOME": str(job_dir.parent)})


def status_of(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("STATUS ")]
    assert lines, f"no status: rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("STATUS "):])


@pytest.fixture(scope="module")
def reference(cluster, assets, tmp_path_factory):
    """The NeMo-Run experiment's uninterrupted 2-step run: (output dir, NeMo-Run status, NeMo-Run job dir)."""
    root = tmp_path_factory.mktemp("nemo_ok")
    out, job_dir = root / "run", root / "experiments"
    proc = nemo_run(assets, out, job_dir, name="topd")
    return out, status_of(proc), job_dir, proc


def test_nemo_run_experiment_runs_the_roles_and_succeeds(reference):
    out, status, job_dir, proc = reference
    assert status and all(v.endswith("SUCCEEDED") for v in status.values()), (status, tail(out / "logs/trainer.log"))
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (out / "checkpoints" / "latest_step.txt").read_text() == "3"
    # The roles ran from the code NeMo-Run shipped (PatternPackager), not from this checkout.
    sbatch = next(job_dir.rglob("*_sbatch.sh")).read_text()
    assert sbatch.count("#SBATCH hetjob") == 2 and "--het-group=2" in sbatch and "--requeue" in sbatch
    code_dirs = list(job_dir.rglob("code/megatron_topd/launch/trainer.py"))
    assert code_dirs and f"--chdir {code_dirs[0].parents[2]}" in sbatch
    # Slurm placed the het groups: each role on its own node, reached by node name, weight sync via the trainer's node.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    student = {u.split("//")[1].split(":")[0] for u in saved["rollout"]["urls"]}
    teacher = {u.split("//")[1].split(":")[0] for u in saved["teacher"]["urls"]}
    trainer = saved["rollout"]["sync_master_address"]
    assert len(student) == len(teacher) == 1 and len(student | teacher | {trainer}) == 3
    assert (student | teacher | {trainer}) <= {"n1", "n2", "n3"}


def slurm_debug(job_id: str, batch_log: Path, out: Path) -> str:
    """What a failed job assertion shows: the batch and trainer logs, Slurm's view of the job, and the controller's
    and the batch node's log lines about it (the cluster's logs are deleted with it)."""
    logs = Path(os.environ["SLURM_CONF"]).parent / "log"
    job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    ctld = [line for line in (logs / "slurmctld.log").read_text(errors="replace").splitlines()
            if f"JobId={job_id}" in line or f"job {job_id}" in line.lower()]
    slurmd = "\n".join(f"--- {p.name}\n{tail(p, 25)}" for p in sorted(logs.glob("slurmd-*.log")))
    return (f"--- batch\n{tail(batch_log)}\n--- trainer\n{tail(out / 'logs/trainer.log', 20)}\n--- scontrol\n{job}"
            f"\n--- slurmctld\n" + "\n".join(ctld[-40:]) + f"\n{slurmd}")


def test_sbatch_job_split_into_roles_is_preempted_requeued_and_resumes(cluster, assets, reference, tmp_path):
    ref_out = reference[0]
    out = tmp_path / "run"
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", "slurm/topd_cpu.sh",
                          *common_overrides(assets, out)], cwd=REPO, capture_output=True, text=True, check=True)
    job_id = job.stdout.strip().split(";")[0]
    batch_log = tmp_path / f"job-{job_id}.out"
    debug = lambda: slurm_debug(job_id, batch_log, out)  # noqa: E731
    try:
        # Ask the job to stop as --signal=B:USR1@<s> would, while its servers start and before the trainer trains:
        # the request must not be lost (the batch script keeps it in <endpoints>/stop) and stops the run after step 1.
        planned = lambda: batch_log.exists() and "[job] attempt" in batch_log.read_text()  # noqa: E731
        wait_until(planned, 300, "the batch script's plan", on_timeout=debug)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        wait_until(lambda: job_field(job_id, "Restarts") == "1" and job_field(job_id, "JobState") == "PENDING", 600,
                   "the job to requeue itself", on_timeout=debug)
        assert [r["step"] for r in metrics(out)] == [1], "the trainer stopped after the first step it ran"
        assert (out / "checkpoints" / "step_00000001" / "PREEMPTION_CHECKPOINT").exists()
        # Slurm holds a requeued job for AuthInfo's cred_expire (120 s by default; 10 s on the test cluster) so that
        # the revoked credentials of the first attempt expire. Starting it earlier (`scontrol update
        # starttime=now`, as this test once did) failed the launch now and then: FAILED, no output.
        wait_until(lambda: job_field(job_id, "JobState") in ("COMPLETED", "FAILED", "CANCELLED"), 900,
                   "the requeued job to finish", on_timeout=debug)
        assert job_field(job_id, "JobState") == "COMPLETED", debug()
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)

    # Each role ran on its own node, in both attempts (Slurm's accounting says where each step ran).
    time.sleep(2)
    steps = sacct_steps(job_id)
    by_name: dict[str, set] = {}
    for s in steps:
        by_name.setdefault(s["name"], set()).add(s["nodes"])
    assert by_name["trainer"] == {"n1"} and by_name["student"] == {"n2"} and by_name["teacher"] == {"n3"}, steps
    assert sum(s["name"] == "trainer" for s in steps) == 2, "one trainer step per attempt"
    log = batch_log.read_text()
    assert "attempt " + job_id + ".0" in log and "attempt " + job_id + ".1" in log and "requeueing" in log
    # The trainer reached the servers by node name; weight sync through trainer node n1.
    saved = (out / "config.yaml").read_text()
    assert "http://n2:" in saved and "http://n3:" in saved and "sync_master_address: n1" in saved
    assert "127.0.0.1" not in saved.split("rollout:")[1].split("topd:")[0].replace("host: 127.0.0.1", "")
    # The resumed run equals the uninterrupted one: steps, checkpoints, rollout files, metrics lines (and values).
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == \
        sorted(p.name for p in (ref_out / "checkpoints").glob("step_*")) == ["step_00000003"]
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == sorted(p.name for p in (ref_out / "rollouts").iterdir())
    for name in ("step_00000000.jsonl", "step_00000001.jsonl", "step_00000002.jsonl"):
        assert len((out / "rollouts" / name).read_text().splitlines()) == 4  # 2 prompts x 2 samples, none doubled
    records = [json.loads(line) for line in (out / "rollouts" / "step_00000001.jsonl").read_text().splitlines()]
    assert {r["weight_version"] for r in records} == {"1"}, "resumed servers were re-synced to the step-1 weights"
    # Same metrics lines (steps and fields), and step 2 drew the same prompts: the data position resumed exactly.
    # Values are not compared: near-future windows sampled by SGLang differ between any two runs (step 1 already).
    assert [sorted(r) for r in reduced(metrics(out))] == [sorted(r) for r in reduced(metrics(ref_out))]
    ref_records = [json.loads(line) for line in (ref_out / "rollouts" / "step_00000001.jsonl").read_text().splitlines()]
    assert [r["prompt_ids"] for r in records] == [r["prompt_ids"] for r in ref_records]


def test_failing_trainer_makes_the_experiment_fail(cluster, assets, tmp_path, reference):
    out = tmp_path / "run"
    # train.steps=0 is rejected by the trainer's config check only (the server roles do not read it).
    proc = nemo_run(assets, out, tmp_path / "experiments", "train.steps=0", name="topdfail")
    status = status_of(proc)
    assert status and all(v.endswith("FAILED") for v in status.values()), (status, tail(out / "logs/trainer.log"))
    assert not (out / "metrics.jsonl").exists()
