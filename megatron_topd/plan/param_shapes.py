"""The parameters one (pipeline stage, tensor-parallel rank) of a GPTModel holds, in Megatron's registration order.

Why the order matters: Megatron's DDP lays parameters out back to front in one contiguous buffer, each start aligned
to 64 elements, so the padded buffer size (and which parameters fall into which data-parallel shard) depends on it.
Mirrors `GPTModel` with the local layer spec of `megatron_topd.models.build_gpt_model` (TE's spec fuses the norms
into `linear_qkv` / `linear_fc1`: same element counts, a different order, so padding may differ by < 64 x #params).
Shapes are per TP rank: column-parallel layers split their output dimension, row-parallel ones their input.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_topd.models.spec import ModelSpec

VOCAB_PAD_MULTIPLE = 128


@dataclass(frozen=True)
class ParamShape:
    name: str
    shape: tuple[int, ...]
    shared_embedding: bool = False  # Megatron gives the tied embedding copies their own bucket
    is_norm: bool = False  # RMSNorm weights: fp32 in the local spec whatever the params dtype (torch.nn.RMSNorm)

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def padded_vocab(vocab_size: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Megatron's vocabulary rows: `vocab_size` rounded up to `multiple` (`models.build.padded_vocab_size`)."""
    return -(-vocab_size // multiple) * multiple


def layer_params(spec: ModelSpec, tp: int, index: int) -> list[ParamShape]:
    h, d = spec.hidden_size, spec.kv_channels
    q, kv = spec.num_attention_heads * d, spec.num_kv_heads * d
    p = f"decoder.layers.{index}."
    out = [
        ParamShape(p + "input_layernorm.weight", (h,), is_norm=True),
        ParamShape(p + "self_attention.linear_proj.weight", (h, q // tp)),
        ParamShape(p + "self_attention.linear_qkv.weight", ((q + 2 * kv) // tp, h)),
    ]
    if spec.qkv_bias:
        out.append(ParamShape(p + "self_attention.linear_qkv.bias", ((q + 2 * kv) // tp,)))
    if spec.qk_norm:
        out += [ParamShape(p + "self_attention.q_layernorm.weight", (d,), is_norm=True),
                ParamShape(p + "self_attention.k_layernorm.weight", (d,), is_norm=True)]
    out.append(ParamShape(p + "pre_mlp_layernorm.weight", (h,), is_norm=True))
    if spec.is_moe:  # expert tensor parallelism = TP, expert parallelism 1 (the builder's defaults)
        f = spec.moe_ffn_hidden_size
        out.append(ParamShape(p + "mlp.router.weight", (spec.num_experts, h)))
        for e in range(spec.num_experts):
            out += [ParamShape(p + f"mlp.experts.local_experts.{e}.linear_fc1.weight", (2 * f // tp, h)),
                    ParamShape(p + f"mlp.experts.local_experts.{e}.linear_fc2.weight", (h, f // tp))]
    else:
        f = spec.ffn_hidden_size
        out += [ParamShape(p + "mlp.linear_fc1.weight", (2 * f // tp, h)),
                ParamShape(p + "mlp.linear_fc2.weight", (h, f // tp))]
    return out


def stage_params(spec: ModelSpec, tp: int, layers: int, *, first: bool, last: bool, pp: int) -> list[ParamShape]:
    """Parameters of a stage with `layers` decoder layers (layer names are local: 0..layers-1, as Megatron's)."""
    vocab_rows = padded_vocab(spec.vocab_size) // tp
    h = spec.hidden_size
    tied_split = spec.tie_word_embeddings and pp > 1
    out: list[ParamShape] = []
    if first:
        out.append(ParamShape("embedding.word_embeddings.weight", (vocab_rows, h), shared_embedding=tied_split))
    for i in range(layers):
        out += layer_params(spec, tp, i)
    if last:
        out.append(ParamShape("decoder.final_layernorm.weight", (h,), is_norm=True))
        if not (spec.tie_word_embeddings and first):
            out.append(ParamShape("output_layer.weight", (vocab_rows, h), shared_embedding=tied_split))
    return out
