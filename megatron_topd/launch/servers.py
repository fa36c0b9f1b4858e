"""Which SGLang servers a role runs on which node, with which command: one pure function for the role itself
(`serve.py`, on its node) and for the plan (`plan.py`, every node, printed before anything starts)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from megatron_topd.launch.config import LaunchConfig

ROLES = ("student", "teacher")
LOOPBACK = ("127.0.0.1", "localhost", "0.0.0.0", "::1")


@dataclass
class ServerSpec:
    role: str
    name: str  # unique within the role: <node>-<index>
    node: str
    publishes: bool  # only the first node of a multi-node server answers HTTP
    server: object  # megatron_topd.rollout.server.SGLangServer (not started)


def model_path(data: dict, role: str) -> str:
    """The HF folder a role's servers load; a clear error names the field to set when it is empty."""
    if role == "student":
        path = (data.get("rollout") or {}).get("model_path") or (data.get("train") or {}).get("student_hf_path")
        if not path:
            raise ValueError("the student servers have no model: set rollout.model_path (or train.student_hf_path) to "
                             "the student's HF folder")
        return path
    path = (data.get("teacher") or {}).get("hf_path")
    if not path:
        raise ValueError("the teacher servers have no model: set teacher.hf_path to the teacher's HF folder")
    return path


def role_nodes(lc: LaunchConfig, nodes: list[str]) -> dict[str, list[str]]:
    """Split the allocation's nodes by index: trainer nodes first, then student-server nodes, then teacher nodes."""
    if len(nodes) != lc.total_nodes:
        raise ValueError(f"the job has {len(nodes)} node(s) ({','.join(nodes)}) but the launch section asks for "
                         f"{lc.total_nodes} = launch.trainer_nodes {lc.trainer_nodes} + launch.student_nodes "
                         f"{lc.student_nodes} + launch.teacher_nodes {lc.teacher_nodes}: submit with "
                         f"--nodes={lc.total_nodes} or change the launch section")
    a, b = lc.trainer_nodes, lc.trainer_nodes + lc.student_nodes
    return {"trainer": nodes[:a], "student": nodes[a:b], "teacher": nodes[b:]}


def servers_on_node(data: dict, lc: LaunchConfig, role: str, nodes: list[str], node_index: int, *,
                    log_dir: str | Path, dist_init_port: int, port: int | None = None,
                    address: str | None = None) -> list[ServerSpec]:
    """The servers of `role` on `nodes[node_index]` (`nodes`: this role's nodes, in order). They bind
    `launch.server_bind` (default every interface) and are reached at `address` (default the node's name; the role
    on its node passes `launch.config.published_address`). They hold SIGTERM (rollout/hold_sigterm.py): Slurm's
    stop request to the job's processes must not take the trainer's servers away mid-step (launch/serve.py)."""
    from megatron_topd.launch.config import section
    from megatron_topd.rollout.config import RolloutConfig, student_server_flags
    from megatron_topd.rollout.server import SGLangServer

    if role not in ROLES:
        raise ValueError(f"role {role!r}: use one of {ROLES}")
    rollout = section(data, "rollout", RolloutConfig)
    node = nodes[node_index]
    per_node = lc.student_servers_per_node if role == "student" else 1
    span = 1 if role == "student" else lc.teacher_nodes_per_server
    group, node_rank = divmod(node_index, span)
    out = []
    for i in range(per_node):
        extra = list(rollout.extra_server_args)
        if role == "student":  # the probe's windows ahead of async rollouts (rollout.windows_first)
            extra = student_server_flags(rollout, bool((data.get("train") or {}).get("async_rollouts", False))) + extra
        if lc.gpus_per_node:
            extra += ["--base-gpu-id", str(i * rollout.tp_size)]
        if span > 1:
            extra += ["--nnodes", str(span), "--node-rank", str(node_rank),
                      "--dist-init-addr", f"{nodes[group * span]}:{dist_init_port}"]
        cfg = replace(rollout, extra_server_args=[])
        # teacher.context_length (a teacher whose tokenizer writes a row in more tokens needs more), else the rollouts'
        teacher_context = (data.get("teacher") or {}).get("context_length")
        context_length = teacher_context if role == "teacher" and teacher_context is not None else cfg.context_length
        server = SGLangServer(
            model_path(data, role), python=cfg.server_python, host=address or node, bind=lc.server_bind or None,
            port=port, device=cfg.device, dtype=cfg.dtype,
            tp_size=cfg.tp_size * span if span > 1 else cfg.tp_size, mem_fraction_static=cfg.mem_fraction_static,
            context_length=context_length, seed=cfg.server_seed, extra_args=extra,
            log_dir=Path(log_dir) / "sglang", startup_timeout_s=cfg.startup_timeout_s, hold_sigterm=True)
        out.append(ServerSpec(role, f"{node}-{i}", node, node_rank == 0, server))
    return out
