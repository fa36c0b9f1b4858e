"""SFT examples train on response tokens only (never the prompt, padding or a corrupted step); the evaluation
config validates early and schedules evaluations where the user asked."""
from __future__ import annotations

import pytest

from megatron_topd.train.config import EvalConfig
from megatron_topd.train.sft import SftExamples


def test_loss_mask_covers_response_targets_except_untrained_positions():
    prompts = [[5, 6, 7], [5, 6]]
    responses = [[8, 9, 2], [8, 9, 10, 2]]
    ex = SftExamples.from_pairs(prompts, responses, pad_id=0, untrained=[[], [1]])
    assert ex.tokens.tolist() == [[5, 6, 7, 8, 9, 2], [5, 6, 8, 9, 10, 2]]
    (batch,) = ex.batches([0, 1], micro_batch_size=2, vocab_size=12)
    assert batch["labels"].tolist() == [[6, 7, 8, 9, 2], [6, 8, 9, 10, 2]]
    # row 0: targets 8, 9, 2 (label positions 2..4); row 1: targets 8, 10, 2 - token 9 is context only
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 1, 1]]
    (first,), = [ex.batches([1], micro_batch_size=1, vocab_size=12)]
    assert first["loss_mask"].tolist() == [[0, 1, 0, 1, 1]]


def test_padding_is_never_a_target():
    ex = SftExamples.from_pairs([[4], [4, 5]], [[6, 2], [6, 7, 8, 2]], pad_id=0)
    (batch,) = ex.batches([0, 1], micro_batch_size=2, vocab_size=12)
    assert batch["loss_mask"].tolist() == [[1, 1, 0, 0, 0], [0, 1, 1, 1, 1]]
    with pytest.raises(ValueError, match="one response per prompt"):
        SftExamples.from_pairs([[1]], [], pad_id=0)


def test_eval_config_checks_fields_and_schedules(tmp_path):
    with pytest.raises(ValueError, match="eval.task"):
        EvalConfig(task="chess").validate()
    with pytest.raises(ValueError, match="eval.interval"):
        EvalConfig(interval=-1).validate()
    with pytest.raises(FileNotFoundError, match="eval.heldout_path"):
        EvalConfig(heldout_path=str(tmp_path / "missing.jsonl")).validate()
    assert not EvalConfig().enabled and not EvalConfig().due(10, 10)
    path = tmp_path / "h.jsonl"
    path.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    cfg = EvalConfig(heldout_path=str(path), interval=5)
    cfg.validate()
    assert [s for s in range(1, 13) if cfg.due(s, 12)] == [5, 10, 12]
    assert [s for s in range(1, 4) if EvalConfig(heldout_path=str(path)).due(s, 3)] == [3]
