"""Turn rollouts and guidance rows into fixed-length microbatches for Megatron's schedule.

Every microbatch of one schedule call has the same [micro_batch_size, seq_len] shape (pipeline stages exchange
activations of a fixed shape). Sequences are right-padded; with causal attention padding never affects the real
tokens, and every loss term is masked to real positions.

Alignment: `response_mask` and `token_weights` are token-aligned (index t refers to tokens[t]); logits at position p
predict tokens[p + 1], so the loss uses logits[:, :-1] against tokens[:, 1:] and masks[:, 1:].
"""
from __future__ import annotations

import math

import torch


def round_up(n: int, multiple: int = 8) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def pad_rows(rows: list[list[int]], length: int, pad_id: int) -> torch.Tensor:
    out = torch.full((len(rows), length), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r) > length:
            raise ValueError(f"sequence of {len(r)} tokens exceeds the step's sequence length {length}")
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


def rollout_tensors(prompts: list[list[int]], responses: list[list[int]], length: int, pad_id: int):
    """tokens [B, length] and the token-aligned response mask [B, length]."""
    if any(len(r) == 0 for r in responses):
        raise ValueError("empty response in the rollout batch: every response must hold at least one token")
    tokens = pad_rows([p + r for p, r in zip(prompts, responses)], length, pad_id)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        mask[i, len(p) : len(p) + len(r)] = True
    return tokens, mask


def pad_to(t: torch.Tensor, length: int, value) -> torch.Tensor:
    if t.shape[1] == length:
        return t
    if t.shape[1] > length:
        raise ValueError(f"tensor of length {t.shape[1]} exceeds {length}")
    pad = torch.full((t.shape[0], length - t.shape[1]), value, dtype=t.dtype)
    return torch.cat([t, pad], dim=1)


def split_microbatches(fields: dict[str, torch.Tensor], micro_batch_size: int, kind: str) -> list[dict]:
    """Split [B, S] fields into microbatches; each gets `position_ids` and its `kind` ('rollout' or 'guidance')."""
    n = next(iter(fields.values())).shape[0]
    seq = next(iter(fields.values())).shape[1]
    if n % micro_batch_size:  # fill the last microbatch with all-masked rows (zeros everywhere)
        extra = micro_batch_size - n % micro_batch_size
        fields = {k: torch.cat([v, torch.zeros((extra, *v.shape[1:]), dtype=v.dtype)]) for k, v in fields.items()}
        n += extra
    positions = torch.arange(seq).unsqueeze(0)
    out = []
    for start in range(0, n, micro_batch_size):
        mb = {k: v[start : start + micro_batch_size] for k, v in fields.items()}
        mb["position_ids"] = positions.expand(mb["tokens"].shape[0], -1)
        mb["kind"] = kind
        out.append(mb)
    return out
