"""Which HF tensors make which Megatron-Core GPTModel parameter, for a `ModelSpec` — the one table both directions use.

A `TensorMap` ties one Megatron parameter (canonical name: global layer index, Megatron's local-spec module names)
to the HF tensor(s) it is made of (hub checkpoint names, per-expert for MoE), says how they are fused (`fuse`) and how
Megatron splits the parameter across tensor-parallel ranks (`tp`). The list is in HF checkpoint order (embeddings,
layers 0..L-1, final norm, lm_head), which is also the order `export_hf_weights` yields.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_topd.convert import layout
from megatron_topd.models.spec import ModelSpec

# Buffers some HF checkpoints carry that are recomputed from the config, never weights: skipped on import (reported).
IGNORED_HF_SUFFIXES = (".rotary_emb.inv_freq",)


@dataclass(frozen=True)
class TensorMap:
    megatron: str
    hf: tuple[str, ...]
    fuse: str | None = None  # None (same tensor) | "qkv" | "gate_up" | "vocab" (rows padded in Megatron)
    tp: str = "replicated"  # one of layout.TP_KINDS
    expert: bool = False  # split over the expert-tensor-parallel group rather than the TP group


def tensor_maps(spec: ModelSpec) -> list[TensorMap]:
    """Every parameter of the model described by `spec`, in HF checkpoint order."""
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab", "column")]
    for layer in range(spec.num_layers):
        h, m = f"model.layers.{layer}.", f"decoder.layers.{layer}."
        attn = h + "self_attn."
        maps.append(TensorMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",)))
        maps.append(
            TensorMap(
                m + "self_attention.linear_qkv.weight",
                (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"),
                "qkv",
                "column",
            )
        )
        if spec.qkv_bias:
            maps.append(
                TensorMap(
                    m + "self_attention.linear_qkv.bias",
                    (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"),
                    "qkv",
                    "column",
                )
            )
        if spec.qk_norm:
            maps.append(TensorMap(m + "self_attention.q_layernorm.weight", (attn + "q_norm.weight",)))
            maps.append(TensorMap(m + "self_attention.k_layernorm.weight", (attn + "k_norm.weight",)))
        maps.append(TensorMap(m + "self_attention.linear_proj.weight", (attn + "o_proj.weight",), tp="row"))
        maps.append(TensorMap(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",)))
        if spec.is_moe:
            maps.append(TensorMap(m + "mlp.router.weight", (h + "mlp.gate.weight",)))
            for e in range(spec.num_experts):
                he, me = f"{h}mlp.experts.{e}.", f"{m}mlp.experts.local_experts.{e}."
                gate_up = (he + "gate_proj.weight", he + "up_proj.weight")
                maps.append(TensorMap(me + "linear_fc1.weight", gate_up, "gate_up", "fc1", expert=True))
                maps.append(TensorMap(me + "linear_fc2.weight", (he + "down_proj.weight",), tp="row", expert=True))
        else:
            gate_up = (h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")
            maps.append(TensorMap(m + "mlp.linear_fc1.weight", gate_up, "gate_up", "fc1"))
            maps.append(TensorMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), tp="row"))
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not spec.tie_word_embeddings:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), "vocab", "column"))
    return maps


def hf_shapes(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The shape of every HF tensor of `spec`'s model, by name."""
    hidden, d = spec.hidden_size, spec.kv_channels
    q_rows, kv_rows = spec.num_attention_heads * d, spec.num_kv_heads * d
    ffn = spec.moe_ffn_hidden_size if spec.is_moe else spec.ffn_hidden_size
    by_suffix = {
        "embed_tokens.weight": (spec.vocab_size, hidden),
        "lm_head.weight": (spec.vocab_size, hidden),
        "q_proj.weight": (q_rows, hidden),
        "k_proj.weight": (kv_rows, hidden),
        "v_proj.weight": (kv_rows, hidden),
        "q_proj.bias": (q_rows,),
        "k_proj.bias": (kv_rows,),
        "v_proj.bias": (kv_rows,),
        "q_norm.weight": (d,),
        "k_norm.weight": (d,),
        "o_proj.weight": (hidden, q_rows),
        "layernorm.weight": (hidden,),
        "norm.weight": (hidden,),
        "gate_proj.weight": (ffn, hidden),
        "up_proj.weight": (ffn, hidden),
        "down_proj.weight": (hidden, ffn),
        "mlp.gate.weight": (spec.num_experts or 0, hidden),
    }
    shapes = {}
    for m in tensor_maps(spec):
        for name in m.hf:
            suffix = next(s for s in sorted(by_suffix, key=len, reverse=True) if name.endswith(s))
            shapes[name] = by_suffix[suffix]
    return shapes


def megatron_shape(m: TensorMap, spec: ModelSpec, tensor_parallel: int = 1) -> tuple[int, ...]:
    """Shape of the full (TP-merged) Megatron parameter of `m` in a model built at `tensor_parallel`."""
    from megatron_topd.models.build import padded_vocab_size

    shapes = hf_shapes(spec)
    first = shapes[m.hf[0]]
    if m.fuse == "vocab":
        return (padded_vocab_size(spec.vocab_size, tensor_parallel), *first[1:])
    if m.fuse in ("qkv", "gate_up"):
        return (sum(shapes[n][0] for n in m.hf), *first[1:])
    return first


def to_megatron(m: TensorMap, tensors: list[torch.Tensor], spec: ModelSpec) -> torch.Tensor:
    """HF tensors (in `m.hf` order) -> the full Megatron parameter."""
    if m.fuse == "qkv":
        return layout.fuse_qkv(*tensors, spec.num_attention_heads, spec.num_kv_heads)
    if m.fuse == "gate_up":
        return layout.fuse_gate_up(*tensors)
    if m.fuse == "vocab":  # padded as for TP=1; Megatron's padding does not depend on TP (checkpoints reshard)
        return layout.pad_vocab(tensors[0], megatron_shape(m, spec)[0])
    return tensors[0]


def to_hf(m: TensorMap, full: torch.Tensor, spec: ModelSpec) -> list[torch.Tensor]:
    """The full Megatron parameter -> HF tensors in `m.hf` order."""
    if m.fuse == "qkv":
        return list(layout.split_qkv(full, spec.num_attention_heads, spec.num_kv_heads))
    if m.fuse == "gate_up":
        return list(layout.split_gate_up(full))
    if m.fuse == "vocab":
        return [layout.unpad_vocab(full, spec.vocab_size)]
    return [full]


class TensorNamesError(ValueError):
    """A checkpoint's tensor names do not match the model its config describes."""


def check_hf_names(spec: ModelSpec, found: set[str]) -> list[str]:
    """Raise TensorNamesError listing missing and unexpected HF tensors; return the names deliberately skipped.

    Skipped: recomputed buffers (IGNORED_HF_SUFFIXES) and, with tied embeddings, an `lm_head.weight` that the
    importer checks is equal to the embedding.
    """
    expected = set(hf_shapes(spec))
    skipped = sorted(n for n in found - expected if n.endswith(IGNORED_HF_SUFFIXES))
    if spec.tie_word_embeddings and "lm_head.weight" in found:
        skipped.append("lm_head.weight")
    missing = sorted(expected - found)
    unexpected = sorted(found - expected - set(skipped))
    if missing or unexpected:
        raise TensorNamesError(
            f"checkpoint tensors do not match the {spec.family} model of config.json: "
            f"{len(missing)} missing {_head(missing)}, {len(unexpected)} unexpected {_head(unexpected)}"
        )
    return skipped


def _head(names: list[str], n: int = 8) -> str:
    return str(names[:n])[:-1] + (f", ... {len(names) - n} more]" if len(names) > n else "]")
