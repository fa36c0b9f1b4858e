"""Shared-prefix rows: a guidance window trained inside its rollout row instead of as a row of its own.

A guidance row is the rollout's prefix ``x_<t`` followed by a teacher window ``y``. The rollout row already runs
``x_<t`` through the model, so appending ``y`` to the rollout row, letting each window token see the row's first
``t`` tokens and its own window's earlier tokens, and giving it RoPE position ``t + i`` computes exactly the logits of
the separate row: a window costs K tokens instead of t + K (docs/throughput.md).

Megatron's GPTModel does neither thing for a causal LM, so this module supplies both:

- the attention mask, built per microbatch from two [rows, W] int tensors (``attention_segment``: -1 rollout token,
  w >= 0 window w of the row, -2 padding; ``attention_visible``: for a window token, how many of the row's leading
  tokens it sees) as a dense bool [rows, 1, W, W] (True = masked), which Megatron's local ``DotProductAttention``
  applies as given. Transformer Engine's fused attention ignores a mask under its causal mask type and runs an
  arbitrary one only unfused, at O(W^2) per head: `check_supported` refuses it (use ``train.guidance_layout=rows``).
- RoPE at per-token positions (`token_positions`): GPTModel computes RoPE for 0..W-1 and ignores ``position_ids``;
  `enable_token_positions` makes the model's rotary module use the microbatch's ``position_ids`` while the context
  is open.

Sizes: the mask lives for one microbatch's forward and backward: rows_mb x W^2 bytes <= budget x W (2048-token budget:
4 MB). The local attention it feeds already holds [rows_mb, heads/TP, W, W] float scores.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

ROLLOUT, PADDING = -1, -2
_positions: torch.Tensor | None = None


def check_supported() -> None:
    """Raise unless the model's attention applies a dense mask (Megatron's local layers, not Transformer Engine)."""
    from megatron_topd.models.precision import use_transformer_engine

    if use_transformer_engine():
        raise ValueError("train.guidance_layout=shared_prefix needs Megatron's local attention, which applies a dense "
                         "mask; with Transformer Engine layers (a GPU with TE) the mask would be ignored or run "
                         "unfused at O(S^2) per head: set train.guidance_layout=rows (or auto)")


def attention_mask(segment: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """[rows, 1, W, W] bool, True where query q may NOT attend to key k.

    q sees k iff k <= q and (k is in q's own segment, or k is a rollout token among the first ``visible[q]``).
    Rollout tokens: causal over the rollout. Window tokens: the row's prefix and their own window, causally.
    Padding: earlier padding and itself (no all-masked row)."""
    width = segment.shape[1]
    idx = torch.arange(width, device=segment.device)
    causal = idx[None, :] <= idx[:, None]  # [q, k]
    same = segment[:, :, None] == segment[:, None, :]
    prefix = (segment[:, None, :] == ROLLOUT) & (idx[None, None, :] < visible[:, :, None])
    return ~(causal & (same | prefix)).unsqueeze(1)


def mask_for(batch: dict) -> torch.Tensor | None:
    """The microbatch's attention mask: None (causal, Megatron's own) unless it carries shared-prefix windows."""
    if "attention_segment" not in batch:
        return None
    return attention_mask(batch["attention_segment"], batch["attention_visible"])


@contextmanager
def token_positions(position_ids: torch.Tensor | None):
    """While open, models set up by `enable_token_positions` take RoPE angles from ``position_ids`` [rows, W]."""
    global _positions
    saved, _positions = _positions, position_ids
    try:
        yield
    finally:
        _positions = saved


def enable_token_positions(model) -> None:
    """Let ``model.rotary_pos_emb`` (Megatron's RotaryEmbedding) follow `token_positions`; unchanged otherwise.

    Angles are ``position * inv_freq``, the product Megatron forms for 0..W-1, laid out [W, rows, 1, dim] so that
    Megatron's unfused ``apply_rotary_pos_emb`` broadcasts them over heads per row."""
    rope = getattr(model, "rotary_pos_emb", None)
    if rope is None:
        return
    default = rope.forward

    def forward(max_seq_len: int, offset: int = 0, packed_seq: bool = False, cp_group=None):
        if _positions is None:
            return default(max_seq_len, offset, packed_seq, cp_group)
        if _positions.shape[1] != max_seq_len or offset or packed_seq or rope.rotary_interleaved:
            raise ValueError(f"per-token RoPE positions {tuple(_positions.shape)} do not fit a rotary call for "
                             f"{max_seq_len} positions (offset {offset}, packed {packed_seq}, interleaved "
                             f"{rope.rotary_interleaved}): shared-prefix rows need plain bshd RoPE")
        inv_freq = rope.inv_freq.to(_positions.device)
        seq = _positions.t().to(inv_freq.dtype)
        if rope.seq_len_interpolation_factor is not None:
            seq = seq * (1 / rope.seq_len_interpolation_factor)
        freqs = seq.unsqueeze(-1) * inv_freq  # [W, rows, dim/2]
        return torch.cat((freqs, freqs), dim=-1).unsqueeze(2)

    rope.forward = forward
