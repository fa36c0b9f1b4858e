"""NeMo-Run recipes: the same roles as `slurm/job.sh`, as a `run.Experiment` (nemo-run 0.11.1 + leptonai 0.27.3).

    python -m megatron_topd.launch.nemo_run --config examples/topd_70b.yaml --account A --partition P \
        --trainer-image IMG --sglang-image IMG [--dryrun] [section.key=value ...]
    python -m megatron_topd.launch.nemo_run --executor local --config examples/cpu_demo.yaml   # the CPU demo

Slurm: a heterogeneous job, one het group per role (student servers, teacher servers, trainer), each with its own
executor (nodes, tasks per node, container image); node counts come from the config's `launch:` section. The sbatch
scripts split one allocation by node index instead; NeMo-Run 0.11.1 places several tasks of one non-heterogeneous
executor with no node list (each srun would ask for the whole allocation), so here het groups do the placing.
The tasks are the sbatch scripts' own: `megatron_topd.launch.serve` and `megatron_topd.launch.trainer`, meeting
through `<run_dir>/endpoints/`. NeMo-Run reports the exit code of the first task to end: a server ends only after
the trainer's exit file appears and then exits with the trainer's code, so the experiment's status is the trainer's.

Preemption: `--signal=USR1@<signal_lead_s>` goes to the tasks (NeMo-Run's batch script has no trap for it), each
task `exec`s its role so the signal reaches Python, not a wrapping shell; the trainer stops after its step with a
checkpoint and every trainer rank exits 75 (TOPD_STOP_EXIT_CODE), the servers with it. NeMo-Run's script requeues
on any non-zero exit while retries remain: a guard (setup lines) lets `scontrol requeue` through only when this
attempt's trainer.exit says 75, so a config error or a crash ends FAILED at once instead of being retried.

The packager ships the code: by default the working tree's megatron_topd/, examples/, slurm/ and tools/
(`PatternPackager`; every task runs in the unpacked copy), or `--packager git` (`GitArchivePackager`: HEAD only).
Only this module's `main` and `build` need nemo_run; nothing here imports torch (a login node's small env is enough).
"""
from __future__ import annotations

import argparse
import os
import shlex
from pathlib import Path

from megatron_topd.launch.config import launch_section, load_raw

REPO = Path(__file__).resolve().parents[2]
SHIPPED = ("megatron_topd", "examples", "slurm", "tools")
STOP_EXIT_CODE = 75  # megatron_topd.train.preemption.REQUEUE_EXIT_CODE (that module needs torch)


def role_commands(config: str, overrides: list[str], *, trainer_python: str, server_python: str) -> dict[str, str]:
    """The shell command of each role's task (run in the shipped code folder)."""
    rest = " ".join(shlex.quote(o) for o in overrides)
    cfg = shlex.quote(config)
    return {  # exec: the role is the task, so a signal to the step reaches Python, not a shell that dies of it
        "student": f"exec {server_python} -m megatron_topd.launch.serve --role student --config {cfg} {rest}".strip(),
        "teacher": f"exec {server_python} -m megatron_topd.launch.serve --role teacher --config {cfg} {rest}".strip(),
        "trainer": f"exec {trainer_python} -m megatron_topd.launch.trainer --config {cfg} {rest}".strip(),
    }


def requeue_guard(endpoints_dir: str | Path) -> str:
    """Setup lines for NeMo-Run's sbatch script: its `scontrol requeue` (on any non-zero exit while retries remain)
    goes through only when this attempt's `<endpoints>/trainer.exit` holds the stop code."""
    exit_file = shlex.quote(str(Path(endpoints_dir) / "trainer.exit"))
    stopped = f'"\\"code\\": {STOP_EXIT_CODE}, \\"attempt\\": \\"$SLURM_JOB_ID.${{SLURM_RESTART_COUNT:-0}}\\""'
    return "\n".join([
        "scontrol() {  # megatron_topd: requeue only a run that stopped on request with a checkpoint",
        f"  if [[ $1 == requeue ]] && ! grep -qF {stopped} {exit_file} 2>/dev/null; then",
        f'    echo "[topd] not requeued: the trainer did not stop on request (see {exit_file})"; return 0',
        "  fi",
        '  command scontrol "$@"',
        "}",
    ])


def packager(kind: str = "pattern"):
    import nemo_run as run

    if kind == "git":
        return run.GitArchivePackager()
    return run.PatternPackager(include_pattern=[str(REPO / d) for d in SHIPPED], relative_path=[str(REPO)] * len(SHIPPED))


def build(config: str, overrides: list[str] | None = None, *, account: str, partition: str = "", job_dir: str,
          time: str = "48:00:00", trainer_image: str | None = None, sglang_image: str | None = None,
          mounts: list[str] | None = None, trainer_python: str = "python3", server_python: str = "python3",
          env_vars: dict | None = None, packager_kind: str = "pattern", name: str = "topd", group_wait_s: int = 30,
          max_retries: int = 3, signal_lead_s: int = 900):
    """The experiment: (tasks, executors) of a heterogeneous Slurm job with the config's role split.

    `job_dir` is the LocalTunnel's job_dir and must be `$NEMORUN_HOME/experiments`: NeMo-Run writes the sbatch script,
    the shipped code and the logs under NEMORUN_HOME and LocalTunnel copies nothing (on a cluster: a shared folder).
    """
    import nemo_run as run

    overrides = list(overrides or [])
    data = load_raw(config if Path(config).is_absolute() else REPO / config, overrides)
    lc = launch_section(data)
    if not lc.role_split:
        raise ValueError("the NeMo-Run Slurm recipe needs server nodes: set launch.student_nodes and "
                         "launch.teacher_nodes (or use --executor local for a one-box run)")
    cmds = role_commands(config, overrides, trainer_python=trainer_python, server_python=server_python)
    env = {"PYTHONUNBUFFERED": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
           "PYTHONPATH": "/nemo_run/code", "TOPD_STOP_EXIT_CODE": str(STOP_EXIT_CODE), **(env_vars or {})}
    shared = dict(account=account, partition=partition or None, time=time, mem=None, exclusive=True,
                  env_vars=env, container_mounts=list(mounts or []), packager=packager(packager_kind),
                  tunnel=run.LocalTunnel(job_dir=job_dir), wait_time_for_group_job=group_wait_s,
                  monitor_group_job_wait_time=min(group_wait_s, 60))
    gpus = lc.gpus_per_node or None
    roles = (("student", lc.student_nodes, 1, sglang_image), ("teacher", lc.teacher_nodes, 1, sglang_image),
             ("trainer", lc.trainer_nodes, lc.tasks_per_node, trainer_image))
    executors, tasks = [], []
    for i, (role, nodes, ntasks, image) in enumerate(roles):
        ex = run.SlurmExecutor(nodes=nodes, ntasks_per_node=ntasks, gpus_per_node=gpus, container_image=image,
                               heterogeneous=(i == 0), **shared)
        if i == 0:  # sbatch options of the whole job live on the first group
            ex.additional_parameters = {"requeue": True, "open_mode": "append", "signal": f"USR1@{signal_lead_s}"}
            ex.setup_lines = requeue_guard(lc.endpoints((data.get("train") or {}).get("output_dir", "runs/topd")))
        executors.append(ex)
        tasks.append(run.Script(inline=cmds[role]))
    executors[0].retries = max_retries
    return tasks, executors


def experiment(config: str, overrides: list[str] | None = None, *, name: str = "topd", dryrun: bool = False,
               detach: bool = False, **kw) -> str:
    """Submit the experiment (or print its sbatch script with `dryrun`); return its id. Without `detach`, waits."""
    import nemo_run as run

    tasks, executors = build(config, overrides, name=name, **kw)
    with run.Experiment(name, executor=executors[0], log_level="WARN") as exp:
        exp.add(tasks, executor=executors, name=name)
        if dryrun:
            exp.dryrun()
        else:
            exp.run(detach=detach, tail_logs=False)
    return exp._id


def status(exp_id: str) -> dict[str, str]:
    """{task: NeMo-Run status name} of a submitted experiment (SUCCEEDED, FAILED, RUNNING, ...)."""
    import nemo_run as run

    states = run.Experiment.from_id(exp_id).status(return_dict=True) or {}
    return {k: str(v.get("status") if isinstance(v, dict) else v) for k, v in states.items()}


def local_demo(config: str, overrides: list[str] | None = None):
    """The CPU demo on this machine (rank 0 launches both servers): a run.Script on a LocalExecutor."""
    import nemo_run as run

    cmd = " ".join(["python", "-m", "megatron_topd.cli", "demo", "--config", shlex.quote(config),
                    *map(shlex.quote, overrides or [])])
    return run.Script(inline=cmd), run.LocalExecutor(env_vars={"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})


def main(argv: list[str] | None = None) -> int:
    import nemo_run as run

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--executor", choices=("slurm", "local"), default="slurm")
    p.add_argument("--account", default="")
    p.add_argument("--partition", default="")
    p.add_argument("--time", default="48:00:00")
    p.add_argument("--trainer-image", default=None, help="pyxis image, e.g. a build FROM nvcr.io#nvidia/pytorch:25.10-py3")
    p.add_argument("--sglang-image", default=None, help="pyxis image with sglang 0.5.23")
    p.add_argument("--trainer-python", default="python3")
    p.add_argument("--server-python", default="python3")
    p.add_argument("--mount", action="append", default=[])
    p.add_argument("--job-dir", default=os.path.join(os.path.expanduser(os.environ.get("NEMORUN_HOME", "~/.nemo_run")),
                                                     "experiments"),
                   help="LocalTunnel job_dir: must be $NEMORUN_HOME/experiments (NeMo-Run writes the sbatch script "
                        "there and sbatch reads it from there); on a shared filesystem")
    p.add_argument("--packager", choices=("pattern", "git"), default="pattern")
    p.add_argument("--name", default="topd")
    p.add_argument("--dryrun", action="store_true", help="print the sbatch script, submit nothing")
    p.add_argument("--detach", action="store_true", help="submit and return (default: wait and report the status)")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    if args.executor == "local":
        task, executor = local_demo(args.config, args.overrides)
        run.run(task, executor=executor, dryrun=args.dryrun, name=args.name)
        return 0
    if not args.account:
        p.error("--account is required for --executor slurm")
    exp_id = experiment(args.config, args.overrides, name=args.name, dryrun=args.dryrun, detach=args.detach,
                        account=args.account, partition=args.partition, job_dir=args.job_dir, time=args.time,
                        trainer_image=args.trainer_image, sglang_image=args.sglang_image, mounts=args.mount,
                        trainer_python=args.trainer_python, server_python=args.server_python,
                        packager_kind=args.packager)
    if args.dryrun or args.detach:
        print(f"experiment id: {exp_id}")
        return 0
    states = status(exp_id)
    print(f"experiment {exp_id}: {states}")
    return 0 if states and all(v.endswith("SUCCEEDED") for v in states.values()) else 1

if __name__ == "__main__":
    raise SystemExit(main())
