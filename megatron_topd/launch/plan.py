"""The job's plan, before anything starts: validate the whole config, split the allocation's nodes into roles.

    python -m megatron_topd.launch.plan --config C [--nodelist 'n[1-3]'] [--servers] [section.key=value ...]

Prints shell assignments for the batch script (`eval "$(... plan ...)"`): RUN_DIR ENDPOINTS LOGS, TRAINER_NODES
STUDENT_NODES TEACHER_NODES (comma lists), N_TRAINER N_STUDENT N_TEACHER, TASKS_PER_NODE, MASTER_ADDR MASTER_PORT.
`--servers` prints instead one JSON line per SGLang server (role, node, host, command) and one for the trainer:
what each node will run, checkable without a cluster (tests/slurm/test_static.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys


def check_role_split(cfg) -> None:
    """Fields a role-split job needs that a one-box run does not; each error names the field."""
    lc, ro = cfg.launch, cfg.rollout
    world = lc.trainer_nodes * lc.tasks_per_node
    model_parallel = cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel
    if world % model_parallel:
        raise ValueError(f"launch.trainer_nodes x launch.tasks_per_node = {world} trainer ranks do not divide into "
                         f"parallel.tensor_parallel x pipeline_parallel = {model_parallel}")
    if not lc.role_split:
        return
    for name, value in (("train.student_hf_path (or rollout.model_path)", ro.model_path or cfg.train.student_hf_path),
                        ("teacher.hf_path", cfg.teacher.hf_path), ("train.prompts_path", cfg.train.prompts_path),
                        ("train.student_checkpoint", cfg.train.student_checkpoint)):
        if not value:
            raise ValueError(f"{name} is empty: the role-split job needs it (servers load it on their own nodes)")
    if cfg.teacher.placement == "colocated" and not cfg.teacher.checkpoint:
        raise ValueError("teacher.checkpoint is empty: the co-located teacher loads it in the trainer")
    if ro.urls or cfg.teacher.urls:
        raise ValueError("rollout.urls / teacher.urls are set while launch.student_nodes > 0: in a role-split job the "
                         "URLs come from the servers' endpoint files; clear them, or set the launch node counts to 0")
    if ro.sync_method == "tensor":
        raise ValueError("rollout.sync_method=tensor needs the servers on the trainer's host; with server nodes use "
                         "distributed (or disk on a shared filesystem)")
    if ro.num_servers != lc.num_student_servers:
        raise ValueError(f"rollout.num_servers={ro.num_servers} but launch.student_nodes x student_servers_per_node = "
                         f"{lc.num_student_servers}: make them equal")
    if lc.gpus_per_node and lc.student_servers_per_node * ro.tp_size > lc.gpus_per_node:
        raise ValueError(f"launch.student_servers_per_node={lc.student_servers_per_node} x rollout.tp_size="
                         f"{ro.tp_size} exceeds launch.gpus_per_node={lc.gpus_per_node}")
    if lc.gpus_per_node and lc.tasks_per_node > lc.gpus_per_node:
        raise ValueError(f"launch.tasks_per_node={lc.tasks_per_node} > launch.gpus_per_node={lc.gpus_per_node}: "
                         "one trainer rank per GPU")


def check_memory(cfg) -> str:
    """The planner's verdict on the trainer's layout, before any node starts: raises when it says the layout does
    not fit (naming the stage and its largest terms) unless launch.force; returns what was judged, or why nothing
    was (a CPU job; model specs not readable from the config or the checkpoints)."""
    from megatron_topd.plan import predict_memory
    from megatron_topd.plan.fixtures import find_spec

    lc = cfg.launch
    if not lc.gpus_per_node:
        return "memory not judged: launch.gpus_per_node=0 (a CPU job)"
    student, _ = find_spec(cfg.student, (cfg.train.student_checkpoint, cfg.train.student_hf_path))
    colocated = cfg.teacher.placement == "colocated"
    teacher = find_spec(cfg.teacher_spec, (cfg.teacher.checkpoint, cfg.teacher.hf_path))[0] if colocated else None
    if student is None or (colocated and teacher is None):
        return ("memory not judged: no model spec (student:/teacher_spec: in the config, or the checkpoints' "
                "model_spec.yaml) is readable here")
    world = lc.trainer_nodes * lc.tasks_per_node
    plan = predict_memory(cfg, student, teacher, gpu_mem_gb=lc.gpu_mem_gb, profile="te_flash",
                          data_parallel=world // (cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel))
    verdict = (f"planner: {plan.layout.short()} peaks at {plan.peak_bytes / 1e9:.1f} GB of {lc.gpu_mem_gb:.0f} GB "
               "per GPU")
    if not plan.fits:
        if not lc.force:
            raise ValueError(f"the memory planner says this layout does not fit: {plan.why_not()}. Change the "
                             "layout (python tools/plan_layout.py --config ... proposes one that fits) or set "
                             "launch.force=true to launch anyway")
        verdict += f" (does NOT fit: {plan.why_not()}; launched anyway, launch.force=true)"
    return verdict


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--nodelist", default=os.environ.get("SLURM_JOB_NODELIST", ""))
    p.add_argument("--job-id", default=os.environ.get("SLURM_JOB_ID", "0"))
    p.add_argument("--servers", action="store_true")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)

    from megatron_topd.config import load_config, to_dict
    from megatron_topd.launch.nodes import expand
    from megatron_topd.launch.servers import LOOPBACK, role_nodes, servers_on_node

    cfg = load_config(args.config, args.overrides)
    check_role_split(cfg)
    print(check_memory(cfg), file=sys.stderr)
    lc = cfg.launch
    split = role_nodes(lc, expand(args.nodelist))
    out = cfg.train.output_dir
    master_port, dist_port = lc.ports(args.job_id)
    if args.servers:
        data = to_dict(cfg)
        for role in ("student", "teacher"):
            for i in range(len(split[role])):
                for s in servers_on_node(data, lc, role, split[role], i, log_dir=lc.logs(out), dist_init_port=dist_port,
                                         port=30000 + i):
                    print(json.dumps({"role": role, "name": s.name, "node": s.node, "host": s.server.host,
                                      "publishes": s.publishes, "command": s.server.command()}))
        sync = split["trainer"][0] if lc.role_split else cfg.rollout.sync_master_address
        print(json.dumps({"role": "trainer", "nodes": split["trainer"], "ranks": lc.trainer_nodes * lc.tasks_per_node,
                          "master_addr": split["trainer"][0], "sync_master_address": sync,
                          "loopback_servers": not lc.role_split and cfg.rollout.host in LOOPBACK}))
        return 0
    values = {
        "RUN_DIR": out, "ENDPOINTS": str(lc.endpoints(out)), "LOGS": str(lc.logs(out)),
        "TRAINER_NODES": ",".join(split["trainer"]), "STUDENT_NODES": ",".join(split["student"]),
        "TEACHER_NODES": ",".join(split["teacher"]), "N_TRAINER": lc.trainer_nodes, "N_STUDENT": lc.student_nodes,
        "N_TEACHER": lc.teacher_nodes, "TASKS_PER_NODE": lc.tasks_per_node, "GPUS_PER_NODE": lc.gpus_per_node,
        "MASTER_ADDR": split["trainer"][0], "MASTER_PORT": master_port,
    }
    for k, v in values.items():
        print(f"{k}={shlex.quote(str(v))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
