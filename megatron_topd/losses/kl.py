"""Per-token KL between student and teacher, vocabulary-parallel, with an exact backward into the student."""
from __future__ import annotations

import torch

from megatron_topd.losses import _checks
from megatron_topd.losses._dense import dense_scores


def vocab_parallel_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    direction: str = "reverse",
    group=None,
    vocab_size: int | None = None,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Full-vocabulary KL per token, shape ``logits.shape[:-1]``, float32 (float64 for float64 input).

    ``reverse`` = KL(p_S || p_T) (on-policy distillation), ``forward`` = KL(p_T || p_S). Both logits are this rank's
    ``[..., V_local]`` shard in Megatron's layout; ids >= ``vocab_size`` (padding) are in neither distribution.
    ``group=None``: Megatron's tensor-parallel group when initialised, else no parallelism. Both distributions use
    ``softmax(logits / temperature)``. The gradient flows into ``student_logits`` only; the teacher is a constant.
    ``chunk_size``: tokens per chunk (None = automatic); it bounds the extra memory, not the result.
    ``check_finite=False`` lets NaN/Inf logits propagate into the result instead of raising FloatingPointError.
    """
    fn = "vocab_parallel_kl"
    direction = _checks.direction(fn, direction)
    if teacher_logits is None:
        raise TypeError(f"{fn}: teacher_logits is None; pass the teacher's logit shard (same shape as the student's)")
    out = dense_scores(fn, student_logits, teacher_logits, None, group=group, vocab_size=vocab_size,
                       temperature=temperature, chunk_size=chunk_size, check_finite=check_finite, kl=direction)
    return out["kl"]
