"""Pure tensor re-layouts between Hugging Face and Megatron-Core, and between TP shards and full tensors.

Why pure functions: the converters (whole tensors, one process) and weight sync (TP shards gathered from live ranks)
share them, and they are checked in unit tests without any process group.

Megatron layouts (as Megatron-Core's attention and MLP read them):
- fused QKV is grouped per query group: for each kv group g, [the nq/nkv query heads of g; k_g; v_g] along dim 0
  (weights and biases alike), so under TP each rank holds whole groups and the full tensor is the plain concatenation
  of the rank shards;
- `linear_fc1` is cat([gate, up]) along dim 0, but under TP each rank holds [gate_r; up_r], so the full tensor is
  NOT the concatenation of the shards (see `merge_tp_shards`);
- embedding / output layer rows are padded to the padded vocabulary (zeros), split by rows under TP.
"""
from __future__ import annotations

import torch

# How a Megatron parameter is split across tensor-parallel ranks.
TP_KINDS = ("column", "row", "fc1", "replicated")


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """HF q/k/v projections (weights [heads*d, hidden] or biases [heads*d]) -> Megatron's grouped `linear_qkv`."""
    rest = q.shape[1:]
    group = num_heads // num_kv_heads
    d = q.shape[0] // num_heads
    if q.shape[0] != num_heads * d or k.shape[0] != num_kv_heads * d or v.shape != k.shape:
        raise ValueError(
            f"q/k/v shapes {tuple(q.shape)}/{tuple(k.shape)}/{tuple(v.shape)} do not fit {num_heads} query heads and "
            f"{num_kv_heads} kv heads of one head size"
        )
    parts = (
        q.reshape(num_kv_heads, group * d, *rest),
        k.reshape(num_kv_heads, d, *rest),
        v.reshape(num_kv_heads, d, *rest),
    )
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def split_qkv(qkv: torch.Tensor, num_heads: int, num_kv_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inverse of `fuse_qkv`: Megatron's grouped `linear_qkv` -> (q, k, v) in HF layout (contiguous copies)."""
    rest = qkv.shape[1:]
    group = num_heads // num_kv_heads
    d = qkv.shape[0] // (num_heads + 2 * num_kv_heads)
    grouped = qkv.reshape(num_kv_heads, (group + 2) * d, *rest)
    q = grouped[:, : group * d].reshape(-1, *rest).contiguous()
    k = grouped[:, group * d : (group + 1) * d].reshape(-1, *rest).contiguous()
    v = grouped[:, (group + 1) * d :].reshape(-1, *rest).contiguous()
    return q, k, v


def fuse_gate_up(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.cat([gate, up], dim=0)


def split_gate_up(fc1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = fc1.chunk(2, dim=0)
    return gate.contiguous(), up.contiguous()


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """[vocab, hidden] -> [padded_rows, hidden] with zero rows appended (the padded logits are never used)."""
    if weight.shape[0] > padded_rows:
        raise ValueError(f"vocab rows {weight.shape[0]} exceed the padded vocabulary {padded_rows}")
    out = weight.new_zeros((padded_rows, *weight.shape[1:]))
    out[: weight.shape[0]] = weight
    return out


def unpad_vocab(weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    return weight[:vocab_size].contiguous()


def merge_tp_shards(kind: str, shards: list[torch.Tensor]) -> torch.Tensor:
    """Full Megatron tensor from the TP ranks' shards (in TP-rank order)."""
    if kind == "column":
        return torch.cat(shards, dim=0)
    if kind == "row":
        return torch.cat(shards, dim=1)
    if kind == "fc1":  # rank r holds [gate_r; up_r]
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)
    if kind == "replicated":
        return shards[0]
    raise ValueError(f"unknown tensor-parallel kind {kind!r}; expected one of {TP_KINDS}")


def split_tp(kind: str, full: torch.Tensor, tp: int) -> list[torch.Tensor]:
    """This rank's shards of a full Megatron tensor, as Megatron lays them out (inverse of `merge_tp_shards`)."""
    if kind == "column":
        return [c.contiguous() for c in full.chunk(tp, dim=0)]
    if kind == "row":
        return [c.contiguous() for c in full.chunk(tp, dim=1)]
    if kind == "fc1":
        gate, up = full.chunk(2, dim=0)
        return [torch.cat([g, u], dim=0) for g, u in zip(gate.chunk(tp, dim=0), up.chunk(tp, dim=0))]
    if kind == "replicated":
        return [full.clone() for _ in range(tp)]
    raise ValueError(f"unknown tensor-parallel kind {kind!r}; expected one of {TP_KINDS}")
