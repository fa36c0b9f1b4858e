"""Weights, gradients and optimizer state of one GPU (a pipeline stage at one TP rank, one DP rank).

Where each term comes from (megatron-core 0.19, as wrapped by `megatron_topd.train.optim`):
- Megatron DDP groups parameters by dtype into separate contiguous buffers (`group_params_for_buffers`). The local
  layer spec's RMSNorm weights stay fp32 in a bf16 model (torch.nn.RMSNorm ignores `params_dtype`), so a bf16 student
  on CPU has a bf16 buffer (GEMM weights, embeddings) and a small fp32 one (norms); TE's norms follow params_dtype.
- weights: with the distributed optimizer each buffer's `param_data` is allocated at the padded layout size
  (`grad_buffer.BufferLayout.numel`) and every parameter is re-pointed into it;
- gradients: `grad_data`, the same padded size per buffer, fp32 (`grad_reduce_in_fp32=True`);
- optimizer: per DP rank, Adam's exp_avg and exp_avg_sq in fp32 for the rank's shard (8 B/element) plus, for
  16-bit params, the fp32 main copy of the shard (`shard_fp32_from_float16_groups`, 4 B/element; fp32 params are
  updated in place through views, no copy). Without the distributed optimizer the shard is the whole stage.
- a frozen (co-located) teacher holds weights only, in the params dtype, no DDP buffer, no padding.
- FP8 (Transformer Engine): a cached FP8 copy and transpose of every GEMM weight, ~2 B/param (1 B forward-only);
  an estimate from TE's weight caching, not measured here.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan.grad_buffer import buffer_layout
from megatron_topd.plan.param_shapes import ParamShape, stage_params
from megatron_topd.plan.units import DTYPE_BYTES


@dataclass(frozen=True)
class ModelState:
    weights: int
    gradients: int
    optimizer: int
    fp8_weight_cache: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.fp8_weight_cache


def _by_dtype(params: list[ParamShape], params_dtype: str, norm_dtype: str) -> dict[str, list[ParamShape]]:
    groups: dict[str, list[ParamShape]] = {}
    for p in params:
        groups.setdefault(norm_dtype if p.is_norm else params_dtype, []).append(p)
    return groups


_CACHE: dict[tuple, ModelState] = {}


def student_state(spec: ModelSpec, *, tp: int, pp: int, stage: int, layers: list[int], dp: int, dp_rank: int = 0,
                  params_dtype: str = "bf16", norm_dtype: str = "fp32", distributed_optimizer: bool = True,
                  fp8: bool = False) -> ModelState:
    """This rank's trained-student bytes. `norm_dtype`: "fp32" for the local spec (CPU), params_dtype with TE."""
    key = (repr(spec), tp, pp, stage, tuple(layers), dp, dp_rank, params_dtype, norm_dtype, distributed_optimizer, fp8)
    if key not in _CACHE:
        _CACHE[key] = _student_state(spec, tp, pp, stage, layers, dp, dp_rank, params_dtype, norm_dtype,
                                     distributed_optimizer, fp8)
    return _CACHE[key]


def _student_state(spec, tp, pp, stage, layers, dp, dp_rank, params_dtype, norm_dtype, distributed_optimizer,
                   fp8) -> ModelState:
    params = stage_params(spec, tp, layers[stage], first=stage == 0, last=stage == pp - 1, pp=pp)
    weights = grads = optim = 0
    for dtype, group in _by_dtype(params, params_dtype, norm_dtype).items():
        buf = buffer_layout(group, dp, distributed_optimizer=distributed_optimizer)
        shard = buf.shard_numel(dp, dp_rank) if distributed_optimizer else sum(p.numel for p in group)
        weights += buf.numel * DTYPE_BYTES[dtype]
        grads += buf.numel * 4
        optim += shard * (8 + (4 if dtype != "fp32" else 0))
    gemm = sum(p.numel for p in params if len(p.shape) == 2)
    return ModelState(weights=weights, gradients=grads, optimizer=optim, fp8_weight_cache=2 * gemm if fp8 else 0)


def teacher_weights(spec: ModelSpec, *, tp: int, pp: int, stage: int, layers: list[int], params_dtype: str = "bf16",
                    fp8: bool = False) -> ModelState:
    params = stage_params(spec, tp, layers[stage], first=stage == 0, last=stage == pp - 1, pp=pp)
    n = sum(p.numel for p in params)
    return ModelState(weights=n * DTYPE_BYTES[params_dtype], gradients=0, optimizer=0,
                      fp8_weight_cache=n if fp8 else 0)


def total_params(spec: ModelSpec) -> int:
    """All parameters of the model (tied embeddings counted once): the '70B' of a model's name."""
    return sum(p.numel for p in stage_params(spec, 1, spec.num_layers, first=True, last=True, pp=1))


def active_params(spec: ModelSpec) -> int:
    """Parameters one token passes through (MoE: top-k experts only), the N in 6 N tokens of training FLOPs."""
    if not spec.is_moe:
        return total_params(spec)
    per_expert = 3 * spec.hidden_size * spec.moe_ffn_hidden_size
    return total_params(spec) - spec.num_layers * per_expert * (spec.num_experts - spec.moe_router_topk)
