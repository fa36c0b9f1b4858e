"""Whether a layout can be built at all, before any memory arithmetic: every reason it cannot, in words.

The rules are Megatron-Core's: TP divides the query heads and the KV heads (GQA groups are not split), the padded
vocabulary; PP splits the layers (evenly, or with the given first/last stage sizes); CP needs sequences divisible by
2 x CP (load-balanced causal split); MoE with TP > 1 trains only with sequence parallelism; SP needs TP > 1.
A co-located teacher is built at the student's TP/PP with an even layer split, so it must pass the same rules.
"""
from __future__ import annotations

from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan.layout import Layout
from megatron_topd.plan.param_shapes import padded_vocab
from megatron_topd.plan.stages import stage_layers


def model_reasons(spec: ModelSpec, tp: int, pp: int, first: int | None, last: int | None, sp: bool,
                  role: str) -> list[str]:
    out = []
    if spec.num_attention_heads % tp or spec.num_kv_heads % tp:
        out.append(f"{role}: TP{tp} does not divide {spec.num_attention_heads} heads / {spec.num_kv_heads} KV heads")
    if padded_vocab(spec.vocab_size) % tp:
        out.append(f"{role}: TP{tp} does not divide the padded vocabulary {padded_vocab(spec.vocab_size)}")
    try:
        stage_layers(spec.num_layers, pp, first, last)
    except ValueError:
        out.append(f"{role}: {spec.num_layers} layers cannot be split over PP{pp} (first={first}, last={last})")
    if spec.is_moe and tp > 1 and not sp:
        out.append(f"{role}: MoE with TP{tp} needs sequence parallelism (Megatron refuses to train it without)")
    return out


def layout_reasons(student: ModelSpec, teacher: ModelSpec | None, layout: Layout, seq: int) -> list[str]:
    out = model_reasons(student, layout.tp, layout.pp, layout.first_stage_layers, layout.last_stage_layers,
                        layout.sp, "student")
    if layout.sp and layout.tp < 2:
        out.append("sequence parallelism needs TP >= 2")
    if layout.cp > 1 and seq % (2 * layout.cp):
        out.append(f"CP{layout.cp} needs the sequence length ({seq}) divisible by {2 * layout.cp}")
    if layout.max_tokens_per_microbatch < seq:
        out.append(f"max_tokens_per_microbatch={layout.max_tokens_per_microbatch} < max_seq_length={seq}")
    if teacher is not None and layout.placement == "colocated":
        out += model_reasons(teacher, layout.tp, layout.pp, None, None, True, "co-located teacher")
    return out
