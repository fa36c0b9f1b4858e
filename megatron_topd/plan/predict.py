"""The memory plan of a layout: per pipeline stage, per term, bytes on the worst GPU of that stage; the peak; fits.

`predict_memory(cfg, ...)` is the trainer's and the launcher's entry point (a `Config` in, a `Plan` out);
`predict_layout(...)` is what the layout search calls for each candidate. Every term's origin is documented in the
module that computes it: model_state (weights, gradients, optimizer), microbatch/activations (activations),
logits (loss workspace, teacher logit stash), overheads (communication buffers, runtime reserve).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan import logits as lg
from megatron_topd.plan.checks import layout_reasons
from megatron_topd.plan.layout import Layout
from megatron_topd.plan.microbatch import MicrobatchShape, stage_activations
from megatron_topd.plan.model_state import student_state, teacher_weights
from megatron_topd.plan.overheads import RUNTIME_RESERVE_BYTES, comm_buffers
from megatron_topd.plan.param_shapes import padded_vocab
from megatron_topd.plan.stages import microbatches_in_flight, stage_layers
from megatron_topd.plan.units import DTYPE_BYTES, GB

TERMS = ("weights", "gradients", "optimizer", "fp8_weight_cache", "activations", "loss_workspace", "teacher_weights",
         "teacher_logits", "comm_buffers", "runtime_reserve")


@dataclass
class StageMemory:
    stage: int
    layers: int
    in_flight: int
    terms: dict[str, float]

    @property
    def total(self) -> float:
        return sum(self.terms.values())

    @property
    def allocated(self) -> float:
        """What torch.cuda.max_memory_allocated() should report (everything but the runtime reserve)."""
        return self.total - self.terms.get("runtime_reserve", 0.0)


@dataclass
class Plan:
    layout: Layout
    gpu_bytes: float
    margin: float  # fraction of GPU memory kept free
    stages: list[StageMemory] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)  # why the layout cannot be built (empty: it can)
    microbatches_per_step: int = 0

    @property
    def valid(self) -> bool:
        return not self.reasons

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda s: s.total)

    @property
    def peak_bytes(self) -> float:
        return self.worst.total if self.stages else math.inf

    @property
    def budget_bytes(self) -> float:
        return self.gpu_bytes * (1 - self.margin)

    @property
    def fits(self) -> bool:
        return self.valid and self.peak_bytes <= self.budget_bytes

    @property
    def headroom_bytes(self) -> float:
        return self.gpu_bytes - self.peak_bytes

    def why_not(self) -> str:
        """One sentence: why it does not fit (or cannot be built)."""
        if self.fits:
            return ""
        if not self.stages:
            return "; ".join(self.reasons)
        w = self.worst
        if w.total <= self.budget_bytes:
            return "; ".join(self.reasons)
        top = sorted(w.terms.items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{k} {v / GB:.1f} GB" for k, v in top)
        return "; ".join(self.reasons + [f"stage {w.stage} needs {w.total / GB:.1f} GB > {self.budget_bytes / GB:.1f} GB usable "
                f"({self.gpu_bytes / GB:.0f} GB x {1 - self.margin:.2f}); largest terms: {parts}"])

    def to_dict(self) -> dict:
        return {
            "layout": self.layout.to_dict(),
            "fits": self.fits,
            "peak_gb": round(self.peak_bytes / GB, 2) if self.stages else None,
            "gpu_gb": self.gpu_bytes / GB,
            "margin": self.margin,
            "why_not": self.why_not(),
            "microbatches_per_step": self.microbatches_per_step,
            "stages": [{"stage": s.stage, "layers": s.layers, "in_flight": s.in_flight,
                        "total_gb": round(s.total / GB, 3),
                        "terms_gb": {k: round(v / GB, 3) for k, v in s.terms.items()}} for s in self.stages],
        }


def predict_layout(student: ModelSpec, teacher: ModelSpec | None, layout: Layout, *, seq: int, rows_per_step: int,
                   gpu_mem_gb: float, params_dtype: str = "bf16", fp8: bool = False, loss_chunk: int | None = 2048,
                   profile: str = "te_flash", margin: float = 0.10, distributed_optimizer: bool = True,
                   runtime_reserve: float = RUNTIME_RESERVE_BYTES, teacher_fp8: bool = False,
                   fused_swiglu: bool | None = None) -> Plan:
    """Memory of every pipeline stage of `layout` (DP rank 0: the largest optimizer shard up to a few elements).
    ``fused_swiglu``: None for what the profile's stack builds (plan/activations.py)."""
    plan = Plan(layout=layout, gpu_bytes=gpu_mem_gb * GB, margin=margin)
    colocated = teacher if layout.placement == "colocated" else None
    plan.reasons = layout_reasons(student, colocated, layout, seq)
    tp, pp = layout.tp, layout.pp
    try:  # memory is still shown for a layout that cannot be built, when the student's stages exist at all
        layers = stage_layers(student.num_layers, pp, layout.first_stage_layers, layout.last_stage_layers)
    except ValueError:
        return plan
    if any(x % tp for x in (student.num_attention_heads, student.num_kv_heads, padded_vocab(student.vocab_size))):
        return plan
    e = DTYPE_BYTES[params_dtype]
    t_layers = _balanced(colocated.num_layers, pp) if colocated is not None else None
    rows_per_mb = max(1, layout.max_tokens_per_microbatch // seq)
    mb = MicrobatchShape(tokens=rows_per_mb * seq, rows=rows_per_mb, seq=seq)
    rows_per_dp = math.ceil(rows_per_step / layout.dp)
    plan.microbatches_per_step = math.ceil(rows_per_dp / rows_per_mb)
    # A co-located teacher's group is one pipeline schedule (flushed per group): at most G microbatches in flight.
    per_schedule = min(plan.microbatches_per_step, layout.teacher_group_microbatches) if colocated is not None \
        else plan.microbatches_per_step
    norm_dtype = params_dtype if profile == "te_flash" else "fp32"
    v_rank = padded_vocab(student.vocab_size) // tp
    tokens = mb.tokens // layout.cp
    for s in range(pp):
        first, last = s == 0, s == pp - 1
        state = student_state(student, tp=tp, pp=pp, stage=s, layers=layers, dp=layout.dp * layout.cp,
                              params_dtype=params_dtype, norm_dtype=norm_dtype,
                              distributed_optimizer=distributed_optimizer, fp8=fp8)
        in_flight = microbatches_in_flight(s, pp, per_schedule)
        act = stage_activations(student, mb, layers=layers[s], in_flight=in_flight, first=first, last=last, tp=tp,
                                sp=layout.sp, cp=layout.cp, recompute=layout.recompute, profile=profile,
                                act_bytes=e, loss_chunk=loss_chunk, fused_swiglu=fused_swiglu)
        terms = {
            "weights": state.weights, "gradients": state.gradients, "optimizer": state.optimizer,
            "fp8_weight_cache": state.fp8_weight_cache,
            "activations": act.saved,
            "loss_workspace": act.final_norm + max(act.loss, act.backward),
            "teacher_weights": 0.0, "teacher_logits": 0.0,
            "comm_buffers": comm_buffers(tokens, student.hidden_size, tp=tp, sp=layout.sp, pp=pp, act_bytes=e),
            "runtime_reserve": runtime_reserve,
        }
        if colocated is not None:
            # The teacher is built without FP8 unless teacher.precision asks for it (train/setup.py): no FP8 cache.
            tw = teacher_weights(colocated, tp=tp, pp=pp, stage=s, layers=t_layers, params_dtype=params_dtype,
                                 fp8=teacher_fp8)
            terms["teacher_weights"] = tw.weights + tw.fp8_weight_cache
            if last:
                terms["teacher_logits"] = lg.teacher_logit_stash(layout.teacher_group_microbatches, tokens, v_rank,
                                                                 DTYPE_BYTES[params_dtype])
        plan.stages.append(StageMemory(stage=s, layers=layers[s], in_flight=in_flight, terms=terms))
    return plan


def _balanced(num_layers: int, pp: int) -> list[int]:
    """Even split, or (for a layout already refused) the nearest split: earlier stages one layer more."""
    return [num_layers // pp + (1 if s < num_layers % pp else 0) for s in range(pp)]


def predict_memory(cfg, student_spec: ModelSpec, teacher_spec: ModelSpec | None = None, *, gpu_mem_gb: float,
                   data_parallel: int = 1, profile: str | None = None, margin: float = 0.10) -> Plan:
    """The plan of a run's `Config` on GPUs of `gpu_mem_gb` GB, with `data_parallel` replicas.

    `profile`: the activation profile; default `te_flash` where Transformer Engine runs (GPU), else `local_unfused`,
    with the SwiGLU fusion this machine builds (models/fusions.py); a profile given stands for its own stack.
    The teacher counts only when `cfg.teacher.placement == "colocated"`.
    """
    fused_swiglu = None
    if profile is None:
        from megatron_topd.models.fusions import Stack, fusion_flags
        from megatron_topd.models.precision import use_transformer_engine

        profile = "te_flash" if use_transformer_engine() else "local_unfused"
        fused_swiglu = fusion_flags(Stack.installed())["bias_activation_fusion"]
    p, t = cfg.parallel, cfg.train
    layout = Layout(tp=p.tensor_parallel, pp=p.pipeline_parallel, cp=p.context_parallel, dp=data_parallel,
                    sp=p.sequence_parallel, recompute=p.recompute, first_stage_layers=p.first_stage_layers,
                    last_stage_layers=p.last_stage_layers, max_tokens_per_microbatch=t.max_tokens_per_microbatch,
                    teacher_group_microbatches=t.teacher_group_microbatches, placement=cfg.teacher.placement)
    return predict_layout(student_spec, teacher_spec, layout, seq=t.max_seq_length,
                          rows_per_step=t.prompts_per_step * cfg.rollout.n_samples, gpu_mem_gb=gpu_mem_gb,
                          params_dtype=cfg.precision.params_dtype, fp8=bool(cfg.precision.fp8),
                          loss_chunk=t.loss_chunk_size, profile=profile, margin=margin,
                          distributed_optimizer=cfg.optim.use_distributed_optimizer,
                          teacher_fp8=bool(cfg.teacher.precision is not None and cfg.teacher.precision.fp8),
                          fused_swiglu=fused_swiglu)
