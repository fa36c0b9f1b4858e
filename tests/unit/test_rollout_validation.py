"""Malformed inputs fail with a clear error before anything is sent (an out-of-range id or an empty prompt would
crash a real SGLang server). The client points at a port where nothing listens: had it sent anything, the error
would be a connection failure instead of the ValueError. The port is bound by a socket of the test's own that never
listens, held for the test's whole duration, so nothing else can start listening there meanwhile."""
from __future__ import annotations

import socket

import pytest

from megatron_topd.rollout import RequestFailed, SamplingParams, SGLangClient
from megatron_topd.rollout.sampling import derive_seed


@pytest.fixture
def client():
    """A client of 127.0.0.1:<port>, where <port> is bound (so no one else can take it) but not listening: a
    connection is refused at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        yield SGLangClient(f"http://127.0.0.1:{silent.getsockname()[1]}", vocab_size=1000, context_length=64,
                           max_retries=1, retry_backoff_s=0.01, server_cooldown_s=0.01)


GREEDY = SamplingParams(max_new_tokens=4, temperature=0.0)


@pytest.mark.parametrize(
    "prompts, match",
    [
        ([[1, 2], [3, 1000]], r"prompts\[1\]\[1\]=1000 is outside the vocabulary \[0, 1000\)"),
        ([[1, -1]], r"prompts\[0\]\[1\]=-1 is outside the vocabulary"),
        ([[1, 2], []], r"prompts\[1\] is empty"),
        ([], r"prompts is empty"),
        (["hello"], r"prompts\[0\] is a str: pass token ids"),
        ([[1, 2.0]], r"prompts\[0\]\[1\]=2\.0 is not an int token id"),
        ([[1, True]], r"prompts\[0\]\[1\]=True is not an int token id"),
        ([[1] * 61], r"prompts\[0\] has 61 tokens \+ max_new_tokens=4 > the server's context length 64"),
        # within the context with its response, but SGLang takes at most 64 - 7 input tokens
        ([[1] * 58], r"prompts\[0\] has 58 tokens: SGLang takes at most 57 input tokens at context length 64"),
    ],
)
def test_bad_prompts(client, prompts, match):
    with pytest.raises(ValueError, match=match):
        client.generate(prompts, GREEDY)


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(max_new_tokens=4, temperature=-1.0), r"temperature=-1\.0: use a finite number >= 0"),
        (dict(max_new_tokens=4, temperature=float("nan")), r"temperature=nan"),
        (dict(max_new_tokens=4, top_p=0.0), r"top_p=0\.0: use a number in \(0, 1\]"),
        (dict(max_new_tokens=4, top_p=1.5), r"top_p=1\.5"),
        (dict(max_new_tokens=4, n=0), r"n=0: use an integer >= 1"),
        (dict(max_new_tokens=-1), r"max_new_tokens=-1"),
        (dict(max_new_tokens=0), r"max_new_tokens=0 generates nothing: use score\(\)"),
        (dict(max_new_tokens=4, top_k=0), r"top_k=0"),
        (dict(max_new_tokens=4, seed=-3), r"seed=-3"),
        (dict(max_new_tokens=4, stop_token_ids=(5, 1000)), r"stop_token_ids\[1\]=1000"),
    ],
)
def test_bad_sampling_params(client, params, match):
    with pytest.raises(ValueError, match=match):
        client.generate([[1, 2, 3]], SamplingParams(**params))


def test_bad_top_logprobs_and_score_starts(client):
    with pytest.raises(ValueError, match=r"top_logprobs=-1"):
        client.generate([[1, 2]], GREEDY, top_logprobs=-1)
    with pytest.raises(ValueError, match=r"start\[0\]=3: use 1 <= start < len\(sequences\[0\]\)=3"):
        client.score([[1, 2, 3]], start=3)
    with pytest.raises(ValueError, match=r"start has 1 entries for 2 sequences"):
        client.score([[1, 2, 3], [4, 5]], start=[1])
    with pytest.raises(ValueError, match=r"prefixes\[0\] is empty"):
        client.continue_prefixes([[]], max_new_tokens=4, n=1, temperature=1.0, top_p=1.0, seed=None)


def test_unreachable_server_is_a_clear_error_after_bounded_retries(client):
    with pytest.raises(RequestFailed, match=r"(?s)failed on all 2 attempts.*connection error.*Check that the servers"):
        client.generate([[1, 2, 3]], GREEDY)


def test_sync_call_inside_event_loop_points_to_async_api(client):
    import asyncio

    async def inner():
        client.generate([[1, 2]], GREEDY)

    with pytest.raises(RuntimeError, match=r"use `await client\.agenerate"):
        asyncio.run(inner())


def test_per_sample_seeds_are_distinct_and_reproducible():
    seeds = {derive_seed(7, i, j) for i in range(50) for j in range(8)}
    assert len(seeds) == 400 and all(0 <= s < 2**62 for s in seeds)
    assert derive_seed(7, 3, 1) == derive_seed(7, 3, 1) != derive_seed(8, 3, 1)
    params = SamplingParams(max_new_tokens=3, n=2, seed=7)
    assert params.for_sample(3, 1)["sampling_seed"] == derive_seed(7, 3, 1)
    assert "sampling_seed" not in SamplingParams(max_new_tokens=3).for_sample(0, 0)


def test_a_sequence_to_score_longer_than_sglang_takes_is_refused_before_sending(client):
    """Scoring sends the whole sequence as input: 57 tokens is SGLang's limit at context length 64 (the integration
    test tests/integration/test_openai_teacher.py finds the same limit on a real server)."""
    with pytest.raises(ValueError, match=r"sequences\[0\] has 58 tokens: SGLang takes at most 57"):
        client.score([[1] * 58], start=1)
    with pytest.raises(RequestFailed):  # 57 passes the checks: the request goes out, and nothing answers
        client.score([[1] * 57], start=1)
