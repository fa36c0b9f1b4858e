#!/usr/bin/env python
"""Choose the cluster layout of a TOPD run, and refuse one that cannot fit (docs/planning.md).

    python tools/plan_layout.py --student Llama-3.1-70B --teacher Llama-3.1-405B --gpus-per-node 8 --gpu-mem 80 \
        --trainer-nodes 8 --seq 16384 --rollouts-per-step 256 [--config examples/topd_70b.yaml] [--json]

--student/--teacher: a known model (see --list), an HF folder, a config.json or a model_spec.yaml.
--config: judge that YAML's layout first (parallel.*, train.max_tokens_per_microbatch, ...); its sequence length,
rollouts per step, teacher placement, FP8 setting and step shape become the defaults, and so do the student and the
teacher (its `student:` / `teacher_spec:` sections, else the checkpoints' model_spec.yaml or the HF folders) and the
node counts (`launch.trainer_nodes`, `launch.gpus_per_node`) when not given. Exit status: 0 when the proposed layout
fits (and the given one, if any), 1 when the given layout does not fit, 2 when nothing fits.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_topd.models.spec import ModelSpec  # noqa: E402
from megatron_topd.plan import Layout, Problem, choose, known_models, load_spec  # noqa: E402
from megatron_topd.plan.fixtures import find_spec  # noqa: E402
from megatron_topd.plan.report import choice_dict, print_choice  # noqa: E402
from megatron_topd.plan.search import service_nodes  # noqa: E402
from megatron_topd.plan.step_time import TopdStep  # noqa: E402


def _config_defaults(path: str) -> dict:
    """The fields the planner reads from a run's YAML (read directly: other sections need not validate here)."""
    import yaml

    data = yaml.safe_load(Path(path).read_text()) or {}
    par, train = data.get("parallel", {}) or {}, data.get("train", {}) or {}
    rollout, teacher, precision = data.get("rollout", {}) or {}, data.get("teacher", {}) or {}, data.get("precision", {}) or {}
    return {
        "tp": par.get("tensor_parallel", 1), "pp": par.get("pipeline_parallel", 1),
        "cp": par.get("context_parallel", 1), "sp": bool(par.get("sequence_parallel", False)),
        "recompute": par.get("recompute", "none"), "first": par.get("first_stage_layers"),
        "last": par.get("last_stage_layers"),
        "seq": train.get("max_seq_length", 2048),
        "budget": train.get("max_tokens_per_microbatch", max(4096, train.get("max_seq_length", 2048))),
        "group": train.get("teacher_group_microbatches", 4),
        "rollouts": train.get("prompts_per_step", 8) * rollout.get("n_samples", 4),
        "placement": teacher.get("placement", "colocated"), "fp8": bool(precision.get("fp8")),
        "loss_chunk": train.get("loss_chunk_size", 1024),
        "step": _step_shape(data),
        "models": _models_from_config(data),
        "trainer_nodes": (data.get("launch", {}) or {}).get("trainer_nodes"),
        "gpus_per_node": (data.get("launch", {}) or {}).get("gpus_per_node"),
    }


def _models_from_config(data: dict) -> tuple[ModelSpec | None, ModelSpec | None, list[str]]:
    """(student, teacher, the paths looked at that do not exist): an inline spec section, else the checkpoint's
    model_spec.yaml or the HF folder's config.json (`plan.fixtures.find_spec`)."""
    from megatron_topd.config import from_dict

    train, teacher = data.get("train", {}) or {}, data.get("teacher", {}) or {}
    found, tried = [], []
    for section, paths in (("student", (train.get("student_checkpoint"), train.get("student_hf_path"))),
                           ("teacher_spec", (teacher.get("checkpoint"), teacher.get("hf_path")))):
        spec, missing = find_spec(from_dict(ModelSpec, data[section], section) if data.get(section) else None, paths)
        found.append(spec)
        tried += missing
    return found[0], found[1], tried


def _step_shape(data: dict) -> TopdStep:
    """The step's shape for the per-phase time estimate: mean response half of rollout.max_new_tokens."""
    train, rollout = data.get("train", {}) or {}, data.get("rollout", {}) or {}
    topd, launch = data.get("topd", {}) or {}, data.get("launch", {}) or {}
    defaults = TopdStep()
    return TopdStep(rows=train.get("prompts_per_step", 8) * rollout.get("n_samples", 4),
                    response_tokens=max(1, rollout.get("max_new_tokens", 2 * defaults.response_tokens) // 2),
                    candidates_per_row=topd.get("top_k", defaults.candidates_per_row),
                    window=topd.get("window", defaults.window),
                    divergent_share=1.0 - topd.get("low_fraction", 1.0 - defaults.divergent_share),
                    student_servers=rollout.get("num_servers", defaults.student_servers),
                    teacher_servers=launch.get("teacher_nodes", defaults.teacher_servers) or 1,
                    save_interval=train.get("save_interval", defaults.save_interval),
                    sync_bucket_mb=rollout.get("sync_bucket_mb", defaults.sync_bucket_mb),
                    variant=topd.get("variant", defaults.variant))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--student", help="known model name, HF folder, config.json or model_spec.yaml")
    ap.add_argument("--teacher", help="as --student; omit for no teacher on the trainer")
    ap.add_argument("--config", help="a run's YAML: judge its layout, take its sequence length etc. as defaults")
    ap.add_argument("--gpus-per-node", type=int, help="default: the config's launch.gpus_per_node, else 8")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="GB per GPU (H100: 80)")
    ap.add_argument("--nodes", type=int, help="all nodes (trainer + rollout + teacher servers)")
    ap.add_argument("--trainer-nodes", type=int, help="trainer nodes only (servers get nodes of their own)")
    ap.add_argument("--seq", type=int, help="max sequence length (prompt + response); default 16384")
    ap.add_argument("--rollouts-per-step", type=int, help="rollouts per optimizer step; default 256")
    ap.add_argument("--placement", choices=["colocated", "remote"], help="teacher placement; default: try both")
    ap.add_argument("--fp8", action="store_true", help="FP8 GEMMs (Transformer Engine)")
    ap.add_argument("--margin", type=float, default=0.10, help="fraction of GPU memory kept free")
    ap.add_argument("--json", action="store_true", help="one JSON document on stdout")
    ap.add_argument("--list", action="store_true", help="list the known models and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(known_models()))
        return 0
    cfg = _config_defaults(args.config) if args.config else {}
    student, teacher, tried = cfg.get("models", (None, None, []))
    student = load_spec(args.student) if args.student else student
    teacher = load_spec(args.teacher) if args.teacher else teacher
    if student is None:
        ap.error("--student is required" + (f" ({args.config} names no student spec, and none of {tried} exists)"
                                            if args.config else ""))
    args.gpus_per_node = args.gpus_per_node or cfg.get("gpus_per_node") or 8
    if not args.nodes and not args.trainer_nodes:
        args.trainer_nodes = cfg.get("trainer_nodes")
    problem = Problem(
        student=student, teacher=teacher,
        gpus_per_node=args.gpus_per_node, gpu_mem_gb=args.gpu_mem, nodes=args.nodes,
        seq=args.seq or cfg.get("seq", 16384), rollouts_per_step=args.rollouts_per_step or cfg.get("rollouts", 256),
        placement=args.placement, fp8=args.fp8 or cfg.get("fp8", False), margin=args.margin,
        loss_chunk=cfg.get("loss_chunk", 2048), step=cfg.get("step", TopdStep()),
    )
    given = None
    if args.trainer_nodes:
        problem.nodes = args.trainer_nodes + sum(service_nodes(problem).values())
    if args.config:
        trainer_gpus = (args.trainer_nodes or 0) * args.gpus_per_node
        if not trainer_gpus:
            trainer_gpus = ((args.nodes or 0) - sum(service_nodes(problem).values())) * args.gpus_per_node
        model_parallel = cfg["tp"] * cfg["pp"] * cfg["cp"]
        if trainer_gpus <= 0 or trainer_gpus % model_parallel:
            ap.error(f"--config needs --trainer-nodes (or --nodes) giving a GPU count divisible by TPxPPxCP="
                     f"{model_parallel}")
        layout = Layout(cfg["tp"], cfg["pp"], cfg["cp"], trainer_gpus // model_parallel, cfg["sp"], cfg["recompute"],
                        cfg["first"], cfg["last"], cfg["budget"], cfg["group"], args.placement or cfg["placement"])
        given = problem.predict(layout)
    choice = choose(problem)
    if args.json:
        print(json.dumps(choice_dict(problem, choice, given), indent=2))
    else:
        print_choice(problem, choice, given, given_title=args.config or "")
    if choice.best is None:
        return 2
    return 1 if given is not None and not given.fits else 0


if __name__ == "__main__":
    sys.exit(main())
