"""Activation memory of one decoder layer: what autograd keeps between a microbatch's forward and its backward.

Per token (and, for unfused attention, per row x S^2), per TP rank, in the activation dtype (`e` bytes: 2 for bf16, 4
for fp32). Notation: h hidden, q = heads x head_dim, kv = kv_heads x head_dim, f FFN width (MoE: k x expert width),
t TP, SP sequence parallelism (splits the h-sized tensors that TP otherwise replicates over t).

Two kernel profiles, because what is saved depends on the kernels:
- ``te_flash`` (GPU: Transformer Engine layers, flash/cuDNN attention): Korthikanti et al. 2022 ("Reducing Activation
  Recomputation in Large Transformer Models", eq. 1-2) redone for SwiGLU, GQA and fused attention without dropout:
  norm inputs and GEMM inputs (4 h), Q/K/V and the attention output kept by flash attention (2 q + 2 kv), the SwiGLU
  input (2 f) and output (f) with Megatron's fused SwiGLU. No S^2 term. 70B at TP8 without SP: 92 kB/token/layer, i.e. 30 GB per 16k microbatch on
  a 20-layer stage, as the issue estimated by hand.
- ``local_unfused`` (CPU: Megatron's local spec, as `build_gpt_model` builds it without TE): read off the autograd
  graph of the local layer (checked with saved-tensor hooks): torch RMSNorm keeps input, normalised input, output and
  1/rms (3 h + 1, twice), unfused RoPE keeps cos/sin per q and k (4 head_dim), unfused attention keeps Q, K and V
  repeated to all heads and the context (4 q), the causal mask (S^2 bytes) and the softmax (heads x S^2), the MLP
  keeps fc1's output and three f-sized SwiGLU tensors (5 f).

SwiGLU fusion (`fused_swiglu`; models/fusions.py decides it per stack): Megatron's unfused SwiGLU
(`MLP.forward`'s ``glu``) keeps fc1's output (2 f, for SiLU's backward), SiLU's output and the linear half plus its
offset (f each, for the product's backward) and the product (f, fc2's input): 5 f. The fused `bias_swiglu_impl`
saves fc1's output alone and recomputes SiLU in the backward: 3 f. Both profiles take either; by default the one
`fusion_flags` gives their stack (te_flash: a GPU with TE and Triton, fused; local_unfused: the CPU, unfused).
RoPE fusion changes only per-position cos/sin (or freqs) tensors, under 1% of a layer's bytes: not counted.

Recompute (`parallel.recompute`): ``selective`` recomputes core attention (local: drops the S^2 terms and the repeated
K/V, keeps Q, K, V and the context; te_flash: nothing to drop, flash attention already recomputes its softmax);
``full`` keeps only each layer's input (h, or h/t with SP) and rebuilds one layer at a time in the backward.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_topd.models.fusions import CPU, GPU_TE, fusion_flags
from megatron_topd.models.spec import ModelSpec

PROFILES = ("te_flash", "local_unfused")
PROFILE_STACKS = {"te_flash": GPU_TE, "local_unfused": CPU}  # the machine each profile's kernels run on


@dataclass(frozen=True)
class LayerActivations:
    per_token: float  # bytes per token kept by one layer between forward and backward
    per_row_sq: float  # bytes per row x S^2 (unfused attention only)
    recompute_per_token: float  # bytes per token rebuilt while this layer's backward runs (recompute)
    recompute_per_row_sq: float
    backward_per_token: float  # transient bytes per token of the attention backward (gradients of Q, K, V, ...)
    backward_per_row_sq: float

    def saved(self, tokens: int, rows: int, seq: int) -> float:
        return self.per_token * tokens + self.per_row_sq * rows * seq * seq

    def rebuilt(self, tokens: int, rows: int, seq: int) -> float:
        return self.recompute_per_token * tokens + self.recompute_per_row_sq * rows * seq * seq

    def backward_transient(self, tokens: int, rows: int, seq: int) -> float:
        return self.backward_per_token * tokens + self.backward_per_row_sq * rows * seq * seq


def _ffn(spec: ModelSpec) -> tuple[int, float]:
    """(FFN width per token, extra h-sized copies per token): MoE tokens visit k experts and are permuted twice."""
    if spec.is_moe:
        return spec.moe_router_topk * spec.moe_ffn_hidden_size, 2.0 * spec.moe_router_topk
    return spec.ffn_hidden_size, 0.0


def swiglu_fused(profile: str, fused_swiglu: bool | None = None) -> bool:
    """``fused_swiglu`` as given, else what models/fusions.py decides on the profile's stack."""
    if profile not in PROFILE_STACKS:
        raise ValueError(f"profile={profile!r}: use one of {PROFILES}")
    return fusion_flags(PROFILE_STACKS[profile])["bias_activation_fusion"] if fused_swiglu is None else fused_swiglu


def layer_activations(spec: ModelSpec, *, tp: int = 1, sp: bool = False, recompute: str = "none",
                      profile: str = "te_flash", act_bytes: int = 2, fused_swiglu: bool | None = None
                      ) -> LayerActivations:
    e, t = act_bytes, tp
    h, d, heads = spec.hidden_size, spec.kv_channels, spec.num_attention_heads
    q, kv = heads * d, spec.num_kv_heads * d
    f, moe_copies = _ffn(spec)
    swiglu = (3 if swiglu_fused(profile, fused_swiglu) else 5) * f * e / t  # fc1's output + SwiGLU (docstring)
    rep = t if sp else 1  # what TP replicates unless sequence parallelism splits it
    router = 4 * spec.num_experts if spec.is_moe else 0  # fp32 router logits
    if profile == "te_flash":
        keep = 4 * h * e / rep + (2 * q + 2 * kv) * e / t + 4 * heads / t + swiglu
        keep += moe_copies * h * e / t + router
        sq, attn_keep_sq = 0.0, 0.0
        attn_core = 0.0  # flash attention recomputes its softmax anyway
        bwd, bwd_sq = (2 * q + 2 * kv) * e / t, 0.0  # dQ, dK, dV and dO
    else:  # local_unfused (swiglu_fused checked the name)
        if sp:
            raise ValueError("the local spec (torch RMSNorm) has no sequence parallelism")
        keep = (6 * h + 2) * e + 4 * d * e + 4 * q * e / t + swiglu + moe_copies * h * e + router
        sq = attn_keep_sq = heads * e / t + 1  # softmax output + the bool causal mask
        attn_core = (4 * q - (q + kv + (q + 2 * kv) + q)) * e / t  # repeated K, V vs. the checkpointed Q, K, V
        bwd, bwd_sq = 0.0, 2 * heads * e / t  # gradients of the softmax output and of the scores
    if recompute == "none":
        return LayerActivations(keep, sq, 0.0, 0.0, bwd, bwd_sq)
    if recompute == "selective":
        return LayerActivations(keep - attn_core, sq - attn_keep_sq, attn_core, attn_keep_sq, bwd, bwd_sq)
    if recompute == "full":
        return LayerActivations(h * e / rep, 0.0, keep, sq, bwd, bwd_sq)
    raise ValueError(f"recompute={recompute!r}: use none, selective or full")
