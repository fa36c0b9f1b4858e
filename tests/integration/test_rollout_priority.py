"""`rollout.windows_first`: on a student server run with SGLang's priority scheduling, the probe's window requests go
ahead of queued (async) rollouts; without it they wait behind every rollout queued before them."""
from __future__ import annotations

import asyncio

import pytest

from megatron_topd.config import Config
from megatron_topd.rollout import SamplingParams, SGLangClient
from megatron_topd.rollout.client import ROLLOUT_PRIORITY, WINDOW_PRIORITY
from megatron_topd.rollout.config import student_server_flags, windows_ahead
from tests.integration.conftest import start_server

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

ROLLOUTS = [[(13 * i + j) % 990 + 5 for j in range(8)] for i in range(8)]


async def _rollouts_done_while_window_waits(url: str, window_priority: int | None) -> tuple[int, int]:
    """Eight rollouts queue on a server that runs two requests at a time; then one window request arrives. Returns
    (rollouts finished when it was sent, rollouts finished while it was out)."""
    client = SGLangClient([url], vocab_size=1000, context_length=512, window_priority=window_priority)
    finished: list[int] = []

    async def rollout_done(i, gens):
        finished.append(i)

    rollouts = asyncio.ensure_future(client.agenerate(
        ROLLOUTS, SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True), on_prompt_done=rollout_done,
        priority=ROLLOUT_PRIORITY if window_priority is not None else None))
    await asyncio.sleep(0.3)  # all eight queued, two running
    at_send = len(finished)
    await client.acontinue_prefixes([[5, 6, 7, 8]], max_new_tokens=4, n=1, temperature=0.0, top_p=1.0, seed=None)
    while_out = len(finished) - at_send
    await rollouts
    return at_send, while_out


def test_windows_jump_the_rollout_queue_only_where_priority_scheduling_runs(tiny_model_dir, tmp_path):
    cfg = Config()
    cfg.train.async_rollouts = True
    assert windows_ahead(cfg.rollout, True) and student_server_flags(cfg.rollout, True) == ["--enable-priority-scheduling"]
    assert student_server_flags(cfg.rollout, False) == [] and not windows_ahead(cfg.rollout, False)
    cfg.rollout.windows_first = False
    assert student_server_flags(cfg.rollout, True) == []

    two_at_a_time = ["--max-running-requests", "2"]
    servers = {"priority": start_server(tiny_model_dir, tmp_path / "p", extra_args=[*two_at_a_time,
                                                                                   "--enable-priority-scheduling"]),
               "fcfs": start_server(tiny_model_dir, tmp_path / "f", extra_args=two_at_a_time)}
    try:
        seen = {name: asyncio.run(_rollouts_done_while_window_waits(s.wait_healthy().url, WINDOW_PRIORITY))
                for name, s in servers.items()}
    finally:
        for s in servers.values():
            s.stop()
    print("rollouts finished (when the window was sent, while it was out):", seen)
    # with priorities: admitted at the first free slot, so at most the running pair finishes meanwhile
    assert seen["priority"][0] <= 2 and seen["priority"][1] <= 2, seen
    # without: the priorities are ignored and the window waits behind every rollout queued before it
    assert seen["fcfs"][0] <= 2 and seen["fcfs"][1] >= 8 - seen["fcfs"][0] - 2, seen
