"""Properties the trainer relies on: the top-k estimator's relation to the full KL, the teacher as a constant, and
backward saving only the inputs and per-token scalars (never a [T, V] softmax)."""
from __future__ import annotations

import pytest
import torch

from megatron_topd import losses
from megatron_topd.losses import reference as ref


def _teacher_topk(teacher: torch.Tensor, k: int):
    top = torch.log_softmax(teacher.double(), -1).topk(k, dim=-1)
    return top.indices, top.values.float()


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_kl_is_the_full_kl_when_k_covers_the_vocabulary(direction):
    s, t = torch.randn(5, 24) * 2, torch.randn(5, 24) * 2
    ids, lp = _teacher_topk(t, 24)
    got = losses.vocab_parallel_topk_kl(s, ids, lp, direction=direction)
    assert torch.allclose(got.double(), ref.kl(s, t, direction), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("direction", ["reverse", "forward"])
def test_topk_kl_is_a_lower_bound_that_tightens_with_k(direction):
    s, t = torch.randn(6, 200) * 2, torch.randn(6, 200) * 2
    full = ref.kl(s, t, direction)
    previous = torch.zeros(6, dtype=torch.float64)
    for k in (1, 5, 20, 80, 200):
        got = losses.vocab_parallel_topk_kl(s, *_teacher_topk(t, k), direction=direction).double()
        assert torch.all(got <= full + 1e-5), k  # log-sum inequality: coarsening never increases a KL
        assert torch.all(got >= previous - 1e-5), k  # a finer partition (nested top-k sets) never decreases it
        previous = got
    assert torch.allclose(previous, full, rtol=1e-5, atol=1e-6)


def test_topk_tail_floor_keeps_a_closed_teacher_tail_finite():
    """A teacher whose top-k carries all its mass (tail 0) gives a large but finite loss and gradient."""
    s = torch.randn(3, 30, requires_grad=True)
    ids = torch.tensor([[0, 1]] * 3)
    lp = torch.log(torch.tensor([[0.5, 0.5]] * 3))
    kl = losses.vocab_parallel_topk_kl(s, ids, lp)
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(s.grad).all() and torch.all(kl > 1.0)


def test_teacher_is_a_constant_even_when_it_requires_grad():
    s = torch.randn(4, 16, requires_grad=True)
    t = torch.randn(4, 16, requires_grad=True)
    ids = torch.randint(0, 16, (4,))
    out = losses.vocab_parallel_opd_scores(s, t, ids)
    assert not out.teacher_log_probs.requires_grad
    (out.reverse_kl.sum() + out.student_entropy.sum()).backward()
    losses.vocab_parallel_kl(s, t, direction="forward").sum().backward()
    assert t.grad is None and s.grad is not None and s.grad.abs().sum() > 0


def test_output_and_gradient_dtypes():
    s = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn(4, 16, dtype=torch.bfloat16)
    kl = losses.vocab_parallel_kl(s, t)
    assert kl.dtype == torch.float32  # arithmetic and outputs in fp32 for bf16 input
    kl.sum().backward()
    assert s.grad.dtype == torch.bfloat16


def test_backward_saves_only_inputs_and_per_token_scalars():
    """Memory bound: nothing of size [T, V] is kept for backward beyond the input shards themselves."""
    T, V = 64, 300
    s, t = torch.randn(T, V, requires_grad=True), torch.randn(T, V)
    ids = torch.randint(0, V, (T,))
    saved = []

    def pack(x):
        saved.append(x)
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = losses.vocab_parallel_opd_scores(s, t, ids, chunk_size=8)
    big = [x for x in saved if x.numel() >= T * V]
    assert len(big) == 2 and all(x.data_ptr() in (s.data_ptr(), t.data_ptr()) for x in big)
    assert sum(x.numel() for x in saved if x.numel() < T * V) <= 8 * T  # ids + a handful of per-token scalars
    (out.reverse_kl.sum() + out.student_log_probs.sum()).backward()
