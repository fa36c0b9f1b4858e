"""`rollout.windows_first`: on a student server run with SGLang's priority scheduling, the probe's window requests go
ahead of queued (async) rollouts; at the rollouts' own priority they wait behind every rollout queued before them."""
from __future__ import annotations

import asyncio

import pytest

from megatron_topd.config import Config
from megatron_topd.rollout import SamplingParams, SGLangClient
from megatron_topd.rollout.client import ROLLOUT_PRIORITY, WINDOW_PRIORITY
from megatron_topd.rollout.config import student_server_flags, windows_ahead
from tests.integration.conftest import await_load, start_server

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

ROLLOUTS = [[(13 * i + j) % 990 + 5 for j in range(8)] for i in range(8)]
# How long the first two rollouts run while the other six reach the scheduler. With 160, one run in 10 beside two
# CPU-burning processes saw (2 running, 4 waiting) until the first two finished: SGLang's HTTP process, starved,
# took longer to hand over the last two requests.
ROLLOUT_TOKENS = 320


async def _rollouts_done_while_window_waits(url: str, window_priority: int) -> tuple[int, int]:
    """Eight rollouts queue on a server that runs two requests at a time; once the server reports all eight in its
    scheduler (two running, six waiting), one window request arrives. Returns (rollouts finished when it was sent,
    rollouts finished while it was out)."""
    client = SGLangClient([url], vocab_size=1000, context_length=512, window_priority=window_priority)
    finished: list[int] = []

    async def rollout_done(i, gens):
        finished.append(i)

    rollouts = asyncio.ensure_future(client.agenerate(
        ROLLOUTS, SamplingParams(max_new_tokens=ROLLOUT_TOKENS, temperature=0.0, ignore_eos=True),
        on_prompt_done=rollout_done,
        priority=ROLLOUT_PRIORITY))
    await await_load(
        url, "all eight rollouts in the scheduler (2 running, 6 waiting)",
        lambda load: (load["num_running_reqs"], load["num_waiting_reqs"]) == (2, 6),
        give_up=lambda: (f"rollouts {finished} finished first" if finished
                         else rollouts.exception() if rollouts.done() else None))
    at_send = len(finished)
    await client.acontinue_prefixes([[5, 6, 7, 8]], max_new_tokens=4, n=1, temperature=0.0, top_p=1.0, seed=None)
    while_out = len(finished) - at_send
    await rollouts
    return at_send, while_out


def test_windows_jump_the_rollout_queue_on_a_priority_scheduling_server(tiny_model_dir, tmp_path):
    cfg = Config()
    assert windows_ahead(cfg.rollout, True) and student_server_flags(cfg.rollout, True) == ["--enable-priority-scheduling"]
    assert student_server_flags(cfg.rollout, False) == [] and not windows_ahead(cfg.rollout, False)
    cfg.rollout.windows_first = False
    assert student_server_flags(cfg.rollout, True) == []

    server = start_server(tiny_model_dir, tmp_path, extra_args=["--max-running-requests", "2",
                                                               *student_server_flags(Config().rollout, True)])
    try:
        url = server.wait_healthy().url
        seen = {name: asyncio.run(_rollouts_done_while_window_waits(url, priority))
                for name, priority in (("window priority", WINDOW_PRIORITY), ("rollout priority", ROLLOUT_PRIORITY))}
    finally:
        server.stop()
    print("rollouts finished (when the window was sent, while it was out):", seen)
    # ahead: admitted at the first free slot, so at most the running pair finishes meanwhile
    assert seen["window priority"][0] <= 2 and seen["window priority"][1] <= 2, seen
    # at the rollouts' priority: first come, first served - behind every rollout queued before it
    at_send, while_out = seen["rollout priority"]
    assert at_send <= 2 and while_out >= 8 - at_send - 2, seen
