"""The trainer's one call per micro-batch: every per-token signal of OPD scoring in a single pass over both shards."""
from __future__ import annotations

from typing import NamedTuple

import torch

from megatron_topd.losses._dense import dense_scores


class OPDScores(NamedTuple):
    """Per-token tensors of shape ``logits.shape[:-1]`` (float32)."""

    reverse_kl: torch.Tensor  # KL(p_S || p_T), the OPD loss term l_t; differentiable
    student_log_probs: torch.Tensor  # log p_S(token); differentiable
    teacher_log_probs: torch.Tensor  # log p_T(token); a constant
    student_entropy: torch.Tensor  # H(p_S); differentiable


def vocab_parallel_opd_scores(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    group=None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> OPDScores:
    """Reverse KL, both models' log-probs of ``token_ids`` and the student entropy, in one pass.

    Why fused: the four signals share the maxima, normalisers and the two all-reduces per chunk, so together they
    cost about what the KL alone costs. When only ``reverse_kl`` receives a gradient, backward takes the KL-only
    fast path. Arguments as in ``vocab_parallel_kl`` and ``vocab_parallel_log_probs``.
    """
    if teacher_logits is None or token_ids is None:
        raise TypeError("vocab_parallel_opd_scores: pass teacher_logits and token_ids (the sampled tokens)")
    out = dense_scores("vocab_parallel_opd_scores", student_logits, teacher_logits, token_ids, group=group,
                       vocab_size=vocab_size, temperature=temperature, chunk_size=chunk_size,
                       check_finite=check_finite, kl="reverse", entropy=True)
    return OPDScores(out["kl"], out["logp_s"], out["logp_t"], out["entropy"])
