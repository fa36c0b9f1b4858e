"""Issue 2, must-show 2: a TP2 checkpoint reloads at TP1 and TP2xPP2 with the same eval loss; resume == no stop."""
import pytest
import torch

from megatron_topd.parallel.spawn import run_on_ranks
from tests.distributed import train_jobs as jobs


@pytest.mark.slow
def test_checkpoint_reshards_and_resumes_exactly(tmp_path):
    init, ckpt = str(tmp_path / "init"), str(tmp_path / "ckpt")
    run_on_ranks(jobs.make_initial_checkpoint, 1, init)
    straight = run_on_ranks(jobs.train_save_continue, 2, init, ckpt)

    # Resume at the same layout (TP2): optimizer, scheduler, RNG and data position restored -> bitwise equal step 3.
    resumed = run_on_ranks(jobs.resume_and_continue, 2, ckpt, 2, 1, True)
    for s, r in zip(straight, resumed):
        assert r["info"] == {"step": 2, "extra": {"data_position": 2}, "rng_restored": True}
        assert r["eval"] == s["eval"]
        assert r["loss3"] == s["loss3"]
        for name, value in s["params"].items():
            assert torch.equal(r["params"][name], value), name
        assert torch.equal(r["rng"], s["rng"]), "RNG state not restored"

    # Reshard: TP1 and TP2xPP2 see the same model (eval loss equal up to float reduction order).
    (tp1,) = run_on_ranks(jobs.resume_and_continue, 1, ckpt, 1, 1, False)
    tp2pp2 = run_on_ranks(jobs.resume_and_continue, 4, ckpt, 2, 2, False)
    expected = straight[0]["eval"]
    assert tp1["info"]["rng_restored"] is False
    assert tp1["eval"] == pytest.approx(expected, rel=1e-6)
    for r in tp2pp2:
        assert r["eval"] == pytest.approx(expected, rel=1e-6)
