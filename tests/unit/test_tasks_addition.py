"""The demo's task: the chain of thought is right, the checker reads the answer, held-out problems stay unseen,
and the tokenizer maps one character to one token."""
from __future__ import annotations

import json

import pytest

from megatron_topd.tasks import AdditionTask, make_task
from megatron_topd.tasks.addition import EOS_ID, SYMBOLS, VOCAB_SIZE, Problem, build_tokenizer


def test_solution_is_a_correct_digit_by_digit_chain():
    task = AdditionTask(4)
    p = Problem(4071, 968)
    assert task.prompt(p) == "4071+0968="
    assert task.solution(p) == "1+8+0=09;7+6+0=13;0+9+1=10;4+0+1=05;>05039"
    for a, b in [(0, 0), (9999, 9999), (1234, 8766), (5, 5)]:
        sol = task.solution(Problem(a, b))
        steps = sol.split(">")[0].rstrip(";").split(";")
        carry = 0
        for step, da, db in zip(steps, f"{a:04d}"[::-1], f"{b:04d}"[::-1]):
            lhs, rhs = step.split("=")
            assert lhs == f"{da}+{db}+{carry}"
            assert int(rhs) == int(da) + int(db) + carry
            carry = int(rhs[0])
        assert int(task.extract_answer(sol)) == a + b


def test_checker_reads_the_last_answer_only():
    task = AdditionTask(4)
    p = Problem(1234, 8766)
    assert task.is_correct(task.solution(p), task.answer(p))
    assert not task.is_correct(task.solution(p)[:-1] + "1", task.answer(p))
    assert not task.is_correct("1+6+0=07;", task.answer(p))  # never reached an answer
    assert task.extract_answer("9+9+0=18;>18>1") == "1"
    with pytest.raises(ValueError, match="eval.task"):
        make_task("chess")


def test_heldout_problems_are_disjoint_from_training_and_files_round_trip(tmp_path):
    task = AdditionTask(3)
    train, heldout = task.split(500, 100, seed=3)
    assert len(train) == 500 and len(heldout) == 100
    assert not {p.key() for p in train} & {p.key() for p in heldout}
    assert len({p.key() for p in train}) == 500
    path = task.write_jsonl(heldout, tmp_path / "h.jsonl")
    rows = [json.loads(line) for line in open(path)]
    assert [(r["prompt"], r["answer"]) for r in rows] == [(task.prompt(p), task.answer(p)) for p in heldout]
    assert task.split(500, 100, seed=3) == (train, heldout)  # reproducible


def test_tokenizer_is_one_token_per_character_and_keeps_the_last_id_free(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path / "tok")))
    task = AdditionTask(4)
    text = task.prompt(Problem(4071, 968)) + task.solution(Problem(4071, 968))
    ids = tok(text, add_special_tokens=True)["input_ids"]
    assert len(ids) == len(text) and max(ids) < VOCAB_SIZE - 1  # no BOS added; id V-1 never produced
    assert tok.decode(ids) == text
    assert tok.decode(ids + [EOS_ID], skip_special_tokens=True) == text
    assert len(tok) == VOCAB_SIZE and tok.eos_token_id == EOS_ID
    assert sorted(tok(c)["input_ids"][0] for c in SYMBOLS) == list(range(3, 3 + len(SYMBOLS)))
