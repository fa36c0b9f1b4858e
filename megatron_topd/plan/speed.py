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


def step_seconds(student: ModelSpec, teacher: ModelSpec | None, layout: Layout, *, seq: int, tokens_per_step: float,
                 microbatches_per_step: int, fp8: bool = False) -> float:
    fwd = 2 * active_params(student) + _attention_flops_per_token(student, seq)
    student_flops = tokens_per_step * fwd * (4 if layout.recompute == "full" else 3)
    if layout.recompute == "selective":
        student_flops *= 1.02
    teacher_flops = 0.0
    if teacher is not None and layout.placement == "colocated":
        teacher_flops = tokens_per_step * (2 * active_params(teacher) + _attention_flops_per_token(teacher, seq))
    mfu = BASE_MFU * (0.97 ** math.log2(layout.tp)) * (0.95 ** math.log2(layout.cp)) * (0.98 if layout.sp else 1.0)
    per_schedule = microbatches_per_step
    if teacher is not None and layout.placement == "colocated":
        per_schedule = min(microbatches_per_step, layout.teacher_group_microbatches)
    bubble = 1 + (layout.pp - 1) / max(1, per_schedule)
    peak = PEAK_FLOPS["fp8" if fp8 else "bf16"]
    return (student_flops + teacher_flops) * bubble / (layout.gpus * peak * mfu)
