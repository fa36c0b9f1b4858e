"""The trainer role's task: one per trainer rank (`srun --ntasks-per-node=<ranks>`; SLURM_PROCID is the rank).

    python -m megatron_topd.launch.trainer --config C [section.key=value ...]

In a role-split job it first waits for every server's URL under `<endpoints>/` (deadline: launch.endpoint_timeout_s)
and hands them to the run as `rollout.urls` / `teacher.urls`, with the weight-sync master address set to the first
trainer node's name (routable from the server nodes). Without server nodes, rank 0 launches the servers itself.
A stop request (SIGUSR1; SIGTERM, which Slurm sends to every task on preemption with GraceTime or
`scancel --signal=TERM`; the file `<endpoints>/stop`; or the time limit ahead: train/preemption.py,
launch/deadline.py) ends the run after the step in flight and a checkpoint: trainer.exit holds 75 (requeue me)
while the processes exit TOPD_STOP_EXIT_CODE (0 under slurm/job.sh, which reads the file; 75 under NeMo-Run).
A server that died mid-run (its role's report, launch/server_loss.py) ends the attempt with trainer.exit 75 too, the
ranks that saw it exiting 75 (non-zero: srun ends the ranks left waiting in a collective), bounded.
Rank 0 (any rank on failure) writes `<endpoints>/trainer.exit`, on which the server roles stop.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from pathlib import Path

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


def rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def handoff_overrides(data: dict, lc, root, logs, nodes: list[str]) -> list[str]:
    """Wait for the servers' URLs; return the overrides that point the run at them (empty without server nodes)."""
    from megatron_topd.launch import endpoints

    if not lc.role_split:
        return []
    urls = endpoints.wait_for(root, {"student": lc.num_student_servers, "teacher": lc.num_teacher_servers},
                              timeout_s=lc.endpoint_timeout_s,
                              logs={r: f"{logs}/{r}.log and {logs}/sglang/" for r in ("student", "teacher")})
    # The weight-sync master is trainer rank 0, on the first trainer node: its name, or its interface address.
    from megatron_topd.launch.config import published_address

    master = published_address(lc, nodes[0]) if endpoints.node_name() == nodes[0] else nodes[0]
    return [f"rollout.urls={json.dumps(urls['student'])}", f"teacher.urls={json.dumps(urls['teacher'])}",
            f"rollout.sync_master_address={master}"]


def main(argv: list[str] | None = None) -> int:
    # First: a stop request that comes while torch imports (seconds) or models load must not kill the task. SIGTERM
    # too: the servers hold it (launch/serve.py) until this trainer has checkpointed and ended. Held (blocked) before
    # anything imports torch, delivered to the handler once it is installed.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    from megatron_topd.train import preemption

    preemption.install(signals=STOP_SIGNALS)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from megatron_topd.launch import endpoints
    from megatron_topd.launch.config import launch_section, load_raw, network_env
    from megatron_topd.launch.nodes import step_nodes

    data = load_raw(args.config, args.overrides)
    lc = launch_section(data)
    os.environ.update(network_env(lc))  # before torch.distributed starts: gloo/NCCL on launch.network_interface
    out = (data.get("train") or {}).get("output_dir", "runs/topd")
    root, logs = lc.endpoints(out), lc.logs(out)
    # Stop requests: slurm/job.sh's USR1 trap writes <endpoints>/stop; the time limit is near (launch/deadline.py).
    from megatron_topd.launch import server_loss
    from megatron_topd.launch.deadline import Deadline

    deadline = Deadline(root, Path(out) / "checkpoints", margin_s=lc.stop_margin_s)

    def stop_check() -> bool:
        by_time = deadline()  # called every step, a stop file or not: it measures the steps
        by_file = endpoints.stop_requested(root)
        if by_file:
            print(f"[trainer {endpoints.node_name()}] {root}/stop: the batch script asks for a stop", flush=True)
        lost = server_loss.reported(root)  # a server died after this step's last call to it
        if lost:
            print(f"[trainer {endpoints.node_name()}] {server_loss.describe(lost)}: stopping after this step",
                  flush=True)
        return by_file or by_time or bool(lost)

    preemption.install(stop_check=stop_check)
    code, failed, serving = 1, 0, False
    try:
        endpoints.use_api_key(root)  # its clients and weight sync send the servers' key (servers it starts need it)
        from megatron_topd.launch.snapshot import code_dir

        snapshot = code_dir()  # the job's copy of the code, not the live checkout
        if snapshot and rank() == 0:
            print(f"[trainer {endpoints.node_name()}] code: {snapshot}", flush=True)
        from megatron_topd.config import load_config

        load_config(args.config, args.overrides)  # a bad config fails now, not after the servers came up
        nodes = step_nodes()
        os.environ.setdefault("MASTER_ADDR", nodes[0])
        os.environ.setdefault("MASTER_PORT", str(lc.ports(endpoints.job_id())[0]))
        extra = handoff_overrides(data, lc, root, logs, nodes)
        serving = lc.role_split  # from here on a failure may come from a server that died
        if rank() == 0 and extra:
            print(f"[trainer {endpoints.node_name()}] servers: {' '.join(extra)}", flush=True)

        from megatron_topd import parallel
        from megatron_topd.train.loop import train

        train(load_config(args.config, args.overrides + extra))
        parallel.destroy()
        code = preemption.REQUEUE_EXIT_CODE if preemption.stopped_early() else 0
        lost = server_loss.reported(root) if code == preemption.REQUEUE_EXIT_CODE else []
        if lost:  # stopped for a lost server: bounded
            code, message = server_loss.decide(out, lost, lc.max_server_requeues)
            print(f"[trainer {endpoints.node_name()}] {message}", flush=True)
        if code == 0 and rank() == 0:
            removed = preemption.prune_temporary(Path(out) / "checkpoints")
            if removed:
                print(f"[trainer] removed stop-request checkpoints now superseded: {removed}", flush=True)
    except BaseException:  # noqa: BLE001 - report, tell the servers, exit non-zero
        traceback.print_exc()
        code = failed = 1
        # A call to a dead server can fail before its role has said so: wait for the report, once servers served.
        lost = server_loss.reported(root, within_s=10 if serving else 0)
        if lost:  # this rank's call to it failed; every rank still waiting in a collective is ended by srun
            code, message = server_loss.decide(out, lost, lc.max_server_requeues)
            print(f"[trainer {endpoints.node_name()}] {message}", flush=True)
    finally:
        if code != 0 or rank() == 0:
            endpoints.write_exit(root, code)
    if failed:  # a non-zero exit (75 too): srun --kill-on-bad-exit ends the other ranks; trainer.exit says why
        # Now, without the interpreter's teardown: a collective this rank abandoned beside a dead server (the weight
        # sync's, rollout/weight_sync/admin.py) still blocks on its thread, and its group's destructor would abort the
        # process (exit 134, not this code) or wait for the group's timeout. The logs are flushed; the run's files
        # were closed as the error passed through the loop.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code == preemption.REQUEUE_EXIT_CODE:
        # The exit file says 75. The process exits TOPD_STOP_EXIT_CODE: 0 under slurm/job.sh (which reads the file;
        # srun --kill-on-bad-exit must not cut the other ranks' ends short), 75 under NeMo-Run (whose script acts on
        # the exit code of the first role to end; the checkpoint is complete by now).
        if rank() == 0:
            print("[trainer] stopped on request after a checkpoint: trainer.exit says 75 (requeue)", flush=True)
        return int(os.environ.get("TOPD_STOP_EXIT_CODE", "0"))
    return code


if __name__ == "__main__":
    sys.exit(main())
