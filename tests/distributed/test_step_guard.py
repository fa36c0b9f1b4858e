"""Issue 9: a NaN on one rank is one decision on every rank (skip or stop), and nothing non-finite is stepped or
saved; cross entropy on a converted odd-vocabulary model equals HF's float64 value.

No wall-clock bound: every rank must come back from the step with the same decision (a rank left waiting in a
collective never returns, and the harness fails it with its traceback); the harness timeout is only a generous
backstop that covers the ranks' imports too."""
import pytest
import torch

from megatron_topd.parallel.spawn import run_on_ranks
from tests.distributed import distill_jobs, guard_jobs


@pytest.mark.slow
def test_nan_gradient_on_one_rank_skips_or_stops_every_rank(tmp_path):
    root = str(tmp_path / "init")
    run_on_ranks(distill_jobs.make_init, 1, root)

    skip = run_on_ranks(guard_jobs.nan_in_one_rank, 2, root, "skip", str(tmp_path / "skip"), timeout=900)
    assert [r["rank"] for r in skip] == [0, 1]  # both ranks returned from the step: neither was left waiting
    for r in skip:  # the clean rank 0 skips too: the decision was shared, not local
        assert "error" not in r and r["skipped"] is True and r["unchanged"] and r["finite"], r
        assert r["lr_steps"] == 0  # the LR schedule does not advance on a skipped step

    stop = run_on_ranks(guard_jobs.nan_in_one_rank, 2, root, "stop", str(tmp_path / "stop"), timeout=900)
    assert [r["rank"] for r in stop] == [0, 1] and all("skipped" not in r for r in stop), stop
    assert stop[0]["error"] == stop[1]["error"]  # the same clear error on every rank
    assert "rank(s) [1]" in stop[0]["error"] and "train.on_nonfinite=skip" in stop[0]["error"]
    assert all(r["unchanged"] and r["finite"] for r in stop)

    for policy in ("skip", "stop"):
        (finite,) = run_on_ranks(guard_jobs.checkpoint_is_finite, 1, str(tmp_path / policy / "step_00000001"))
        assert finite, policy


@pytest.mark.slow
def test_cross_entropy_excludes_padded_vocabulary(tmp_path):
    from transformers import AutoModelForCausalLM

    from megatron_topd.testing.tiny_families import build_family_model

    build_family_model(tmp_path / "hf", "llama", vocab_size=131, tokenizer=False)  # Megatron pads it to 256
    run_on_ranks(guard_jobs.convert, 1, str(tmp_path / "hf"), str(tmp_path / "mg"))
    tokens = torch.randint(0, 131, (2, 25), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float64).eval()
    with torch.no_grad():
        logits = hf(input_ids=tokens[:, :-1]).logits
    want = float(torch.nn.functional.cross_entropy(logits.reshape(-1, 131), tokens[:, 1:].reshape(-1)))
    for tp in (1, 2):
        got = run_on_ranks(guard_jobs.cross_entropy_at_tp, tp, str(tmp_path / "mg"), tokens, tp)
        for value in got:
            assert value == pytest.approx(want, rel=1e-5), f"TP={tp}"
