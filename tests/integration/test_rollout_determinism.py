"""Seeded sampling is reproducible on a real SGLang CPU server started with `deterministic=True`
(--enable-deterministic-inference through rollout/cpu_shims): the same prompts and seed give the same token ids
whether they are generated alone or batched with other concurrent requests; another seed gives other ids.

One server of its own (module scope; the shared session servers run without the flag), stopped when the module ends.
"""
from __future__ import annotations

import asyncio

import pytest

from megatron_topd.rollout import SGLangClient, SamplingParams

from .conftest import await_load, start_server

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

PROMPTS = [[88, 292, 383, 81, 225, 83], [5, 6, 7], [100] * 20]
FILLER = [[17, 400 + i, 3, 9 * i + 1] for i in range(6)]  # other requests the server batches with PROMPTS
# The prompts' 24 tokens (and a prefill) fit inside the filler's decode many times over. With 200, one run in 10
# beside two CPU-burning processes saw no filler sample running before the filler was done (its load reports and
# the test's polls starved).
FILLER_TOKENS = 400
SEED = 1234


@pytest.fixture(scope="module")
def det_client(tiny_model_dir, tmp_path_factory):
    server = start_server(tiny_model_dir, tmp_path_factory.mktemp("sglang_det_logs"), deterministic=True)
    try:
        server.wait_healthy()
        yield SGLangClient([server.url], vocab_size=1000, context_length=512)
    finally:
        server.stop()


def _params(seed: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=24, n=2, temperature=1.0, seed=seed, ignore_eos=True)


def _ids(gens):
    return [[g.token_ids for g in row] for row in gens]


async def _mixed(client: SGLangClient, seed: int):
    """PROMPTS generated while the filler requests (started first, far longer) share the server's batches:
    sent once the server reports filler samples running, and the filler is still out when every prompt is back.

    Not "all the filler's samples in the scheduler", as before: SGLang publishes its load at each prefill and every
    15 decode iterations, and in one run of 20 the loads seen were (12 running, 0 waiting), then (0, 0): all 18 were
    never reported together and the wait gave up. What the test needs is the overlap, which the assertion after the
    prompts checks."""
    filler = asyncio.ensure_future(client.agenerate(
        FILLER, SamplingParams(max_new_tokens=FILLER_TOKENS, n=3, temperature=1.0, seed=seed + 1, ignore_eos=True)))
    await await_load(
        client.urls[0], "filler samples running", lambda load: load["num_running_reqs"] > 0,
        give_up=lambda: f"the filler finished first ({filler.exception() or 'no error'})" if filler.done() else None)
    gens = await client.agenerate(PROMPTS, _params(seed))
    assert not filler.done(), "the filler finished before the prompts: they were not generated beside it"
    await filler
    return gens


def test_same_seed_same_tokens_alone_or_batched(det_client):
    alone = det_client.generate(PROMPTS, _params(SEED))
    mixed = asyncio.run(_mixed(det_client, SEED))
    again = det_client.generate(PROMPTS, _params(SEED))
    assert _ids(alone) == _ids(mixed) == _ids(again)
    # Real sampling, not a fixed stream: the two samples of a prompt differ.
    assert all(row[0] != row[1] for row in _ids(alone))
    # Log-probs agree too (float32 matmuls over other batch shapes may move the last bits).
    for a_row, m_row in zip(alone, mixed):
        for a, m in zip(a_row, m_row):
            assert max(abs(x - y) for x, y in zip(a.logprobs, m.logprobs)) < 1e-4

    other = det_client.generate(PROMPTS, _params(SEED + 1))
    assert all(o != a for o_row, a_row in zip(_ids(other), _ids(alone)) for o, a in zip(o_row, a_row))


def test_unseeded_samples_differ_on_a_deterministic_server(det_client):
    """Without a seed the client picks a fresh one per call (the server would give every unseeded request seed 42)."""
    params = SamplingParams(max_new_tokens=24, n=2, temperature=1.0, ignore_eos=True)
    first, second = (_ids(det_client.generate(PROMPTS[:1], params))[0] for _ in range(2))
    assert first[0] != first[1] and first != second
