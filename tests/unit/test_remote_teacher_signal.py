"""A remote teacher's signal (issue 27): `teacher.api` / `deadline_s` / `temperature` validation, scores renormalised
at a temperature from the server's top-k (`at_temperature`, against float64 log-softmax(z / T)), and rows scored too
late masked whole under both estimators. The real-server side: tests/integration/test_openai_teacher.py."""
from __future__ import annotations

import math

import pytest
import torch

from megatron_topd.config import load_config
from megatron_topd.rollout import Score
from megatron_topd.train.estimators import rollout_terms
from megatron_topd.train.teacher import RemoteTeacher, at_temperature, teacher_fields

OPENAI = ["teacher.placement=remote", "teacher.kl=sampled", "teacher.api=openai", "topd.variant=opd"]


def cfg(overrides, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    return load_config(path, overrides).validate()


def test_openai_teacher_validates_for_remote_sampled_opd(tmp_path):
    c = cfg(OPENAI + ["teacher.deadline_s=2.5", "teacher.top_k=20", "rollout.temperature=0.7"], tmp_path)
    assert c.teacher.scoring_temperature(c.rollout.temperature) == 0.7
    assert cfg(["teacher.temperature=2.0"], tmp_path).teacher.scoring_temperature(0.7) == 2.0
    assert cfg(["rollout.temperature=0.0"], tmp_path).teacher.scoring_temperature(0.0) == 1.0  # greedy: unscaled


@pytest.mark.parametrize("overrides, message", [
    (["teacher.api=vllm"], r"teacher.api='vllm': use sglang or openai"),
    (["teacher.kl=topk"], r"teacher.api=openai with .*teacher.kl=topk: .*keyed by token text.*teacher.kl=sampled"),
    (["topd.variant=topd"], r"teacher.api=openai with topd.variant=topd: .*use topd.variant=opd"),
    (["teacher.deadline_s=-1"], r"teacher.deadline_s=-1: seconds per row, >= 0"),
    (["teacher.temperature=0"], r"teacher.temperature=0: use a number > 0"),
    (["teacher.api_max_top_k=0"], r"teacher.api_max_top_k=0"),
    # the top-k renormalises scores at T != 1: more than the server gives is refused, naming both fields
    (["rollout.temperature=0.7", "teacher.top_k=64"], r"teacher.top_k=64 > teacher.api_max_top_k=20: .*<= 20"),
])
def test_openai_teacher_refusals_name_the_field_and_fix(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg(OPENAI + overrides, tmp_path)


def _reference(z: torch.Tensor, ids: torch.Tensor, t: float) -> torch.Tensor:
    return torch.log_softmax(z / t, -1).gather(-1, ids[:, None])[:, 0]


@pytest.mark.parametrize("t", [0.5, 0.7, 1.5])
def test_at_temperature_is_exact_with_the_whole_vocabulary(t):
    g = torch.Generator().manual_seed(0)
    z = 3 * torch.randn(6, 50, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 50, (6,), generator=g)
    lp = torch.log_softmax(z, -1)
    top_lp, top_ids = lp.topk(50, -1)
    token_lp, top_t = at_temperature(lp.gather(-1, ids[:, None])[:, 0], top_ids, top_lp, ids, t, complete=True)
    torch.testing.assert_close(token_lp, _reference(z, ids, t), rtol=0, atol=1e-12)
    torch.testing.assert_close(top_t, torch.log_softmax(z / t, -1).gather(-1, top_ids), rtol=0, atol=1e-12)
    # ids unknown (an OpenAI-compatible server: -1): the same, membership read from the values
    token_lp2, _ = at_temperature(lp.gather(-1, ids[:, None])[:, 0], -torch.ones_like(top_ids), top_lp, ids, t,
                                  complete=True)
    torch.testing.assert_close(token_lp2, token_lp, rtol=0, atol=1e-12)


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_at_temperature_with_a_top_k_treats_the_rest_as_one_bucket(t):
    """Exact when the rest is one token; with a spread tail r^(1/T) bounds the rest from above at T < 1 (the score
    too low: log Z too high) and from below at T > 1 (the score too high)."""
    g = torch.Generator().manual_seed(1)
    z = 2 * torch.randn(8, 40, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 40, (8,), generator=g)
    lp = torch.log_softmax(z, -1)
    for k, exact in ((39, True), (5, False)):
        top_lp, top_ids = lp.topk(k, -1)
        token_lp, _ = at_temperature(lp.gather(-1, ids[:, None])[:, 0], top_ids, top_lp, ids, t)
        ref = _reference(z, ids, t)
        if exact:
            torch.testing.assert_close(token_lp, ref, rtol=0, atol=1e-10)
        elif t < 1:
            assert bool((token_lp <= ref + 1e-12).all()) and bool((token_lp < ref - 1e-6).any())
        else:
            assert bool((token_lp >= ref - 1e-12).all()) and bool((token_lp > ref + 1e-6).any())


class _Vocab:
    vocab_size = 10


def test_late_rows_are_masked_whole_and_counted_under_both_estimators():
    teacher = RemoteTeacher(_Vocab(), kl="topk", top_k=3, deadline_s=1.0)
    completions = [[4, 5, 6], [7, 8]]
    on_time = Score(2, [-1.0, -2.0, -0.5], [[(4, -1.0), (1, -1.5), (2, -3.0)], [(5, -2.0), (1, -2.1), (2, -2.2)],
                                           [(6, -0.5), (1, -2.0), (2, -3.0)]], "")
    rows = teacher.rows([on_time, None], completions, 3, keep_top_k=True)
    assert "late" not in rows[0] and rows[1]["late"] and not rows[1]["signal_mask"].any()
    assert teacher.row_counts(rows) == {"teacher_late_rows": 1.0}
    assert rows[1]["topk_ids"].shape == (2, 3)  # filler, like positions without teacher data
    prompts = [[1, 2], [1, 2]]
    width = 5
    batch = {"tokens": torch.tensor([p + c + [0] * (width - len(p) - len(c)) for p, c in zip(prompts, completions)])}
    batch.update(teacher_fields(rows, [0, 1], [2, 2], width, 3))
    assert batch["teacher_signal_mask"][1].sum() == width - 2 and batch["teacher_signal_mask"][0].all()
    logits = torch.randn(2, width, 10, dtype=torch.float64)
    for kind in ("topk", "sampled"):
        signal = {"kind": kind, "token_logprobs": batch["teacher_token_logprobs"].double(),
                  "topk_ids": batch["teacher_topk_ids"].long(), "topk_logprobs": batch["teacher_topk_logprobs"].double(),
                  "mask": batch["teacher_signal_mask"]}
        terms = rollout_terms(logits, batch, signal, group=None, vocab_size=10, chunk_size=None)
        assert float(terms.loss[1, 1:3].abs().sum()) == 0.0  # the late row's response positions: no loss
        assert float(terms.loss[0, 1:4].abs().sum()) > 0.0
    assert math.isclose(float(batch["teacher_token_logprobs"][0, 1]), -1.0)
