"""A relative step-time estimate to rank layouts that fit (lower is faster); not a prediction of wall time.

FLOPs per step (Kaplan et al. 2020 / Narayanan et al. 2021): student 6 N_active T (+ 2 N T more with full recompute,
a second forward), causal attention 6 x layers x q x S per token (fwd+bwd, half the S x S square); a co-located
teacher 2 N_teacher T forward (+ attention). Divided by the trainer's GPUs x peak x a model-FLOPs utilisation that
loses a little per TP doubling (all-reduces on the critical path), per CP doubling (ring attention), and the
pipeline bubble (PP-1)/M of every schedule (Narayanan et al.): a co-located teacher's group of G microbatches is its
own schedule, so small G pays the bubble more often.
"""
from __future__ import annotations

import math

from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan.layout import Layout
from megatron_topd.plan.model_state import active_params

PEAK_FLOPS = {"bf16": 989e12, "fp8": 1979e12}  # H100 SXM dense
BASE_MFU = 0.45


def _attention_flops_per_token(spec: ModelSpec, seq: int) -> float:
    return 2 * spec.num_layers * spec.num_attention_heads * spec.kv_channels * seq  # fwd, causal half of 4 L q S


def forward_flops_per_token(spec: ModelSpec, seq: int) -> float:
    """One forward: 2 N_active + causal attention at sequence length ``seq``."""
    return 2 * active_params(spec) + _attention_flops_per_token(spec, seq)


def trainer_mfu(layout: Layout) -> float:
    """Model-FLOPs utilisation: BASE_MFU, a little less per TP and CP doubling and with SP."""
    return BASE_MFU * (0.97 ** math.log2(layout.tp)) * (0.95 ** math.log2(layout.cp)) * (0.98 if layout.sp else 1.0)


def pipeline_bubble(layout: Layout, microbatches_per_step: int, colocated_teacher: bool) -> float:
    """Time with the bubble over time without: 1 + (PP - 1) / M, M microbatches per schedule (a co-located teacher's
    group of G is a schedule of its own)."""
    per_schedule = min(microbatches_per_step, layout.teacher_group_microbatches) if colocated_teacher \
        else microbatches_per_step
    return 1 + (layout.pp - 1) / max(1, per_schedule)


def step_seconds(student: ModelSpec, teacher: ModelSpec | None, layout: Layout, *, seq: int, tokens_per_step: float,
                 microbatches_per_step: int, fp8: bool = False) -> float:
    """The training pass alone (relative: it ranks layouts; plan/step_time.py estimates the whole step)."""
    colocated = teacher is not None and layout.placement == "colocated"
    student_flops = tokens_per_step * forward_flops_per_token(student, seq) * (4 if layout.recompute == "full" else 3)
    if layout.recompute == "selective":
        student_flops *= 1.02
    teacher_flops = tokens_per_step * forward_flops_per_token(teacher, seq) if colocated else 0.0
    peak = PEAK_FLOPS["fp8" if fp8 else "bf16"]
    bubble = pipeline_bubble(layout, microbatches_per_step, colocated)
    return (student_flops + teacher_flops) * bubble / (layout.gpus * peak * trainer_mfu(layout))
