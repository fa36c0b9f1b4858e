"""The per-token OPD term under each `teacher.kl` estimator, and the trajectory term's forward KL.

- ``full`` (co-located teacher): exact reverse KL over the full vocabulary from both logit shards.
- ``topk`` (remote teacher's top-k log-probs): the top-k-plus-tail-bucket KL (`vocab_parallel_topk_kl`), a lower
  bound of the full KL that equals it at k = V.
- ``sampled`` (remote teacher's log-prob of the sampled token only): l_t = log pi_S(y_t) - log pi_T(y_t), whose mean
  over y_t ~ pi_S is the reverse KL. Its gradient is the policy-gradient form (docs/method.md): the loss term is
  ``sg(l_t) + sg(l_t) * (log pi_S - sg(log pi_S))`` - value l_t, gradient l_t * grad log pi_S, whose expectation
  under the student's own samples is the gradient of KL(pi_S || pi_T). A cross-tokenizer teacher (train/teacher.py
  `CrossTokenizerTeacher`) hands a per-student-token log-prob carrying the span-level signal and a ``mask``: tokens
  without a teacher signal get l_t = 0, i.e. loss weight 0 (still counted in N_tokens). A remote teacher's row
  scored after `teacher.deadline_s` comes masked whole, under ``topk`` and ``sampled`` alike.

Every function takes logit-aligned inputs ([rows, S-1] positions predicting tokens[:, 1:]) and returns float32.
"""
from __future__ import annotations

from typing import NamedTuple

import torch



class RolloutTerms(NamedTuple):
    loss: torch.Tensor  # the differentiable per-token term summed into L_OPD
    token_loss: torch.Tensor  # l_t as reported and used to rank candidates (detached)
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    entropy: torch.Tensor


def rollout_terms(logits: torch.Tensor, batch: dict, signal, *, group, vocab_size: int, chunk_size) -> RolloutTerms:
    """Per-token terms of a rollout microbatch; ``signal`` is the teacher's logit shard (full) or a dict of the
    remote teacher's per-position data (topk / sampled), as `TeacherSignal.for_microbatches` returns it."""
    from megatron_topd.losses import (vocab_parallel_entropy, vocab_parallel_log_probs, vocab_parallel_opd_scores,
                                      vocab_parallel_topk_kl)

    s_logits, targets = logits[:, :-1], batch["tokens"][:, 1:]
    kw = dict(group=group, vocab_size=vocab_size, chunk_size=chunk_size, check_finite=False)
    if torch.is_tensor(signal):  # full
        s = vocab_parallel_opd_scores(s_logits, signal[:, :-1], targets, **kw)
        return RolloutTerms(s.reverse_kl, s.reverse_kl.detach(), s.student_log_probs.detach(), s.teacher_log_probs,
                            s.student_entropy.detach())
    dev = logits.device
    logp_t = signal["token_logprobs"][:, :-1].to(dev)
    logp_s = vocab_parallel_log_probs(s_logits, targets, **kw)
    with torch.no_grad():
        entropy = vocab_parallel_entropy(s_logits.detach(), **kw)
    mask = signal.get("mask")  # tokens without a teacher signal (cross-tokenizer, scored too late): loss weight 0
    mask = None if mask is None else mask[:, :-1].to(dev)
    if signal["kind"] == "topk":
        kl = vocab_parallel_topk_kl(s_logits, signal["topk_ids"][:, :-1].to(dev), signal["topk_logprobs"][:, :-1].to(dev),
                                    **kw)
        kl = kl if mask is None else torch.where(mask, kl, torch.zeros_like(kl))
        return RolloutTerms(kl, kl.detach(), logp_s.detach(), logp_t, entropy)
    l_t = (logp_s - logp_t).detach()
    if mask is not None:
        l_t = torch.where(mask, l_t, torch.zeros_like(l_t))
    return RolloutTerms(l_t + l_t * (logp_s - logp_s.detach()), l_t, logp_s.detach(), logp_t, entropy)


def guidance_kl(flat_logits: torch.Tensor, signal, *, group, vocab_size: int, chunk_size) -> torch.Tensor:
    """Forward KL(pi_T || pi_S) at the guidance rows' weighted positions ([m, V/TP] student logits)."""
    from megatron_topd.losses import vocab_parallel_kl, vocab_parallel_topk_kl

    kw = dict(group=group, vocab_size=vocab_size, chunk_size=chunk_size, check_finite=False)
    if torch.is_tensor(signal):
        return vocab_parallel_kl(flat_logits, signal, direction="forward", **kw)
    dev = flat_logits.device
    return vocab_parallel_topk_kl(flat_logits, signal["topk_ids"].to(dev), signal["topk_logprobs"].to(dev),
                                  direction="forward", **kw)
