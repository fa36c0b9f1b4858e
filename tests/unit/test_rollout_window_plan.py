"""The probe's window request plan: prefix families (leader first, its prefixes after it on the same server)."""
from __future__ import annotations

import asyncio
import random

import pytest

from megatron_topd.rollout.client import (WINDOW_PROMPTS_PER_REQUEST, RequestJob, _checked_plan, prefix_families,
                                          window_request_plan)
from megatron_topd.rollout.pool import ServerPool


def _is_prefix(p, q) -> bool:
    return len(p) <= len(q) and q[: len(p)] == p


def _probe_like_prefixes(rng: random.Random, rows: int, candidates: int) -> list[list[int]]:
    """Rollout rows sharing prompts (4 samples each, some samples identical for a while), candidate prefixes per row,
    in the probe's order (row by row), plus exact duplicates."""
    prompts = [[rng.randrange(3, 50) for _ in range(rng.randrange(1, 6))] for _ in range(rows // 4 + 1)]
    out = []
    for r in range(rows):
        base = prompts[r // 4]
        response = [rng.randrange(3, 6) for _ in range(rng.randrange(1, 12))]  # tiny alphabet: shared starts
        row = base + response
        for t in sorted(rng.sample(range(len(base), len(row) + 1), min(candidates, len(response) + 1))):
            out.append(row[:t])
    return out + [list(p) for p in rng.sample(out, 5)]


@pytest.mark.parametrize("seed", range(20))
def test_prefix_families_cover_every_prompt_once_and_followers_extend_into_their_leader(seed):
    rng = random.Random(seed)
    prefixes = _probe_like_prefixes(rng, rows=rng.randrange(1, 40), candidates=3)
    families = prefix_families(prefixes)
    assert sorted(i for f in families for i in f) == list(range(len(prefixes)))
    leaders = [f[0] for f in families]
    for f in families:
        assert all(_is_prefix(prefixes[i], prefixes[f[0]]) for i in f[1:])
    for i in leaders:  # a leader extends into no other prompt (an exact copy of it is its follower)
        assert not any(_is_prefix(prefixes[i], prefixes[j]) and len(prefixes[j]) > len(prefixes[i])
                       for j in range(len(prefixes)))
    assert len({tuple(prefixes[i]) for i in leaders}) == len(leaders)
    # fewest possible families: one per distinct prompt that extends into no longer one
    maximal = {tuple(p) for p in prefixes if not any(_is_prefix(p, q) and len(q) > len(p) for q in prefixes)}
    assert len(families) == len(maximal)


def test_prefix_families_small_cases():
    p = [[1, 2, 3], [1, 2], [1, 2, 3, 4], [5], [1, 3], [5], [1, 2, 3, 9]]
    families = prefix_families(p)
    assert sorted(f[0] for f in families) == [2, 4, 5, 6]  # [1,2,3,4], [1,3], one [5], [1,2,3,9]
    assert {i: f[0] for f in families for i in f}[1] in (2, 6)
    assert prefix_families([[7]]) == [[0]]


def test_window_request_plan_deals_families_over_servers_leaders_first():
    rng = random.Random(0)
    rows = [[rng.randrange(3, 1000) for _ in range(30)] for _ in range(300)]
    prefixes = [row[:t] for row in rows for t in (10, 20, 30)]  # 300 families of 3
    for servers, jobs_want in ((1, 5), (8, 8), (3, 5)):
        urls = [f"http://s{k}" for k in range(servers)]
        plan = window_request_plan(prefixes, urls, min_shared_tokens=0)
        assert len(plan) == jobs_want and all(job.server is None for job in plan)
        assert _checked_plan(plan, len(prefixes)) == plan
        for job in plan:
            leaders, followers = job.requests
            assert len(leaders) <= WINDOW_PROMPTS_PER_REQUEST and len(followers) == 2 * len(leaders)
            assert all(len(prefixes[i]) == 30 for i in leaders)
            assert all(any(_is_prefix(prefixes[i], prefixes[j]) for j in leaders) for i in followers)
    one_each = window_request_plan([[1], [2]], ["http://a", "http://b", "http://c", "http://d"])
    assert one_each == [RequestJob([[0]]), RequestJob([[1]])]  # no followers: one request per job


def test_window_request_plan_sends_each_family_to_the_server_that_generated_its_row():
    rng = random.Random(1)
    rows = [[rng.randrange(3, 1000) for _ in range(30)] for _ in range(100)]
    prefixes = [row[:t] for row in rows for t in (10, 20, 30)]
    row_server = ["http://a" if r % 4 else "http://b" for r in range(100)]  # 75 rows on a, 25 on b
    hints = [row_server[i // 3] for i in range(len(prefixes))]
    hints[3 * 7 + 2] = "http://gone"  # not one of the client's servers: dealt like a row without a hint
    plan = window_request_plan(prefixes, ["http://a", "http://b"], hints, min_shared_tokens=0)
    assert _checked_plan(plan, len(prefixes)) == plan
    for job in plan:
        assert len(job.requests[0]) <= WINDOW_PROMPTS_PER_REQUEST
        if job.server is None:
            assert [i // 3 for i in job.requests[0]] == [7]
        else:
            assert {row_server[i // 3] for request in job.requests for i in request} == {job.server}
    assert sorted(len(job.requests[0]) for job in plan) == [1, 24, 25, 50]  # a: 74 rows in jobs of <= 50


def test_short_prefixes_go_in_one_request_per_job():
    """A second request pays off only when the followers would reuse enough prefix tokens (`min_shared_tokens`)."""
    rng = random.Random(2)
    rows = [[rng.randrange(3, 1000) for _ in range(30)] for _ in range(10)]
    prefixes = [row[:t] for row in rows for t in (10, 20, 30)]  # followers reuse 9 and 19 tokens: 14 on average
    for threshold, requests in ((14, 2), (15, 1), (256, 1)):
        (job,) = window_request_plan(prefixes, ["http://a"], min_shared_tokens=threshold)
        assert len(job.requests) == requests
        assert sorted(i for r in job.requests for i in r) == list(range(30))
        assert all(len(prefixes[i]) == 30 for i in job.requests[0][:10])  # leaders first either way


def test_a_plan_must_cover_every_prompt_exactly_once():
    with pytest.raises(ValueError, match="exactly one non-empty request"):
        _checked_plan([RequestJob([[0, 1]]), RequestJob([[1, 2]])], 3)
    with pytest.raises(ValueError, match="exactly one non-empty request"):
        _checked_plan([RequestJob([[0, 1], []]), RequestJob([[2]])], 3)
    with pytest.raises(ValueError, match="exactly one non-empty request"):
        _checked_plan([RequestJob([[0]])], 2)
    with pytest.raises(ValueError, match="RequestJob"):
        _checked_plan([[[0]]], 1)


def test_pool_prefers_the_affine_server_while_it_is_up_and_free():
    async def scenario():
        pool = ServerPool(["http://a", "http://b", "http://c"], max_inflight=1)
        b = await pool.acquire(prefer="http://b")
        assert b.url == "http://b"
        other = await pool.acquire(prefer="http://b")  # b is full: the least-loaded other server
        assert other.url == "http://a"
        await pool.release(b)
        pool.mark_down(b, "refused")
        assert (await pool.acquire(prefer="http://b")).url == "http://c"  # b is down
        await pool.release(other)
        assert (await pool.acquire()).url == "http://a"

    asyncio.run(scenario())
