"""Seconds per phase of one TOPD step on a GPU cluster: what the planner prints beside the memory plan.

`speed.step_seconds` ranks trainer layouts by the training pass alone; a TOPD step is far more than that pass, and
on the cluster most of it is outside the trainer (generation, the probe's windows). Each phase here is a roofline
estimate from its dominant cost, on H100 SXM figures (`GpuProfile`), with the step's token counts:

- generation: the student's servers decode ``rows x response`` tokens; a decode step of a batch reads the weights
  once and every running sequence's KV cache (memory-bound), so tokens/s = batch / (bytes read / HBM bandwidth);
- scoring pass (TOPD): the co-located teacher's forward and the student's forward over the rollouts;
- probe windows: the teacher's server prefills every candidate's prefix (its radix cache holds nothing of the row:
  about 1.5x the row's tokens for 3 nested prefixes, docs/throughput.md) and decodes K tokens per window; the
  student's server decodes its K tokens on cached prefixes;
- OT: per-window EMD on K x K costs, on the first-stage ranks' CPUs (small);
- training pass: the co-located teacher's forward again, the student's forward and backward over the rollouts and
  the guidance rows (as rows: prefix + window; `train.guidance_layout=rows` under Transformer Engine);
- weight sync: the student's bf16 weights through global rank 0 (gathered over TP and PP), then broadcast to every
  student server (docs/rollout.md; issue 25 removes the funnel);
- checkpoint: the dist checkpoint (weights, fp32 main params, Adam moments) written at a filesystem bandwidth,
  amortised over ``save_interval`` steps.

It is a model for planning, stated with its assumptions; on a GPU, the acceptance run (scripts/gpu_acceptance.sh)
measures what it predicts.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan.layout import Layout
from megatron_topd.plan.model_state import total_params
from megatron_topd.plan.rollout import kv_bytes_per_token
from megatron_topd.plan.speed import PEAK_FLOPS, forward_flops_per_token, pipeline_bubble, trainer_mfu


@dataclass(frozen=True)
class GpuProfile:
    """H100 SXM: HBM 3.35 TB/s, dense bf16 989 TFLOP/s; what a real run reaches of them (the `*_efficiency`)."""

    hbm_bytes_per_s: float = 3.35e12
    decode_efficiency: float = 0.6  # of HBM bandwidth in a decode step
    prefill_mfu: float = 0.5
    inter_node_bytes_per_s: float = 50e9  # 400 Gb/s per node (one NIC's worth for a broadcast tree)
    filesystem_bytes_per_s: float = 20e9  # parallel filesystem, the job's aggregate write bandwidth
    ot_seconds_per_window: float = 2e-3  # exact EMD of a K=50 window pair on one CPU core (topd/ot.py)


@dataclass
class TopdStep:
    """The shape of one step (from a run's config)."""

    rows: int = 256  # rollouts per step (prompts x samples)
    prompt_tokens: int = 384
    response_tokens: int = 8000  # mean generated tokens per rollout
    candidates_per_row: int = 3  # topd.top_k
    window: int = 50  # topd.window
    divergent_share: float = 0.7  # 1 - topd.low_fraction: candidates that become guidance rows
    student_servers: int = 8  # one per node at TP8
    teacher_servers: int = 1
    decode_batch: int = 64  # sequences a student server runs at once
    save_interval: int = 25
    variant: str = "topd"


@dataclass
class StepTime:
    phases: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    def shares(self) -> dict[str, float]:
        return {k: v / self.total for k, v in self.phases.items()}


def _decode_seconds(spec: ModelSpec, tokens: float, context: float, batch: int, servers: int, gpus_per_server: int,
                    gpu: GpuProfile) -> float:
    """``tokens`` generated over ``servers``, each decoding ``batch`` sequences of mean length ``context``."""
    weight_bytes = 2 * total_params(spec)  # bf16, read once per decode step
    kv_bytes = batch * context * kv_bytes_per_token(spec)
    step_s = (weight_bytes + kv_bytes) / (gpus_per_server * gpu.hbm_bytes_per_s * gpu.decode_efficiency)
    return tokens / (batch * servers) * step_s


def _flop_seconds(flops: float, gpus: int, efficiency: float) -> float:
    return flops / (gpus * PEAK_FLOPS["bf16"] * efficiency)


def step_time(student: ModelSpec, teacher: ModelSpec | None, layout: Layout, step: TopdStep, *, seq: int,
              microbatches_per_step: int, gpus_per_node: int = 8, fp8: bool = False,
              gpu: GpuProfile = GpuProfile()) -> StepTime:
    colocated = teacher is not None and layout.placement == "colocated"
    row_tokens = step.prompt_tokens + step.response_tokens
    rollout_tokens = step.rows * row_tokens
    out = StepTime()
    out.phases["generation"] = _decode_seconds(
        student, step.rows * step.response_tokens, step.prompt_tokens + step.response_tokens / 2, step.decode_batch,
        step.student_servers, gpus_per_node, gpu)

    mfu = trainer_mfu(layout)
    peak = PEAK_FLOPS["fp8" if fp8 else "bf16"] / PEAK_FLOPS["bf16"]
    student_fwd = forward_flops_per_token(student, seq)
    teacher_fwd = forward_flops_per_token(teacher, seq) if colocated else 0.0
    probe = step.variant != "opd"
    if probe:
        bubble = pipeline_bubble(layout, microbatches_per_step, colocated)
        out.phases["scoring"] = _flop_seconds(rollout_tokens * (student_fwd + teacher_fwd) * bubble,
                                              layout.gpus, mfu * peak)
        windows = step.rows * step.candidates_per_row
        if teacher is not None:  # the teacher's server: prefill the nested prefixes, decode K per window
            prefill = 1.5 * step.rows * row_tokens * forward_flops_per_token(teacher, seq)
            out.phases["teacher_windows"] = _flop_seconds(prefill, step.teacher_servers * gpus_per_node,
                                                          gpu.prefill_mfu) + _decode_seconds(
                teacher, windows * step.window, row_tokens / 2, min(windows, step.decode_batch),
                step.teacher_servers, gpus_per_node, gpu)
        out.phases["student_windows"] = _decode_seconds(student, windows * step.window, row_tokens / 2,
                                                        min(windows, step.decode_batch), step.student_servers,
                                                        gpus_per_node, gpu)
        out.phases["ot"] = windows * gpu.ot_seconds_per_window / max(1, layout.dp)
    guidance_tokens = 0.0
    if step.variant == "topd":  # guidance rows: the rollout's prefix (half the row on average) + the window
        guidance_tokens = step.rows * step.candidates_per_row * step.divergent_share * (row_tokens / 2 + step.window)
    train_tokens = rollout_tokens + guidance_tokens
    backward = 4 if layout.recompute == "full" else 3  # forward + backward (+ the recomputed forward)
    train_flops = train_tokens * (student_fwd * backward + teacher_fwd)
    out.phases["training"] = _flop_seconds(train_flops * pipeline_bubble(layout, microbatches_per_step, colocated),
                                           layout.gpus, mfu * peak)
    weight_bytes = 2 * total_params(student)
    # Gathered to rank 0 (over TP within a node, then each stage's share over the network), then broadcast.
    out.phases["weight_sync"] = weight_bytes * (1 - 1 / layout.pp) / gpu.inter_node_bytes_per_s + \
        weight_bytes / gpu.inter_node_bytes_per_s
    checkpoint_bytes = total_params(student) * (2 + 4 + 4 + 4)  # bf16 weights, fp32 main params, Adam m and v
    out.phases["checkpoint"] = checkpoint_bytes / gpu.filesystem_bytes_per_s / step.save_interval
    return out

