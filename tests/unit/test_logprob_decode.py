"""The vectorised decode of SGLang's log-prob lists gives exactly what the per-entry decode gave, on answers recorded
from a real SGLang CPU server (tests/unit/data/sglang_logprob_responses.json), and declines (None: the client then
runs its per-entry checks, which name the problem) on everything those checks reject."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from megatron_topd.rollout.logprob_decode import split_logprobs, split_top_logprobs

RECORDED = json.loads((Path(__file__).parent / "data" / "sglang_logprob_responses.json").read_text())


def per_entry(entries):
    """The decode as the client did it before, one entry at a time."""
    return [float(e[0]) for e in entries], [e[1] for e in entries]


def per_entry_top(rows):
    return [[(int(e[1]), float(e[0])) for e in row] for row in rows]


def test_recorded_generation_and_score_decode_as_before():
    gen = RECORDED["generate"][0]["meta_info"]
    values, ids = split_logprobs(gen["output_token_logprobs"])
    assert (values, list(ids)) == per_entry(gen["output_token_logprobs"])
    assert list(ids) == RECORDED["generate"][0]["output_ids"] and len(values) == 16
    assert split_top_logprobs(gen["output_top_logprobs"], 5) == per_entry_top(gen["output_top_logprobs"])
    score = RECORDED["score"][0]["meta_info"]
    lps = score["input_token_logprobs"]
    assert lps[0][0] is None  # SGLang leaves the first scored position without a log-prob
    assert split_logprobs(lps) is None  # ... so the client decodes from entry 1 on
    values, ids = split_logprobs(lps[1:])
    assert (values, list(ids)) == per_entry(lps[1:])
    tops = score["input_top_logprobs"][1:]
    decoded = split_top_logprobs(tops, 5)
    assert decoded == per_entry_top(tops) and all(len(row) == 5 for row in decoded)
    assert all(type(i) is int and type(v) is float for row in decoded for i, v in row)


@pytest.mark.parametrize("bad", [math.nan, 0.5, True, "x", None])
def test_declines_what_the_per_entry_checks_reject(bad):
    good = [[-0.5, 7, None], [-1.0, 8, None]]
    assert split_logprobs(good) == ([-0.5, -1.0], (7, 8))
    assert split_logprobs([[-0.5, 7, None], [bad, 8, None]]) is None
    assert split_logprobs([[-0.5], [-1.0]]) is None  # no id column
    assert split_logprobs({"a": 1}) is None and split_logprobs([]) == ([], ())
    rows = [[[-0.1, 3, None], [-2.0, 4, None]], [[-0.2, 5, None], [-3.0, 6, None]]]
    assert split_top_logprobs(rows, 2) == [[(3, -0.1), (4, -2.0)], [(5, -0.2), (6, -3.0)]]
    assert split_top_logprobs(rows, 3) is None  # width
    assert split_top_logprobs([[[-2.0, 3, None], [-0.1, 4, None]]], 2) is None  # not best first
    assert split_top_logprobs([[[-0.1, 3, None], [bad, 4, None]]], 2) is None
    assert split_top_logprobs([[[-0.1, 3.0, None], [-0.2, 4, None]]], 2) is None  # a float id
