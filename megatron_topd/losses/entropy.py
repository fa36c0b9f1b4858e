"""Entropy of the vocabulary-parallel distribution per token, differentiable (a diagnostic and a regulariser)."""
from __future__ import annotations

import torch

from megatron_topd.losses._dense import dense_scores


def vocab_parallel_entropy(
    logits: torch.Tensor,
    *,
    group=None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """``H(softmax(logits / temperature))`` in nats per token, shape ``logits.shape[:-1]``, float32.

    Sharding, padding, ``group``, ``chunk_size`` and ``check_finite`` as in ``vocab_parallel_kl``.
    """
    out = dense_scores("vocab_parallel_entropy", logits, None, None, group=group, vocab_size=vocab_size,
                       temperature=temperature, chunk_size=chunk_size, check_finite=check_finite, entropy=True)
    return out["entropy"]
