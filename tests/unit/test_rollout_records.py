"""Rollout records: validation names the bad field; JSONL storage round-trips and survives an interrupted write."""
from __future__ import annotations

import pytest

from megatron_topd.rollout.client import Generation
from megatron_topd.rollout.records import RolloutRecord, read_records, records_from_generations, write_records


def rec(**kw) -> RolloutRecord:
    base = dict(prompt_index=3, sample_index=1, prompt_ids=[1, 2, 3], response_ids=[7, 8], response_logprobs=[-0.5, -1.25],
                finish_reason="length", weight_version="step-4")
    base.update(kw)
    return RolloutRecord(**base)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(response_ids=[]), r"response_ids is empty"),
        (dict(prompt_ids=[]), r"prompt_ids is empty"),
        (dict(response_ids=[7, 1000], response_logprobs=[-1.0, -1.0]), r"response_ids\[1\]=1000 is not a token id in \[0, 1000\)"),
        (dict(prompt_ids=[1, -2]), r"prompt_ids\[1\]=-2"),
        (dict(response_logprobs=[-0.5]), r"1 response_logprobs for 2 response_ids"),
        (dict(response_logprobs=[-0.5, 0.3]), r"response_logprobs\[1\]=0\.3 is not a log-probability"),
        (dict(response_logprobs=[-0.5, float("nan")]), r"response_logprobs\[1\]=nan"),
        (dict(finish_reason="abort"), r"finish_reason='abort'"),
        (dict(weight_version=""), r"weight_version=''"),
        (dict(sample_index=-1), r"sample_index=-1"),
    ],
)
def test_validation_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        rec(**kw).validate(vocab_size=1000)


def test_max_response_len():
    with pytest.raises(ValueError, match=r"2 response tokens > max 1"):
        rec().validate(max_response_len=1)


def test_jsonl_roundtrip_appends_and_tolerates_an_interrupted_last_line(tmp_path):
    path = tmp_path / "rollouts" / "step_4.jsonl"
    first = [rec(sample_index=i) for i in range(3)]
    assert write_records(path, first, vocab_size=1000) == 3
    assert write_records(path, [rec(prompt_index=9)]) == 1  # appends
    assert read_records(path, vocab_size=1000) == first + [rec(prompt_index=9)]
    with open(path, "a") as f:
        f.write('{"prompt_index": 10, "sample_in')  # a crash mid-write
    with pytest.warns(UserWarning, match="unterminated last line"):
        assert len(read_records(path)) == 4
    lines = path.read_text().splitlines()
    lines[1] = lines[1].replace('"finish_reason":"length"', '"finish_reason":"oops"')
    path.write_text("\n".join(lines[:4]) + "\n")
    with pytest.raises(ValueError, match=r"step_4\.jsonl:2: .*finish_reason='oops'"):
        read_records(path)


def test_write_refuses_invalid_records(tmp_path):
    with pytest.raises(ValueError, match="response_ids is empty"):
        write_records(tmp_path / "r.jsonl", [rec(), rec(response_ids=[], response_logprobs=[])])


def test_records_from_generations_is_prompt_major():
    gens = [[Generation([5], [-0.1], None, "stop", "v1", 2), Generation([6, 7], [-0.2, -0.3], None, "length", "v1", 2)],
            [Generation([8], [-0.4], None, "stop", "v1", 1)]]
    records = records_from_generations([40, 41], [[1, 2], [3]], gens)
    assert [(r.prompt_index, r.sample_index, r.response_ids) for r in records] == [(40, 0, [5]), (40, 1, [6, 7]), (41, 0, [8])]
    assert all(r.weight_version == "v1" for r in records)
    no_lp = [[Generation([5], None, None, "stop", "v1", 2)]]
    with pytest.raises(ValueError, match="return_logprobs=False"):
        records_from_generations([0], [[1, 2]], no_lp)
