"""Window requests follow their rows: each prefix goes to the student server that generated its row, whose radix
cache holds the row (runs before test_rollout_failures.py, which kills the spare server)."""
from __future__ import annotations

import pytest

from megatron_topd.rollout import SamplingParams, SGLangClient
from tests.integration.conftest import ServerLog, flush_cache

pytestmark = [pytest.mark.sglang, pytest.mark.slow]


def test_windows_go_to_the_server_that_generated_their_row(rollout_target, spare_server):
    servers = [rollout_target.server, spare_server]
    client = SGLangClient([s.url for s in servers], vocab_size=1000, context_length=512)
    for s in servers:
        flush_cache(s)
    prompts = [[(31 * i + 7 * j) % 990 + 5 for j in range(20)] for i in range(6)]
    gens = client.generate(prompts, SamplingParams(max_new_tokens=24, temperature=0.0, ignore_eos=True))
    rows = [p + row[0].token_ids for p, row in zip(prompts, gens)]
    made_on = [row[0].server for row in gens]
    assert sorted(set(made_on)) == sorted(client.urls)  # six requests at once: spread over both servers
    prefixes = [row[:t] for row in rows for t in (25, 32, 40)]
    hints = [made_on[i // 3] for i in range(len(prefixes))]

    def windows(route):
        logs = [ServerLog(s) for s in servers]
        out = client.continue_prefixes(prefixes, max_new_tokens=4, n=1, temperature=0.0, top_p=1.0, seed=None,
                                       servers=route)
        # each server prefilled (or found cached) the prompt tokens of the prefixes routed to it
        wants = [sum(len(p) for p, url in zip(prefixes, route) if url == s.url) for s in servers]
        new, cached = (sum(x) for x in zip(*(log.prefill_tokens(want) for log, want in zip(logs, wants))))
        return out, new, cached

    _, new, cached = windows(hints)
    # every prefix found its row in the cache: one new token each (the one whose logits start the window)
    assert new == len(prefixes) and cached == sum(len(p) - 1 for p in prefixes)
    swapped = [client.urls[1 - client.urls.index(h)] for h in hints]
    _, new, _ = windows(swapped)  # each row's leader now meets a server that never saw the row
    assert new >= sum(len(rows[r][:40]) - 1 for r in range(len(rows))) - 3 * len(rows)
