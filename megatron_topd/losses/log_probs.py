"""log p(token) under vocabulary-parallel logits, differentiable (the policy-gradient and diagnostics quantity)."""
from __future__ import annotations

import torch

from megatron_topd.losses._dense import dense_scores


def vocab_parallel_log_probs(
    logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    group=None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """``log softmax(logits / temperature)[token_ids]`` per token, shape ``logits.shape[:-1]``, float32.

    ``token_ids`` has shape ``logits.shape[:-1]`` with global ids in ``[0, vocab_size)``; the same ids on every rank.
    Sharding, padding, ``group``, ``chunk_size`` and ``check_finite`` as in ``vocab_parallel_kl``.
    """
    if token_ids is None:
        raise TypeError("vocab_parallel_log_probs: token_ids is None; pass the ids whose log-probabilities you want")
    out = dense_scores("vocab_parallel_log_probs", logits, None, token_ids, group=group, vocab_size=vocab_size,
                       temperature=temperature, chunk_size=chunk_size, check_finite=check_finite)
    return out["logp_s"]
