"""KL against a remote teacher that returns only its top-k log-probs (as an SGLang server does).

Estimator: coarsen both distributions onto k + 1 buckets, the teacher's top-k ids K and one tail bucket holding the
rest of the vocabulary, and take the exact KL between the coarsened distributions:

    reverse:  sum_{i in K} p_i log(p_i / q_i) + P_tail log(P_tail / Q_tail)
    forward:  sum_{i in K} q_i log(q_i / p_i) + Q_tail log(Q_tail / P_tail)

with p the student's full-vocabulary softmax (vocabulary-parallel, exact), q_i = exp(teacher log-prob),
P_tail = 1 - sum_K p_i and Q_tail = 1 - sum_K q_i. By the log-sum inequality it is a lower bound of the full KL and
equals it when the teacher's tail is empty or the two tails are proportional. Inside the log the tails are floored at
TAIL_FLOOR (fp32 rounding of 1 - sum is ~1e-7): a teacher whose top-k holds all mass does not make the loss infinite.

The student's log-probs on K come from the same vocabulary-parallel Function as `vocab_parallel_log_probs` (ids of
shape [T, k]); the estimator itself is small per-token arithmetic on [T, k] that autograd differentiates exactly.
"""
from __future__ import annotations

import torch

from megatron_topd.losses import _checks
from megatron_topd.losses._chunks import chunk_rows
from megatron_topd.losses._dense import DenseScores, DenseSpec
from megatron_topd.losses._shard import vocab_shard

TAIL_FLOOR = 1e-6


def vocab_parallel_topk_kl(
    student_logits: torch.Tensor,
    teacher_topk_ids: torch.Tensor,
    teacher_topk_logprobs: torch.Tensor,
    *,
    direction: str = "reverse",
    group=None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    check_finite: bool = True,
) -> torch.Tensor:
    """Top-k-plus-tail KL per token (see the module docstring), shape ``student_logits.shape[:-1]``, float32.

    ``teacher_topk_ids`` [..., k]: distinct global ids in ``[0, vocab_size)``, the same on every rank;
    ``teacher_topk_logprobs`` [..., k]: the teacher's log-probabilities of those ids (normalised over its full
    vocabulary, so their exps sum to <= 1). The gradient flows into ``student_logits`` only.
    """
    fn = "vocab_parallel_topk_kl"
    direction = _checks.direction(fn, direction)
    _checks.logits(fn, "student_logits", student_logits)
    v_local, lead = student_logits.shape[-1], tuple(student_logits.shape[:-1])
    shard = vocab_shard(fn, v_local, group, vocab_size)
    ids, lq = teacher_topk_ids, teacher_topk_logprobs
    if not isinstance(ids, torch.Tensor) or ids.dim() != len(lead) + 1 or tuple(ids.shape[:-1]) != lead or ids.shape[-1] < 1:
        got = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{fn}: teacher_topk_ids must have shape {lead + ('k',)} with k >= 1, got {got}")
    _checks.token_ids(fn, "teacher_topk_ids", ids, tuple(ids.shape), shard.vocab_size, student_logits.device)
    if not isinstance(lq, torch.Tensor) or not lq.dtype.is_floating_point or lq.shape != ids.shape:
        got = (tuple(lq.shape), lq.dtype) if isinstance(lq, torch.Tensor) else type(lq).__name__
        raise ValueError(f"{fn}: teacher_topk_logprobs must be a float tensor shaped like teacher_topk_ids "
                         f"{tuple(ids.shape)}, got {got}")
    k = ids.shape[-1]
    ids2d = ids.reshape(-1, k).long()
    if k > 1 and ids2d.numel() and bool((ids2d.sort(-1).values.diff(dim=-1) == 0).any()):
        raise ValueError(f"{fn}: teacher_topk_ids repeats an id within a token; top-k ids must be distinct")
    dtype = _checks.compute_dtype(student_logits)
    lq2d = lq.detach().reshape(-1, k).to(dtype)
    if check_finite and not bool(torch.isfinite(lq2d).all()):
        raise FloatingPointError(f"{fn}: teacher_topk_logprobs contains NaN or Inf; pass check_finite=False to let "
                                 f"them propagate instead of raising")
    if lq2d.numel() and float(torch.logsumexp(lq2d, -1).max()) > 1e-3:
        raise ValueError(f"{fn}: exp(teacher_topk_logprobs) sums to more than 1 for some token; pass "
                         f"log-probabilities (log_softmax over the full vocabulary), not logits")
    spec = DenseSpec(fn, shard, None, False, 1.0, chunk_rows(fn, chunk_size, v_local, student_logits.device),
                     check_finite, lead)
    (lp,) = DenseScores.apply(student_logits.reshape(-1, v_local), None, ids2d, spec)
    return tail_bucket_kl(lp, lq2d, direction).reshape(lead)


def tail_bucket_kl(lp: torch.Tensor, lq: torch.Tensor, direction: str) -> torch.Tensor:
    """The estimator on [T, k] log-probs of the top-k ids under the student (lp) and the teacher (lq)."""
    p, q = lp.exp(), lq.exp()
    p_tail = (-torch.expm1(torch.logsumexp(lp, -1))).clamp_min(0)
    q_tail = (-torch.expm1(torch.logsumexp(lq, -1))).clamp_min(0)
    log_ratio_tail = p_tail.clamp_min(TAIL_FLOOR).log() - q_tail.clamp_min(TAIL_FLOOR).log()
    if direction == "reverse":
        return (p * (lp - lq)).sum(-1) + p_tail * log_ratio_tail
    return (q * (lq - lp)).sum(-1) - q_tail * log_ratio_tail
