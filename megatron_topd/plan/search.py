"""Enumerate layouts of a TOPD run on a cluster, keep those that can be built and fit, pick the fastest.

Node split first: the student's SGLang rollout servers need enough nodes to hold every rollout's KV cache at once,
the teacher's SGLang servers (near-future windows; remote scoring) enough for their share; the trainer gets the
rest (or, without --nodes, the fewest nodes on which some layout fits). Then over the trainer's GPUs: TP (within a
node), PP (even, or a lighter first/last stage), SP, recompute, the microbatch token budget, the teacher group G
and the teacher's placement. Among layouts that fit with the margin: a co-located teacher first (exact full-vocab
KL), then the lowest `speed.step_seconds` (which charges each schedule's pipeline bubble, so a larger G wins where
it fits), then the most headroom.

Only layouts the trainer accepts are searched (tests/unit/test_plan_search.py runs every one through the config's
validation): no context parallelism, since the distillation loss does not slice its per-token inputs by CP rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan.layout import Layout
from megatron_topd.plan.predict import Plan, predict_layout
from megatron_topd.plan.rollout import nodes_for
from megatron_topd.plan.speed import pipeline_bubble, step_seconds
from megatron_topd.plan.step_time import StepTime, TopdStep, step_time


# Co-located teacher group sizes tried: each group is its own pipeline schedule, efficient at G / (G + PP - 1), so
# PP=4 needs G >= 17 for 85% (docs/training_step.md); the memory model charges G microbatches of teacher logits.
TEACHER_GROUPS = (1, 2, 4, 8, 16, 24, 32)
TARGET_PIPELINE_EFFICIENCY = 0.85


def efficient_group(pp: int, target: float = TARGET_PIPELINE_EFFICIENCY) -> int:
    """The smallest G with G / (G + PP - 1) >= target (PP=4: 17)."""
    return max(1, math.ceil(target / (1 - target) * (pp - 1) - 1e-9))


def pipeline_efficiency(plan: Plan) -> float:
    """Share of a schedule's time without bubble: M / (M + PP - 1), M = microbatches per schedule (a co-located
    teacher's group of G, else the step's microbatches): the inverse of `speed.pipeline_bubble`."""
    colocated = plan.layout.placement == "colocated"
    return 1.0 / pipeline_bubble(plan.layout, plan.microbatches_per_step, colocated)


@dataclass
class Problem:
    student: ModelSpec
    teacher: ModelSpec | None
    gpus_per_node: int = 8
    gpu_mem_gb: float = 80.0
    nodes: int | None = None
    seq: int = 16384
    rollouts_per_step: int = 256
    placement: str | None = None  # None: try both
    fp8: bool = False
    margin: float = 0.10
    loss_chunk: int | None = 2048
    rollout_concurrency: float = 1.0
    teacher_concurrency: float = 0.25
    step: TopdStep = field(default_factory=TopdStep)  # the step's shape, for the per-phase time estimate

    def predict(self, layout: Layout) -> Plan:
        return predict_layout(self.student, self.teacher, layout, seq=self.seq, rows_per_step=self.rollouts_per_step,
                              gpu_mem_gb=self.gpu_mem_gb, fp8=self.fp8, loss_chunk=self.loss_chunk,
                              margin=self.margin)

    def seconds(self, plan: Plan) -> float:
        return step_seconds(self.student, self.teacher, plan.layout, seq=self.seq,
                            tokens_per_step=self.rollouts_per_step * self.seq,
                            microbatches_per_step=plan.microbatches_per_step, fp8=self.fp8)


    def phases(self, plan: Plan) -> StepTime:
        """Seconds per phase of a whole TOPD step on this layout (plan/step_time.py)."""
        return step_time(self.student, self.teacher, plan.layout, self.step, seq=self.seq,
                         microbatches_per_step=plan.microbatches_per_step, gpus_per_node=self.gpus_per_node,
                         fp8=self.fp8)


@dataclass
class Choice:
    nodes: dict[str, int]
    best: Plan | None
    alternatives: list[Plan] = field(default_factory=list)
    considered: int = 0
    fitting: int = 0
    note: str = ""


def service_nodes(p: Problem) -> dict[str, int]:
    tokens = p.rollouts_per_step * p.seq
    out = {"rollout": nodes_for(p.student, tokens * p.rollout_concurrency, gpus_per_node=p.gpus_per_node,
                                gpu_mem_gb=p.gpu_mem_gb)}
    out["teacher"] = nodes_for(p.teacher, tokens * p.teacher_concurrency, gpus_per_node=p.gpus_per_node,
                               gpu_mem_gb=p.gpu_mem_gb) if p.teacher is not None else 0
    return out


def _stage_splits(layers: int, pp: int) -> list[tuple[int | None, int | None]]:
    out: list[tuple[int | None, int | None]] = [(None, None)] if layers % pp == 0 else []
    if pp == 1:
        return out
    base = layers // pp
    for light in range(max(1, base - 4), base + 1):
        if (layers - light) % (pp - 1) == 0 and (layers - light) // (pp - 1) > light:
            out += [(None, light), (light, None)]
    return out


def layouts(p: Problem, gpus: int):
    placements = [p.placement] if p.placement else (["colocated", "remote"] if p.teacher is not None else ["remote"])
    for tp in (t for t in (1, 2, 4, 8) if t <= p.gpus_per_node):
        for cp in (1,):  # CP > 1: refused by the trainer (config.py), so never proposed
            for pp in range(1, 33):
                if gpus % (tp * cp * pp):
                    continue
                dp = gpus // (tp * cp * pp)
                for first, last in _stage_splits(p.student.num_layers, pp):
                    for sp in ((False, True) if tp > 1 else (False,)):
                        for recompute in ("none", "full"):  # selective = none with flash attention
                            for budget in (p.seq, 2 * p.seq):
                                for g in sorted({*TEACHER_GROUPS, efficient_group(pp)}):
                                    for placement in placements:
                                        if placement == "remote" and g != 1:
                                            continue  # G only matters for a co-located teacher
                                        yield Layout(tp, pp, cp, dp, sp, recompute, first, last, budget, g, placement)


def _rank(p: Problem, plan: Plan) -> tuple:
    """Co-located teacher first, then >= 85% pipeline efficiency where it fits, then speed, then headroom."""
    return (plan.layout.placement != "colocated", pipeline_efficiency(plan) < TARGET_PIPELINE_EFFICIENCY - 1e-9,
            p.seconds(plan), -plan.headroom_bytes)


def choose_on(p: Problem, trainer_nodes: int) -> tuple[list[Plan], int]:
    plans = [p.predict(layout) for layout in layouts(p, trainer_nodes * p.gpus_per_node)]
    fitting = sorted((x for x in plans if x.fits), key=lambda x: _rank(p, x))
    return fitting, len(plans)


def choose(p: Problem, max_trainer_nodes: int = 64) -> Choice:
    nodes = service_nodes(p)
    if p.nodes is not None:
        trainer = p.nodes - nodes["rollout"] - nodes["teacher"]
        if trainer < 1:
            return Choice({**nodes, "trainer": 0}, None,
                          note=f"{p.nodes} nodes leave none for the trainer: the rollout servers need "
                               f"{nodes['rollout']} and the teacher's {nodes['teacher']}")
        candidates = [trainer]
    else:
        candidates = [n for n in range(1, max_trainer_nodes + 1) if n & (n - 1) == 0 or n % 2 == 0]
    considered = 0
    for trainer in candidates:
        fitting, n = choose_on(p, trainer)
        considered += n
        if fitting:
            return Choice({"trainer": trainer, **nodes}, fitting[0], fitting[1:6], considered, len(fitting))
    return Choice({"trainer": candidates[-1], **nodes}, None, considered=considered,
                  note="no layout fits on the trainer nodes: add nodes, shorten sequences, or place the teacher "
                       "remotely")


def total_nodes(choice: Choice) -> int:
    return sum(choice.nodes.values())


def rollout_bytes(p: Problem) -> float:
    from megatron_topd.plan.rollout import kv_bytes_per_token

    return p.rollouts_per_step * p.seq * kv_bytes_per_token(p.student)


