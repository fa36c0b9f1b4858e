"""Real jobs on the local cluster: the CPU TOPD job split into roles on 4 nodes with their own network stacks
(trainer topdn1-topdn2 with 2 gloo ranks each, student servers topdn3, teacher servers topdn4), every task run as in
a stock container image (slurm/bare_task.sh: no Slurm client, no slurm.conf, no munge socket).

1. NeMo-Run submits the experiment through LocalTunnel (heterogeneous job, one group per role, shipped code): it runs
   3 TOPD steps and reports SUCCEEDED; this run is also the uninterrupted reference for 2.
2. `sbatch slurm/topd_cpu.sh` on launch.network_interface=topd0 goes through faults in a row. Attempt 1 gets three
   stop requests, each asserted by its own trace: SIGUSR1 to the batch script (what --signal=B:USR1@<s> sends) while
   it plans, kept as <endpoints>/stop; SIGTERM to every task of the job (`scancel --signal=TERM`, what preemption with
   GraceTime sends) once the servers are up, which the servers hold; and its time limit cut to end before the run
   would (`scontrol update TimeLimit=`), whose new end the batch script hands over and on which deadline.py says stop.
   The trainer finishes step 1, checkpoints, exits 75 and the job requeues itself before that end. Attempt 2 (its
   limit given back while it waits): the student server's SGLang process is killed (in its node's namespace) once it
   serves; its role reports it, the trainer ends the attempt (trainer.exit 75) and the job requeues itself again.
   Attempt 3 starts every server fresh, synced to the checkpoint of step 1, and runs steps 2 and 3. The job ends
   with the steps, checkpoints, rollout files and metrics lines of the uninterrupted run, none lost or doubled.
   Weight sync: distributed, over gloo from trainer rank 0 on
   topdn1 to the student server on topdn3; ranks 2-3 on topdn2 cannot bind topdn1's address (before the fix, Errno
   99 there). Each task asserts on entry that `scontrol` cannot run. Every attempt runs the copy of the code taken
   when the job first started.
3. A student server whose SGLang never becomes healthy fails the job within 2 minutes, the error naming role, node
   and the last lines of its log; nothing of the job is left on any node.
4. A trainer that fails (a config error) makes the NeMo-Run experiment report FAILED (not the servers' result), with
   no retry although retries remain: NeMo-Run's script requeues only the stop code (launch/nemo_run.py's guard).
5. A trainer rank killed mid-step fails the job, nothing of it left on any node; before that, from another node's
   namespace, the running student server refuses calls without the job's API key and answers with it.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from megatron_topd.testing.waits import wait_until
from tests.slurm.conftest import (NEMORUN_PYTHON, NODES, REPO, TRAINER_PYTHON, asset_overrides, job_field,
                                  node_processes, sacct_steps, tail)

CONFIG = "examples/topd_cpu_slurm.yaml"
STEPS = "train.steps=3"  # the reference and the interrupted job: one step per attempt of the latter
SGLANG_PYTHON = REPO / ".venv-sglang" / "bin" / "python"
VOLATILE = ("_s", "sync_mb", "peak_mem_gb")  # timings and process sizes differ between runs
CUT_MARGIN_S = 90  # the interrupted job's cut time limit ends 90-150 s after the cut (whole minutes)
STOP_MARGIN_S = 160  # its launch.stop_margin_s: above CUT_MARGIN_S + 60, so the cut always stops it at the next step
ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def common_overrides(assets, out: Path) -> list[str]:
    return [*asset_overrides(assets), f"train.output_dir={out}", f"rollout.server_python={SGLANG_PYTHON}"]


def reduced(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith(VOLATILE)} for r in rows]


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def nemo_run(assets, out: Path, job_dir: Path, *extra: str, name: str, retries: int = 0) -> subprocess.CompletedProcess:
    if not NEMORUN_PYTHON.exists():
        pytest.fail(f"{NEMORUN_PYTHON} missing: run `make setup-nemorun` (nemo-run 0.11.1, leptonai 0.27.3)")
    cmd = [str(NEMORUN_PYTHON), "-c",
           "import sys; from megatron_topd.launch.nemo_run import experiment, status; "
           "import json; a = json.loads(sys.argv[1]); i = experiment(**a); print('STATUS', json.dumps(status(i)))",
           json.dumps({"config": CONFIG, "overrides": common_overrides(assets, out) + list(extra), "name": name,
                       "account": "topd", "partition": "cpu", "job_dir": str(job_dir), "time": "00:20:00",
                       "trainer_python": str(TRAINER_PYTHON), "server_python": str(TRAINER_PYTHON),
                       "env_vars": {"OMP_NUM_THREADS": "1"}, "group_wait_s": 2, "max_retries": retries})]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO), "NEMORUN_HOME": str(job_dir.parent)})


def status_of(proc: subprocess.CompletedProcess) -> dict:
    lines = [line for line in proc.stdout.splitlines() if line.startswith("STATUS ")]
    assert lines, f"no status: rc={proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads(lines[-1][len("STATUS "):])


def host_of(url: str) -> str:
    return url.split("//")[1].rsplit(":", 1)[0]


@pytest.fixture(scope="module")
def reference(cluster, assets, tmp_path_factory):
    """The NeMo-Run experiment's uninterrupted 2-step run: (output dir, NeMo-Run status, NeMo-Run job dir)."""
    root = tmp_path_factory.mktemp("nemo_ok")
    out, job_dir = root / "run", root / "experiments"
    proc = nemo_run(assets, out, job_dir, STEPS, name="topd")
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
    # Preemption notice to the tasks (no B:, the script has no trap), requeue only on the stop code (the guard).
    assert "#SBATCH --signal=USR1@900" in sbatch and 'command scontrol "$@"' in sbatch
    code_dirs = list(job_dir.rglob("code/megatron_topd/launch/trainer.py"))
    assert code_dirs and f"--chdir {code_dirs[0].parents[2]}" in sbatch
    # Slurm placed the het groups: each role on its own node(s), reached by node name, weight sync via trainer node 1.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    student = {host_of(u) for u in saved["rollout"]["urls"]}
    teacher = {host_of(u) for u in saved["teacher"]["urls"]}
    trainer = saved["rollout"]["sync_master_address"]
    assert len(student) == len(teacher) == 1 and len(student | teacher | {trainer}) == 3
    assert (student | teacher | {trainer}) <= set(NODES)


def slurm_debug(job_id: str, batch_log: Path, out: Path) -> str:
    """What a failed job assertion shows: the batch and trainer logs, Slurm's view of the job, and the controller's
    and the nodes' log lines about it (the cluster's logs are deleted with it)."""
    logs = Path(os.environ["SLURM_CONF"]).parent / "log"
    job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
    ctld = [line for line in (logs / "slurmctld.log").read_text(errors="replace").splitlines()
            if f"JobId={job_id}" in line or f"job {job_id}" in line.lower()]
    slurmd = "\n".join(f"--- {p.name}\n{tail(p, 25)}" for p in sorted(logs.glob("slurmd-*.log")))
    return (f"--- batch\n{tail(batch_log)}\n--- trainer\n{tail(out / 'logs/trainer.log', 20)}\n--- scontrol\n{job}"
            f"\n--- slurmctld\n" + "\n".join(ctld[-40:]) + f"\n{slurmd}")


def submit(tmp_path: Path, overrides: list[str], env: dict | None = None) -> tuple[str, Path]:
    job = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/job-%j.out", "slurm/topd_cpu.sh", *overrides],
                         cwd=REPO, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})})
    job_id = job.stdout.strip().split(";")[0]
    return job_id, tmp_path / f"job-{job_id}.out"


def nothing_left_on_any_node(timeout_s: float = 60) -> None:
    """Every node's namespace holds its slurmd only (the job's processes, SGLang's included, are gone)."""
    left = lambda: {n: node_processes(n) for n in NODES if node_processes(n)}  # noqa: E731
    wait_until(lambda: not left(), timeout_s, "the job's processes to leave every node",
               on_timeout=lambda: json.dumps(left(), indent=1))


def attempt_published(out: Path, job_id: str, restart: int) -> bool:
    """This attempt's student server is up (its endpoint file written): the trainer loads, waits or trains."""
    for path in (out / "endpoints" / "student").glob("*.json"):
        try:
            if json.loads(path.read_text())["attempt"] == f"{job_id}.{restart}":
                return True
        except (OSError, json.JSONDecodeError):
            continue
    return False


def epoch(slurm_time: str) -> float:
    return time.mktime(time.strptime(slurm_time, "%Y-%m-%dT%H:%M:%S"))


@pytest.fixture(scope="module")
def interrupted(cluster, assets, reference, tmp_path_factory, job_run):
    """The sbatch job through three stop requests in attempt 1 (SIGUSR1 while it plans, SIGTERM to every task and a
    time limit cut mid-run, each leaving its own trace), its student server's SGLang killed once it serves (attempt
    2) and a final attempt: (job id, batch log, output dir, sacct steps, what the test saw). launch.stop_margin_s=160 (see
    the cut)."""
    tmp_path = tmp_path_factory.mktemp(f"sbatch_faults_{job_run}")
    out = tmp_path / "run"
    job_id, batch_log = submit(tmp_path, [*common_overrides(assets, out), "launch.network_interface=topd0", STEPS,
                                          f"launch.stop_margin_s={STOP_MARGIN_S}"],
                               env={"TOPD_JOB_END_POLL_S": "5"})
    debug = lambda: slurm_debug(job_id, batch_log, out)  # noqa: E731
    restarts = lambda: int(job_field(job_id, "Restarts") or 0)  # noqa: E731  (monotonic: no state to catch)
    seen = {}
    try:
        # Attempt 1. A stop request while the batch script plans (before any task runs) must not be lost.
        planned = lambda: batch_log.exists() and "[job] attempt" in batch_log.read_text()  # noqa: E731
        wait_until(planned, 300, "the batch script's plan", on_timeout=debug)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        # Once the servers serve: SIGTERM to every task (not the batch script): they must keep serving step 1.
        wait_until(lambda: attempt_published(out, job_id, 0), 300, "attempt 1's servers", on_timeout=debug)
        subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
        # And the time limit cut to the first whole minute from the start that leaves >= CUT_MARGIN_S (Slurm counts
        # limits in whole minutes: the end falls CUT_MARGIN_S to CUT_MARGIN_S + 60 s after the cut), less than the
        # rest of the run needs: the limit falls mid-run. The batch script must hand the new end over (job_end, read
        # again every 5 s here) and deadline.py must say stop. Why it cannot flake: with launch.stop_margin_s above
        # CUT_MARGIN_S + 60 the time left at the step's end is below the stop rule's margin alone, so deadline.py
        # stops there whatever the steps measured; and from the cut to the requeue (the trainer's start-up and a
        # step, a save, the servers' stop, `scontrol requeue`) took 34 s on a machine at load 8-12 on 2 cores (82 s
        # before the end) and 22 s at load 3-5 (109 s before it), well under CUT_MARGIN_S.
        start = epoch(job_field(job_id, "StartTime"))
        seen["cut_at"] = time.time() - start
        minutes = math.ceil((seen["cut_at"] + CUT_MARGIN_S) / 60)
        subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={minutes}"], check=True)
        seen["end"] = epoch(job_field(job_id, "EndTime"))
        handed_over = lambda: (out / "endpoints" / "job_end").exists() and json.loads(  # noqa: E731
            (out / "endpoints" / "job_end").read_text()) == {"end": seen["end"], "attempt": f"{job_id}.0"}
        wait_until(handed_over, 30, "the batch script to hand over the new end time", on_timeout=debug)
        wait_until(lambda: restarts() >= 1 or job_field(job_id, "JobState") in ENDED, 600,
                   "the job to requeue itself after its stop requests", on_timeout=debug)
        seen["requeued_1"] = time.time()
        assert restarts() == 1, f"the job ended without requeueing itself\n{debug()}"
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=30"], check=True)  # for attempt 2
        seen["after_1"] = [r["step"] for r in metrics(out)]
        seen["temporary_1"] = (out / "checkpoints" / "step_00000001" / "PREEMPTION_CHECKPOINT").exists()
        # Attempt 2 (Slurm holds a requeued job for AuthInfo's cred_expire, 10 s on the test cluster): once its
        # student server serves (endpoint published), SIGKILL its SGLang in topdn3's namespace. Every way the
        # trainer can meet the loss ends the attempt and requeues the job, whatever it is doing then: still waiting
        # for the endpoints (the role's report), or at its first call to the server (the resumed weights' sync,
        # whose group rendezvous ends at the failed call, not at its 600-s timeout). It has trained nothing yet, so
        # no step can end before the loss is met (killed after step 2's rollouts, as before, the kill could land
        # after step 2's last call to the server on a fast machine: step 2 then ended and the stop check stopped).
        wait_until(lambda: restarts() == 1 and attempt_published(out, job_id, 1), 300, "attempt 2's student server",
                   on_timeout=debug)
        (victim,) = sglang_main_on("topdn3")
        os.kill(victim, 9)
        wait_until(lambda: restarts() >= 2 or job_field(job_id, "JobState") in ENDED, 300,
                   "the job to requeue itself after losing its student server", on_timeout=debug)
        assert restarts() == 2, f"the job ended without requeueing itself\n{debug()}"
        seen["after_2"] = [r["step"] for r in metrics(out)]
        wait_until(lambda: job_field(job_id, "JobState") in ENDED, 900, "the requeued job to finish", on_timeout=debug)
        assert job_field(job_id, "JobState") == "COMPLETED", debug()
        seen["started_3"], seen["ended"] = epoch(job_field(job_id, "StartTime")), time.time()
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    # Slurm's accounting records the steps of every attempt shortly after the end: wait for them, not for a clock.
    steps = wait_until(lambda: (lambda s: s if sum(r["name"] == "trainer" for r in s) == 3 else None)(
        sacct_steps(job_id)), 60, "sacct to list the three attempts' trainer steps",
        on_timeout=lambda: json.dumps(sacct_steps(job_id), indent=1))
    return job_id, batch_log, out, steps, seen


def test_tasks_cannot_run_scontrol_and_the_job_still_runs(interrupted):
    """Each role's task, in every attempt, found no Slurm client (asserted inside the task, by slurm/bare_task.sh,
    which fails the task if `scontrol` runs) and the job completed: nothing in a role needs Slurm's client."""
    job_id, batch_log, out, _, _ = interrupted
    logs = out / "logs"
    refused = "no Slurm client here: scontrol:"
    trainer = [line for line in (logs / "trainer.log").read_text().splitlines() if refused in line]
    assert len(trainer) == 3 * 4, trainer  # 4 ranks x 3 attempts
    assert {line.split("[bare task ")[1].split("]")[0] for line in trainer} == \
        {"topdn1 rank 0", "topdn1 rank 1", "topdn2 rank 2", "topdn2 rank 3"}
    for role, node in (("student", "topdn3"), ("teacher", "topdn4")):
        lines = [line for line in (logs / f"{role}.log").read_text().splitlines() if refused in line]
        assert len(lines) == 3 and all(f"[bare task {node} " in line for line in lines), lines
    assert sum(refused in line for line in batch_log.read_text().splitlines()) == 3  # the plan step, per attempt
    assert "Permission denied" in trainer[0]


def test_sbatch_job_through_stop_requests_and_a_lost_server_requeues_and_equals_the_uninterrupted_run(
        interrupted, reference):
    job_id, batch_log, out, steps, seen = interrupted
    ref_out = reference[0]
    print(f"[interrupted job] {seen}")  # the timings the test acted on (pytest -s)
    by_name: dict[str, set] = {}
    for s in steps:
        by_name.setdefault(s["name"], set()).add(s["nodes"])
    assert by_name["trainer"] == {"topdn[1-2]"} and by_name["student"] == {"topdn3"} and \
        by_name["teacher"] == {"topdn4"}, steps
    # Attempts 1 and 3 end COMPLETED (the stop requests reached no srun); attempt 2's ranks that found the server
    # dead exit 75 and srun ends the others (--kill-on-bad-exit).
    assert [s["state"] for s in steps if s["name"] == "trainer"].count("COMPLETED") == 2, steps
    log = batch_log.read_text()
    assert all(f"attempt {job_id}.{n}" in log for n in range(3)) and log.count("requeueing") == 2
    # Attempt 1: the three stop requests reached the trainer, each by its own path. SIGTERM reached every task, not
    # the batch step (srun would have turned it into SIGKILL of its tasks: "forcing job termination"), and the
    # servers held it through step 1. The cut time limit's new end was handed over (see the fixture) and
    # launch/deadline.py said stop at step 1's end (less time left than a step, a save and launch.stop_margin_s);
    # the job requeued itself before that end. Slurm's own notice (--signal=B:USR1@120) may have come too.
    trainer_log = (out / "logs" / "trainer.log").read_text()
    trainer_1, trainer_2 = trainer_log.split(f"code: {REPO}")[1:3]  # rank 0 says it first thing in each attempt
    got_term = {line.split(":")[0].strip() for line in trainer_1.splitlines() if "SIGTERM received, stopping after" in line}
    assert got_term == {"0", "1", "2", "3"}, got_term  # srun --label: every rank, on both trainer nodes
    assert "/stop: the batch script asks for a stop" in trainer_1 and "[job] SIGUSR1" in log
    assert "forcing job termination" not in log.split(f"attempt {job_id}.1")[0]
    for role in ("student", "teacher"):
        assert "SIGTERM held: serving until the trainer has ended" in (out / "logs" / f"{role}.log").read_text(), role
    assert f"+ launch.stop_margin_s ({STOP_MARGIN_S} s): stopping with a checkpoint" in trainer_1, trainer_1
    assert seen["after_1"] == [1] and seen["temporary_1"] and seen["requeued_1"] < seen["end"], seen
    # Attempt 2: the student role reported its server's death; the trainer named it (role, node, log) and requeued
    # from the checkpoint of step 1 (attempt 2 trained no step; no metrics line was written).
    named = re.search(r"the student server topdn3-0 on node topdn3 died \(exited with code -9 while serving; log: "
                      r"(\S+)\)\. Stopping this attempt: the job requeues, its servers start fresh and are synced to "
                      r"the checkpoint of step 1 ", trainer_2)
    assert named and Path(named[1]).parent == out / "logs" / "sglang" and Path(named[1]).exists(), trainer_2
    assert "SGLang server topdn3-0 died: exited with code -9 while serving" in (out / "logs" / "student.log").read_text()
    assert {json.loads(line)["attempt"] for line in (out / "server_losses.jsonl").read_text().splitlines()} == \
        {f"{job_id}.1"}
    assert seen["after_2"] == [1], seen
    # Every attempt's roles ran the code copied when the job first started; the job removed it and its lock at the end.
    code = f"code: {REPO}/runs/code/job-{job_id}"
    for role in ("trainer", "student", "teacher"):
        assert (out / "logs" / f"{role}.log").read_text().count(code) == 3, role
    assert not (REPO / "runs" / "code" / f"job-{job_id}").exists() and not (out / ".job.lock").exists()
    # The trainer reached the servers at their addresses on topd0; weight sync from trainer rank 0 on topdn1.
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert [host_of(u) for u in saved["rollout"]["urls"]] == ["10.78.0.13"]
    assert [host_of(u) for u in saved["teacher"]["urls"]] == ["10.78.0.14"]
    assert saved["rollout"]["sync_method"] == "distributed" and saved["rollout"]["sync_master_address"] == "10.78.0.11"
    assert saved["parallel"]["tensor_parallel"] == 2 and saved["launch"]["trainer_nodes"] == 2
    # The twice-resumed run equals the uninterrupted one: steps, checkpoints (the stop's own step-1 checkpoint
    # removed), rollout files, metrics lines.
    assert [r["step"] for r in metrics(out)] == [1, 2, 3]
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*")) == \
        sorted(p.name for p in (ref_out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]
    assert sorted(p.name for p in (out / "rollouts").iterdir()) == sorted(p.name for p in (ref_out / "rollouts").iterdir())
    for step in (0, 1, 2):
        name = f"step_{step:08d}.jsonl"
        records = [json.loads(line) for line in (out / "rollouts" / name).read_text().splitlines()]
        assert len(records) == 4  # 2 prompts x 2 samples, none lost, none doubled
        if step:  # step 2's were attempt 3's first: its servers were synced to the resumed weights; step 3 after a sync
            assert {r["weight_version"] for r in records} == {str(step)}, name
        # Same prompts as the uninterrupted run: the data position resumed exactly, twice.
        ref_records = [json.loads(line) for line in (ref_out / "rollouts" / name).read_text().splitlines()]
        assert [r["prompt_ids"] for r in records] == [r["prompt_ids"] for r in ref_records], name
    # Same metrics lines (steps and fields). Values are not compared: near-future windows sampled by SGLang differ
    # between any two runs (step 1 already).
    assert [sorted(r) for r in reduced(metrics(out))] == [sorted(r) for r in reduced(metrics(ref_out))]
    nothing_left_on_any_node()


def test_student_server_that_never_becomes_healthy_fails_the_job_fast(cluster, assets, tmp_path):
    """A corrupt student shard: the student's SGLang exits while loading, never healthy. The job must end FAILED
    within 2 minutes of its submission (not after launch.endpoint_timeout_s = 900 s), the trainer's error naming the
    role, the node and the last lines of the server's log; nothing of the job stays on any node."""
    broken = tmp_path / "student_hf_broken"
    shutil.copytree(assets["student_hf"], broken)
    for shard in broken.glob("*.safetensors"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated: the header promises tensors the file lacks
    out = tmp_path / "run"
    t0 = time.monotonic()
    job_id, batch_log = submit(tmp_path, [*common_overrides(assets, out), f"rollout.model_path={broken}"])
    debug = lambda: slurm_debug(job_id, batch_log, out)  # noqa: E731
    try:
        wait_until(lambda: job_field(job_id, "JobState") in ENDED, 120, "the job to end", on_timeout=debug)
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    seconds = time.monotonic() - t0
    assert job_field(job_id, "JobState") == "FAILED" and seconds < 120, (seconds, debug())
    trainer = (out / "logs" / "trainer.log").read_text()
    assert "student server topdn3-0 on node topdn3 failed" in trainer, debug()
    sglang_logs = sorted((out / "logs" / "sglang").glob("sglang-topdn3-*.log"))
    assert sglang_logs and f"log: {sglang_logs[0]}" in trainer
    last = [line for line in sglang_logs[0].read_text().splitlines() if line.strip()][-1]
    assert "--- last lines of its log ---" in trainer and last[:200] in trainer
    assert not (out / "metrics.jsonl").exists()
    nothing_left_on_any_node()


def processes_on(node: str, marker: bytes) -> list[int]:
    """Pids in a node's network namespace whose command line holds `marker`."""
    pids = subprocess.run(["ip", "netns", "pids", f"topdsl-{node}"], capture_output=True, text=True).stdout.split()
    out = []
    for pid in pids:
        try:
            if marker in Path(f"/proc/{pid}/cmdline").read_bytes():
                out.append(int(pid))
        except OSError:
            continue
    return out


def trainer_ranks_on(node: str) -> list[int]:
    return processes_on(node, b"megatron_topd.launch.trainer")


def sglang_main_on(node: str) -> list[int]:
    """The SGLang server's main process on `node` (started through rollout/hold_sigterm.py; its scheduler and
    detokenizer are its children)."""
    return processes_on(node, b"hold_sigterm.py")


# Runs in a node's network namespace: POSTs {} to each path without a key, then GETs /model_info with the key read
# from stdin (never on a command line); prints {path: status} and the keyed status.
CALLS = """
import json, sys, urllib.error, urllib.request
url, paths, key = sys.argv[1], sys.argv[2:], sys.stdin.read().strip()
def status(request):
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
print(json.dumps({"without": {p: status(urllib.request.Request(url + p, data=b"{}", method="POST")) for p in paths},
                  "with": status(urllib.request.Request(url + "/model_info", headers={"Authorization": "Bearer " + key}))}))
"""


def calls_from(node: str, url: str, key: str) -> dict:
    """What a process on `node` (its network namespace) gets from the server at `url`, without and with `key`."""
    from megatron_topd.rollout.auth import GUARDED_ENDPOINTS

    proc = subprocess.run(["ip", "netns", "exec", f"topdsl-{node}", str(TRAINER_PYTHON), "-c", CALLS, url,
                           *GUARDED_ENDPOINTS], input=key, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_killed_trainer_rank_fails_the_job_and_leaves_nothing(cluster, assets, tmp_path):
    """SIGKILL to trainer rank 3 (on topdn2) once step 1 trains: the job ends FAILED and no process of it is left in
    any node's namespace (servers and the other ranks included) within 60 s.
    Before that, the job's API key: from another node's namespace (the teacher's, topdn4), the running student server
    refuses /generate and every weight-update endpoint without the key and answers with it, while the job's own
    calls went through (step 0's rollouts here; weight sync too in the requeue test's run); the key file is the job
    user's alone and in no log."""
    out = tmp_path / "run"
    # More steps than the job can run before the kill, whatever the machine's speed: with the config's 2 steps a fast
    # machine could end the job during the checks below, before any rank is killed.
    job_id, batch_log = submit(tmp_path, [*common_overrides(assets, out), "train.steps=1000"])
    debug = lambda: slurm_debug(job_id, batch_log, out)  # noqa: E731
    try:
        wait_until(lambda: (out / "rollouts" / "step_00000000.jsonl").exists(), 300, "step 1's rollouts",
                   on_timeout=debug)
        key_files = list((out / "endpoints").glob(f"api_key.{job_id}.0"))
        assert key_files and oct(key_files[0].stat().st_mode & 0o777) == "0o600", debug()
        key = key_files[0].read_text().strip()
        (student,) = [json.loads(p.read_text())["url"] for p in (out / "endpoints" / "student").glob("*.json")]
        seen = calls_from("topdn4", student, key)
        assert set(seen["without"].values()) == {401} and seen["with"] == 200, seen
        # SGLang's 0600 --config files hold it (beside its logs, removed when it stops); no log does.
        configs = list((out / "logs" / "sglang").glob(".*.key.yaml"))
        assert len(configs) == 2 and all(oct(p.stat().st_mode & 0o777) == "0o600" for p in configs)
        logs = [batch_log, *(p for p in (out / "logs").rglob("*") if p.is_file() and p not in configs)]
        assert not [p for p in logs if key in p.read_text(errors="replace")]
        # The batch script handed the trainer the allocation's end (--time=00:30:00) for launch/deadline.py.
        end = json.loads((out / "endpoints" / "job_end").read_text())
        assert end["attempt"] == f"{job_id}.0" and 0 < end["end"] - time.time() <= 1800, end
        victims = trainer_ranks_on("topdn2")
        assert len(victims) == 2, victims
        os.kill(max(victims), 9)
        t0 = time.monotonic()
        wait_until(lambda: job_field(job_id, "JobState") in ENDED, 60, "the job to end", on_timeout=debug)
        assert job_field(job_id, "JobState") == "FAILED", debug()
        nothing_left_on_any_node(timeout_s=max(1.0, 60 - (time.monotonic() - t0)))
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
    assert json.loads((out / "endpoints" / "trainer.exit").read_text())["code"] != 0


def test_failing_trainer_makes_the_experiment_fail(cluster, assets, tmp_path, reference):
    """A config error ends the experiment FAILED, not retried although retries remain (only the stop code is)."""
    out = tmp_path / "run"
    # train.steps=0 is rejected by the trainer's config check only (the server roles do not read it).
    proc = nemo_run(assets, out, tmp_path / "experiments", "train.steps=0", name="topdfail", retries=2)
    status = status_of(proc)
    assert status and all(v.endswith("FAILED") for v in status.values()), (status, tail(out / "logs/trainer.log"))
    assert not (out / "metrics.jsonl").exists()
    logs = list((tmp_path / "experiments").rglob("*.out"))  # the sbatch script's output among them
    assert any("[topd] not requeued" in p.read_text(errors="replace") for p in logs), [str(p) for p in logs]
    assert json.loads((out / "endpoints" / "trainer.exit").read_text())["attempt"].endswith(".0")  # one attempt
