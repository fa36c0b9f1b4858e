"""Run any of the losses on one rank's shard and its float64 full-vocabulary reference on the same numbers.

Why here and not in a test file: the unit tests (one process), the multi-rank tests (every rank), the benchmarks and
the GPU script all check the same thing the same way; the problem is built from a seed, so every rank builds it alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_topd import losses
from megatron_topd.losses import reference as ref

NAMES = ("kl", "log_probs", "entropy", "opd_scores", "topk_kl")


@dataclass
class Problem:
    """Full-width (padded) logits [*lead, V_padded] and everything else one check needs, in float32."""

    student: torch.Tensor
    teacher: torch.Tensor
    token_ids: torch.Tensor  # [*lead]
    topk_ids: torch.Tensor  # [*lead, k], the teacher's top-k
    topk_logprobs: torch.Tensor  # [*lead, k]
    weights: dict  # output name -> [*lead] weights of the scalar loss sum(weight * output)
    vocab_size: int


def make_problem(lead: tuple, v_padded: int, vocab_size: int, *, k: int = 4, seed: int = 0, scale: float = 3.0,
                 dtype: torch.dtype = torch.float32) -> Problem:
    """Random logits (padding columns get large values, so a leak into either distribution would show)."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(*lead, v_padded, generator=g) * scale
    teacher = student * 0.5 + torch.randn(*lead, v_padded, generator=g) * scale
    student[..., vocab_size:] = 50.0
    teacher[..., vocab_size:] = 60.0
    student, teacher = student.to(dtype).float(), teacher.to(dtype).float()  # the values the dtype can hold
    token_ids = torch.randint(0, vocab_size, lead, generator=g)
    lt = torch.log_softmax(teacher[..., :vocab_size].double(), -1)
    top = lt.topk(min(k, vocab_size), dim=-1)
    weights = {n: torch.randn(*lead, generator=g) for n in ("kl", "logp_s", "entropy")}
    return Problem(student, teacher, token_ids, top.indices, top.values.float(), weights, vocab_size)


def _loss(outputs: dict, weights: dict) -> torch.Tensor:
    return sum((outputs[n].double() * weights[n].double()).sum() for n in ("kl", "logp_s", "entropy") if n in outputs)


def run_shard(problem: Problem, name: str, *, rank: int = 0, world: int = 1, group=None, dtype=torch.float32,
              chunk_size=None, device="cpu", **kw) -> dict:
    """Outputs and the gradient of sum(weight * output) w.r.t. this rank's student shard (returned on the CPU)."""
    v_local = problem.student.shape[-1] // world
    cols = slice(rank * v_local, (rank + 1) * v_local)
    s = problem.student[..., cols].to(device=device, dtype=dtype).requires_grad_()
    t = problem.teacher[..., cols].to(device=device, dtype=dtype)
    ids, top_ids, top_lp = (x.to(device) for x in (problem.token_ids, problem.topk_ids, problem.topk_logprobs))
    common = dict(group=group, vocab_size=problem.vocab_size, chunk_size=chunk_size)
    if name == "kl":
        out = {"kl": losses.vocab_parallel_kl(s, t, **common, **kw)}
    elif name == "log_probs":
        out = {"logp_s": losses.vocab_parallel_log_probs(s, ids, **common, **kw)}
    elif name == "entropy":
        out = {"entropy": losses.vocab_parallel_entropy(s, **common, **kw)}
    elif name == "opd_scores":
        r = losses.vocab_parallel_opd_scores(s, t, ids, **common, **kw)
        out = {"kl": r.reverse_kl, "logp_s": r.student_log_probs, "logp_t": r.teacher_log_probs,
               "entropy": r.student_entropy}
    elif name == "topk_kl":
        out = {"kl": losses.vocab_parallel_topk_kl(s, top_ids, top_lp, **common, **kw)}
    else:
        raise ValueError(f"unknown loss {name!r}; one of {NAMES}")
    weights = {k: w.to(device) for k, w in problem.weights.items()}
    (grad,) = torch.autograd.grad(_loss(out, weights), s)
    return {k: v.detach().cpu() for k, v in out.items()} | {"grad": grad.cpu()}


def run_reference(problem: Problem, name: str, *, dtype=torch.float32, temperature: float = 1.0,
                  direction: str = "reverse") -> dict:
    """The float64 single-process answer; "grad" has the padded width, zero on padding columns."""
    V = problem.vocab_size
    s = problem.student.to(dtype).double()[..., :V].requires_grad_()
    t = problem.teacher.to(dtype).double()[..., :V]
    ids = problem.token_ids
    if name == "kl":
        out = {"kl": ref.kl(s, t, direction, temperature)}
    elif name == "log_probs":
        out = {"logp_s": ref.log_probs(s, ids, temperature)}
    elif name == "entropy":
        out = {"entropy": ref.entropy(s, temperature)}
    elif name == "opd_scores":
        out = {"kl": ref.kl(s, t, "reverse", temperature), "logp_s": ref.log_probs(s, ids, temperature),
               "logp_t": ref.log_probs(t, ids, temperature), "entropy": ref.entropy(s, temperature)}
    elif name == "topk_kl":
        out = {"kl": ref.topk_kl(s, problem.topk_ids, problem.topk_logprobs, direction)}
    else:
        raise ValueError(f"unknown loss {name!r}; one of {NAMES}")
    (grad,) = torch.autograd.grad(_loss(out, problem.weights), s)
    padded = torch.zeros(problem.student.shape, dtype=torch.float64)
    padded[..., :V] = grad
    return {k: v.detach() for k, v in out.items()} | {"grad": padded}


def rel_err(x: torch.Tensor, reference: torch.Tensor) -> float:
    """max |x - ref| / max |ref|: the error relative to the tensor's scale (per-element ratios blow up near 0)."""
    scale = reference.abs().max().clamp_min(1e-30)
    return float((x.double() - reference.double()).abs().max() / scale)
