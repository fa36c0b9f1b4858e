"""torch.autograd.gradcheck in float64 of every vocabulary-parallel loss at TP = 1 (explicit backward vs finite
differences), with padding, temperatures and several chunks."""
from __future__ import annotations

import pytest
import torch

from megatron_topd import losses
from megatron_topd.losses import checking

P = checking.make_problem((2, 3), 9, 8, k=3, seed=5)  # 6 tokens, one padding id
T64 = P.teacher.double()
COMMON = dict(vocab_size=8, chunk_size=4)
CASES = {
    "kl_reverse": lambda x: losses.vocab_parallel_kl(x, T64, temperature=0.7, **COMMON),
    "kl_forward": lambda x: losses.vocab_parallel_kl(x, T64, direction="forward", temperature=1.5, **COMMON),
    "log_probs": lambda x: losses.vocab_parallel_log_probs(x, P.token_ids, temperature=0.9, **COMMON),
    "entropy": lambda x: losses.vocab_parallel_entropy(x, temperature=1.2, **COMMON),
    "opd_scores": lambda x: tuple(losses.vocab_parallel_opd_scores(x, T64, P.token_ids, temperature=0.8, **COMMON)[i]
                                  for i in (0, 1, 3)),
    "opd_scores_kl_only": lambda x: losses.vocab_parallel_opd_scores(x, T64, P.token_ids, **COMMON).reverse_kl,
    "topk_reverse": lambda x: losses.vocab_parallel_topk_kl(x, P.topk_ids, P.topk_logprobs, **COMMON),
    "topk_forward": lambda x: losses.vocab_parallel_topk_kl(x, P.topk_ids, P.topk_logprobs, direction="forward", **COMMON),
}


@pytest.mark.parametrize("name", list(CASES))
def test_gradcheck_float64(name):
    x = P.student.double().requires_grad_()
    assert torch.autograd.gradcheck(CASES[name], (x,), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_gradcheck_catches_a_wrong_gradient():
    """The check above has teeth: the KL's gradient without its -KL term (the local-only mistake) fails it."""

    class Wrong(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return losses.vocab_parallel_kl(x, T64, **COMMON)

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            ls, lt = torch.log_softmax(x[..., :8], -1), torch.log_softmax(T64[..., :8], -1)
            grad = torch.zeros_like(x)
            grad[..., :8] = g.unsqueeze(-1) * ls.exp() * (ls - lt)  # missing "- KL"
            return grad

    x = P.student.double().requires_grad_()
    assert not torch.autograd.gradcheck(Wrong.apply, (x,), eps=1e-6, atol=1e-8, rtol=1e-6, raise_exception=False)
