"""Float64, single-process, full-vocabulary references: the definitions the vocabulary-parallel code must match.

Deliberately the obvious formulas (log_softmax over the whole vocabulary, autograd for gradients), for tests,
benchmarks and anyone checking a new kernel. Never use them in training: they materialise [T, V] in float64.
"""
from __future__ import annotations

import torch


def full_logits(shards: list[torch.Tensor], vocab_size: int | None = None) -> torch.Tensor:
    """Concatenate Megatron vocab shards (rank order) and drop the padding ids >= vocab_size, as float64."""
    full = torch.cat([s.double() for s in shards], dim=-1)
    return full[..., : (vocab_size if vocab_size is not None else full.shape[-1])]


def kl(student: torch.Tensor, teacher: torch.Tensor, direction: str = "reverse", temperature: float = 1.0):
    ls = torch.log_softmax(student.double() / temperature, -1)
    lt = torch.log_softmax(teacher.double() / temperature, -1)
    if direction == "reverse":
        return (ls.exp() * (ls - lt)).sum(-1)
    return (lt.exp() * (lt - ls)).sum(-1)


def log_probs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float = 1.0):
    ls = torch.log_softmax(logits.double() / temperature, -1)
    return ls.gather(-1, token_ids.long().unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor, temperature: float = 1.0):
    ls = torch.log_softmax(logits.double() / temperature, -1)
    return -(ls.exp() * ls).sum(-1)


def topk_kl(student: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor, direction: str = "reverse",
            tail_floor: float = 1e-6):
    """KL between the student and the teacher coarsened to {top-k ids} + one tail bucket."""
    ls = torch.log_softmax(student.double(), -1)
    p = ls.exp().gather(-1, topk_ids.long())
    q = topk_logprobs.double().exp()
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q.sum(-1)).clamp_min(0)
    lp, lq = p.log(), q.log()
    tail = p_tail.clamp_min(tail_floor).log() - q_tail.clamp_min(tail_floor).log()
    if direction == "reverse":
        return (p * (lp - lq)).sum(-1) + p_tail * tail
    return (q * (lq - lp)).sum(-1) - q_tail * tail
