"""Issue 2, must-show 1: identical training at every (TP, PP, DP) layout, against (1,1,1)."""
import pytest
import torch

from megatron_topd.parallel.spawn import run_on_ranks
from tests.distributed import train_jobs as jobs

LAYOUTS = [(2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)]


@pytest.mark.slow
def test_three_steps_match_reference_at_every_layout(tmp_path):
    init = str(tmp_path / "init")
    run_on_ranks(jobs.make_initial_checkpoint, 1, init)
    (ref_losses,) = run_on_ranks(jobs.train_from, 1, init, 1, 1, str(tmp_path / "ref"))
    assert len(set(ref_losses)) == 3 and all(3.0 < x < 6.0 for x in ref_losses), ref_losses

    roots = [str(tmp_path / "ref")]
    for tp, pp, dp in LAYOUTS:
        out = str(tmp_path / f"tp{tp}pp{pp}dp{dp}")
        losses = run_on_ranks(jobs.train_from, tp * pp * dp, init, tp, pp, out)
        for rank_losses in losses:  # every rank reports the same (broadcast) losses
            torch.testing.assert_close(
                torch.tensor(rank_losses), torch.tensor(ref_losses), rtol=1e-5, atol=0, msg=f"layout {(tp, pp, dp)}"
            )
        roots.append(out)

    (gathered,) = run_on_ranks(jobs.gather_via_checkpoint, 1, roots)
    ref = gathered[0]
    for (tp, pp, dp), params in zip(LAYOUTS, gathered[1:]):
        assert params.keys() == ref.keys()
        worst = max((params[k] - ref[k]).abs().max().item() for k in ref)
        assert worst <= 1e-5, f"layout {(tp, pp, dp)}: final parameters differ by {worst}"
