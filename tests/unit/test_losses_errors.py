"""Bad input fails early with an error that names the argument and the fix."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_topd import losses

S, T = torch.randn(4, 10), torch.randn(4, 10)
IDS = torch.randint(0, 10, (4,))
TOPK_IDS = torch.tensor([[0, 1, 2]] * 4)
TOPK_LP = torch.full((4, 3), math.log(0.2))


def test_student_and_teacher_shards_must_match():
    with pytest.raises(ValueError, match=r"student_logits \(4, 10\) and teacher_logits \(4, 11\) differ in shape"):
        losses.vocab_parallel_kl(S, torch.randn(4, 11))
    with pytest.raises(ValueError, match="differ in shape"):
        losses.vocab_parallel_opd_scores(S, torch.randn(5, 10), IDS)


def test_vocab_size_must_fit_group_size_times_v_local():
    with pytest.raises(ValueError, match=r"vocab_size=11 is inconsistent.*1 rank\(s\) x V_local=10 = 10"):
        losses.vocab_parallel_kl(S, T, vocab_size=11)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 10\]"):
        losses.vocab_parallel_entropy(S, vocab_size=0)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        losses.vocab_parallel_entropy(S, vocab_size=9.0)


@pytest.mark.parametrize("bad", [-1, 10, 9])
def test_token_ids_out_of_range(bad):
    ids = IDS.clone()
    ids[2] = bad
    vocab_size = 9  # id 9 is padding: no probability
    with pytest.raises(ValueError, match=rf"token_ids contains id {bad}, outside \[0, vocab_size=9\)"):
        losses.vocab_parallel_log_probs(S, ids, vocab_size=vocab_size)


def test_token_ids_shape_and_dtype():
    with pytest.raises(ValueError, match=r"token_ids has shape \(5,\), expected \(4,\)"):
        losses.vocab_parallel_log_probs(S, torch.zeros(5, dtype=torch.long))
    with pytest.raises(TypeError, match="token ids must be an integer tensor"):
        losses.vocab_parallel_log_probs(S, IDS.float())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nonfinite_logits_raise_by_default_and_propagate_when_allowed(value, which):
    s, t = S.clone(), T.clone()
    (s if which == "student" else t)[2, 7] = value
    with pytest.raises(FloatingPointError, match=r"NaN or Inf in the logits of token \(2,\).*check_finite=False"):
        losses.vocab_parallel_kl(s, t)
    with pytest.raises(FloatingPointError, match=rf"{which} NOT finite"):
        losses.vocab_parallel_opd_scores(s, t, IDS)
    out = losses.vocab_parallel_kl(s, t, check_finite=False)
    assert not math.isfinite(float(out[2])) and torch.isfinite(out[[0, 1, 3]]).all()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_logits_raise_in_single_distribution_calls(value):
    s = S.clone()
    s[1, 3] = value
    ids = torch.zeros(4, dtype=torch.long)  # not the bad column: the check must not depend on the token
    for call in (lambda: losses.vocab_parallel_log_probs(s, ids), lambda: losses.vocab_parallel_entropy(s),
                 lambda: losses.vocab_parallel_topk_kl(s, TOPK_IDS, TOPK_LP)):
        with pytest.raises(FloatingPointError, match=r"token \(1,\)"):
            call()


def test_options_are_checked():
    with pytest.raises(ValueError, match="direction='backward'; use 'reverse'"):
        losses.vocab_parallel_kl(S, T, direction="backward")
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        losses.vocab_parallel_kl(S, T, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        losses.vocab_parallel_entropy(S, chunk_size=0)
    with pytest.raises(TypeError, match="dtype torch.int64; pass float32 or bfloat16"):
        losses.vocab_parallel_entropy(IDS.reshape(4, 1))
    with pytest.raises(TypeError, match="check_finite must be True or False"):
        losses.vocab_parallel_entropy(S, check_finite="no")


def test_topk_inputs_are_checked():
    with pytest.raises(ValueError, match=r"teacher_topk_ids must have shape \(4, 'k'\)"):
        losses.vocab_parallel_topk_kl(S, TOPK_IDS[:3], TOPK_LP[:3])
    with pytest.raises(ValueError, match="repeats an id within a token"):
        losses.vocab_parallel_topk_kl(S, torch.tensor([[0, 1, 1]] * 4), TOPK_LP)
    with pytest.raises(ValueError, match=r"teacher_topk_ids contains id 10, outside \[0, vocab_size=10\)"):
        losses.vocab_parallel_topk_kl(S, torch.tensor([[0, 1, 10]] * 4), TOPK_LP)
    with pytest.raises(ValueError, match="sums to more than 1.*not logits"):
        losses.vocab_parallel_topk_kl(S, TOPK_IDS, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="teacher_topk_logprobs must be a float tensor shaped like"):
        losses.vocab_parallel_topk_kl(S, TOPK_IDS, TOPK_LP[:, :2])
    lp = TOPK_LP.clone()
    lp[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="teacher_topk_logprobs contains NaN or Inf; pass check_finite=False"):
        losses.vocab_parallel_topk_kl(S, TOPK_IDS, lp)


def test_nonfinite_error_names_the_token_in_the_callers_shape():
    s = torch.randn(2, 3, 10)
    s[1, 2, 5] = float("nan")
    with pytest.raises(FloatingPointError, match=r"token \(1, 2\) \(1 token\(s\) affected\)"):
        losses.vocab_parallel_entropy(s)
