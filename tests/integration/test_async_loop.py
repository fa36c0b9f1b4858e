"""train.async_rollouts=true: the whole loop at TP=2 against real SGLang servers, with the TIS correction on.
Step k trains on samples generated with the weights of after step k-2 (version k-1; for k <= 1 the student's initial
weights, version 0, which the run pushes first to the shared servers it is pointed at), never a mix of versions; the
metrics log staleness and the wait for the prefetch."""
import json
import math

import pytest

from megatron_topd.parallel.spawn import run_on_ranks
from tests.integration.test_loop_topd import demo_overrides, run_training


@pytest.mark.slow
@pytest.mark.sglang
def test_async_rollouts_are_one_step_off_policy_with_recorded_versions(tmp_path, demo_assets, demo_servers):
    out = tmp_path / "run"
    overrides = demo_overrides(demo_assets, tmp_path, servers=demo_servers) + [
        "rollout.max_new_tokens=16", "topd.window=6",
        "train.save_interval=10", "train.steps=3", "train.async_rollouts=true", "train.rollout_is_correction=true",
        "train.rollout_is_cap=2.0",
    ]
    ranks = run_on_ranks(run_training, 2, overrides, timeout=1500)
    reduced = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s") and k != "sync_mb"} for r in rows]  # noqa: E731
    assert reduced(ranks[0]) == reduced(ranks[1])
    rows = ranks[0]
    versions = []
    for step in range(3):
        records = [json.loads(x) for x in (out / "rollouts" / f"step_{step:08d}.jsonl").read_text().splitlines()]
        versions.append({r["weight_version"] for r in records})
        assert len(records) == 4
    assert all(len(v) == 1 for v in versions), f"a batch mixed weight versions: {versions}"
    assert versions[0] == {"0"}  # the initial student, pushed to the shared servers before step 0
    assert versions[1] == {"0"}  # prefetched during step 0: the initial weights
    assert versions[2] == {"1"}  # prefetched during step 1: the weights pushed after step 0
    assert [r["rollout_staleness"] for r in rows] == [0.0, 1.0, 1.0]
    assert [r["rollout_weight_version"] for r in rows] == [0.0, 0.0, 1.0]
    for r in rows:
        assert math.isfinite(r["loss"]) and 0 < r["loss"] < 50 and r["grad_norm"] > 0
        assert r["candidates"] > 0
    # rank 0 (which samples) waited for a prefetch at the end of steps 0 and 1 (for steps 1 and 2); none is started
    # beyond the last step, so step 2 waited for nothing: exactly 0.0, as on a synchronous run
    waits = [r["rollout_wait_s"] for r in rows]
    assert waits[0] > 0.0 and waits[1] > 0.0 and waits[2] == 0.0, waits
    assert (out / "checkpoints" / "latest_step.txt").read_text() == "3"
