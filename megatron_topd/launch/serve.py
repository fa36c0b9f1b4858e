"""A server role's task: one per node of the student or teacher role (`srun --ntasks-per-node=1`).

    python -m megatron_topd.launch.serve --role student|teacher --config C [section.key=value ...]

Starts this node's SGLang server(s) bound to `launch.server_bind` (default every interface), waits for `/health`,
publishes each URL (the node's name, or its address on `launch.network_interface`: never 127.0.0.1) under
`<endpoints>/<role>/`, then serves until the trainer's exit file appears, and exits with the trainer's code (so
whichever role a launcher sees end first reports the trainer's result). A server that dies meanwhile is reported at
once, `<endpoints>/<role>/<name>.failed` with its log's last lines, on which the trainer ends the attempt and the job
requeues (launch/server_loss.py); the role still waits for the trainer's exit file and exits with its code.

SIGTERM is held, here and in SGLang (rollout/hold_sigterm.py): Slurm sends it to every process of the job's steps
when it asks the job to stop (preemption with GraceTime, `scancel --signal=TERM`), and the trainer's step in flight
needs its servers until it has checkpointed. The role stops its servers (SIGKILL) once the trainer's exit file says
the trainer is done; Slurm's SIGKILL (KillWait or GraceTime after the SIGTERM) ends whatever is left.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from megatron_topd.launch import endpoints
from megatron_topd.launch.config import launch_section, load_raw, network_env, published_address
from megatron_topd.launch.nodes import step_nodes
from megatron_topd.launch.servers import servers_on_node
from megatron_topd.launch.snapshot import code_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--role", required=True, choices=("student", "teacher"))
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # held until the trainer is done (docstring)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)  # the trainer's stop request; a server just keeps serving
    data = load_raw(args.config, args.overrides)
    lc = launch_section(data)
    out = (data.get("train") or {}).get("output_dir", "runs/topd")
    root, logs = lc.endpoints(out), lc.logs(out)
    nodes = step_nodes()
    index = int(os.environ.get("SLURM_NODEID", "0"))
    _, dist_port = lc.ports(endpoints.job_id())
    os.environ.update(network_env(lc))  # the servers' weight-sync group (gloo/NCCL) on launch.network_interface
    endpoints.use_api_key(root)  # every server requires the attempt's key (rollout/auth.py)
    code = code_dir()  # the job's copy of the code, not the live checkout
    if code:
        print(f"[{args.role} {endpoints.node_name()}] code: {code}", flush=True)
    specs = servers_on_node(data, lc, args.role, nodes, index, log_dir=logs, dist_init_port=dist_port,
                            address=published_address(lc, nodes[index]))
    print(f"[{args.role} {endpoints.node_name()}] starting {len(specs)} server(s): "
          + "; ".join(" ".join(s.server.command()) for s in specs), flush=True)
    term_seen, dead = False, set()
    try:
        for s in specs:
            s.server.start()
        for s in specs:
            if s.publishes:
                try:
                    s.server.wait_healthy()
                except Exception as e:  # exited, or not healthy in time: tell the trainer now, then fail
                    endpoints.publish_failure(root, args.role, s.name, node=s.node, log=str(s.server.log_path),
                                              tail=s.server.log_tail(), error=str(e).split("\n", 1)[0])
                    print(f"[{args.role} {s.node}] SGLang server {s.name} failed to start: {e}", file=sys.stderr,
                          flush=True)
                    return 1
                endpoints.publish(root, args.role, s.name, s.server.url, log=str(s.server.log_path))
                print(f"[{args.role} {s.node}] {s.server.url} healthy, published", flush=True)
        while True:
            code = endpoints.read_exit(root)
            if code is not None:
                print(f"[{args.role} {endpoints.node_name()}] trainer exited with {code}: stopping", flush=True)
                return code
            if not term_seen and signal.SIGTERM in signal.sigpending():
                term_seen = True
                print(f"[{args.role} {endpoints.node_name()}] SIGTERM held: serving until the trainer has ended",
                      flush=True)
            for s in specs:
                if s.name not in dead and not s.server.is_running():
                    dead.add(s.name)
                    error = f"exited with code {s.server.proc.returncode} while serving"
                    endpoints.publish_failure(root, args.role, s.name, node=s.node, log=str(s.server.log_path),
                                              tail=s.server.log_tail(), error=error, serving=True)
                    print(f"[{args.role} {s.node}] SGLang server {s.name} died: {error} (log {s.server.log_path}); "
                          f"reported to the trainer. Last lines of its log:\n{s.server.log_tail()}", file=sys.stderr,
                          flush=True)
            time.sleep(1.0)  # polling interval of the role's watch (the exit file, its servers)
    finally:
        for s in specs:
            s.server.stop()  # SIGKILL: SGLang holds SIGTERM


if __name__ == "__main__":
    sys.exit(main())
