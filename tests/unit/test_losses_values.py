"""Vocabulary-parallel losses at TP = 1 (no torch.distributed): values and gradients against the float64
full-vocabulary reference, fp32 and bf16, with and without padding, every chunk size giving the same answer."""
from __future__ import annotations

import pytest
import torch

from megatron_topd import losses
from megatron_topd.losses import checking

LOSSES = [
    ("kl", {"direction": "reverse"}),
    ("kl", {"direction": "reverse", "temperature": 0.6}),
    ("kl", {"direction": "forward"}),
    ("kl", {"direction": "forward", "temperature": 1.7}),
    ("log_probs", {}),
    ("log_probs", {"temperature": 0.8}),
    ("entropy", {}),
    ("entropy", {"temperature": 2.0}),
    ("opd_scores", {}),
    ("opd_scores", {"temperature": 0.9}),
    ("topk_kl", {"direction": "reverse"}),
    ("topk_kl", {"direction": "forward"}),
]
LEAD, V = (3, 7), 40  # 21 tokens


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab_size", [V, V - 5], ids=["no_pad", "pad5"])
@pytest.mark.parametrize("name,kw", LOSSES, ids=[f"{n}-{kw}" for n, kw in LOSSES])
def test_matches_float64_reference_at_every_chunk_size(name, kw, vocab_size, dtype):
    problem = checking.make_problem(LEAD, V, vocab_size, seed=len(name) + vocab_size, dtype=dtype)
    want = checking.run_reference(problem, name, dtype=dtype, **kw)
    unchunked = checking.run_shard(problem, name, dtype=dtype, chunk_size=21, **kw)
    for key, ref in want.items():
        tol = 4e-3 if (key == "grad" and dtype == torch.bfloat16) else 1e-5
        assert checking.rel_err(unchunked[key], ref) <= tol, key
    for chunk in (1, 5, None):
        got = checking.run_shard(problem, name, dtype=dtype, chunk_size=chunk, **kw)
        for key, value in got.items():
            assert checking.rel_err(value, unchunked[key]) <= 4e-6, (chunk, key)
    assert unchunked["grad"].dtype == dtype
    assert torch.all(unchunked["grad"][..., vocab_size:] == 0)  # padding is in neither distribution


def test_kl_value_is_zero_for_identical_and_positive_for_different_distributions():
    x = torch.randn(6, 50) * 4
    assert losses.vocab_parallel_kl(x, x).abs().max() < 1e-6
    assert losses.vocab_parallel_kl(x, x + 7.0).abs().max() < 1e-5  # a constant shift is the same distribution
    kl = losses.vocab_parallel_kl(x, torch.randn(6, 50) * 4)
    assert torch.all(kl > 0.1)


def test_one_token_and_empty_batches():
    x, y = torch.randn(30), torch.randn(30)
    kl = losses.vocab_parallel_kl(x, y)
    assert kl.shape == () and abs(float(kl) - float(checking.ref.kl(x, y))) <= 1e-5 * float(kl)
    empty = losses.vocab_parallel_kl(torch.zeros(0, 30, requires_grad=True), torch.zeros(0, 30))
    assert empty.shape == (0,)
    empty.sum().backward()


def test_large_logits_stay_finite():
    """Logits of magnitude 1e4 (an untrained fp32 head can produce them) must not overflow the exponentials."""
    s, t = torch.randn(4, 64) * 1e4, torch.randn(4, 64) * 1e4
    s.requires_grad_()
    kl = losses.vocab_parallel_kl(s, t)
    ref = checking.ref.kl(s.detach(), t)
    assert checking.rel_err(kl.detach(), ref) <= 1e-5
    kl.sum().backward()
    assert torch.isfinite(s.grad).all()


def test_fused_scores_equal_the_separate_calls():
    problem = checking.make_problem((9,), 33, 31, seed=3)
    s, t, ids = problem.student, problem.teacher, problem.token_ids
    fused = losses.vocab_parallel_opd_scores(s, t, ids, vocab_size=31, temperature=0.8)
    assert torch.allclose(fused.reverse_kl, losses.vocab_parallel_kl(s, t, vocab_size=31, temperature=0.8), rtol=0, atol=1e-6)
    assert torch.allclose(fused.student_log_probs, losses.vocab_parallel_log_probs(s, ids, vocab_size=31, temperature=0.8), rtol=0, atol=1e-6)
    assert torch.allclose(fused.teacher_log_probs, losses.vocab_parallel_log_probs(t, ids, vocab_size=31, temperature=0.8), rtol=0, atol=1e-6)
    assert torch.allclose(fused.student_entropy, losses.vocab_parallel_entropy(s, vocab_size=31, temperature=0.8), rtol=0, atol=1e-6)
