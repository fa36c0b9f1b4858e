"""Issue 9, must-show 1: the step's data path (token-budget microbatches of mixed shapes, teacher groups, guidance
KL at weighted positions only, gradients accumulated over schedule calls) equals the float64 full-batch topd_loss:
values, per-token metrics and gradients, for opd / opd_suppress / topd at (TP,PP,DP) = (2,1,1), (1,2,1), (2,2,1),
(1,1,2); and topd with its guidance windows inside their rollout rows (shared prefix: a dense attention mask and
per-token RoPE positions) against the same reference."""
import pytest
import torch

from megatron_topd.parallel.spawn import run_on_ranks
from tests.distributed import distill_jobs as jobs

# Each layout also turns on a long-context knob that runs on CPU (recompute does not change the math; uneven
# stages move layers between ranks): full / selective recompute, uneven pipeline stages (4 layers as 1 + 3).
RUNS = [((2, 1, 1), {"recompute": "full"}), ((1, 2, 1), {"first_stage_layers": 1}),
        ((2, 2, 1), {"recompute": "selective", "last_stage_layers": 3}), ((1, 1, 2), {})]
METRICS = ("loss", "opd_loss", "traj_loss", "mean_token_kl", "entropy", "logprob_diff_mean", "logprob_diff_max")


@pytest.mark.slow
def test_distill_step_equals_full_batch_reference_at_every_layout(tmp_path):
    root = str(tmp_path / "init")
    run_on_ranks(jobs.make_init, 1, root)
    (ref,) = run_on_ranks(jobs.reference, 1, root)
    assert ref["topd"]["traj_loss"] > 0 and ref["opd_suppress"]["opd_loss"] < ref["opd"]["opd_loss"]

    roots = []
    runs = RUNS
    for (tp, pp, dp), knobs in runs:
        out = str(tmp_path / f"tp{tp}pp{pp}dp{dp}{''.join(map(str, knobs.values()))}")
        per_rank = run_on_ranks(jobs.parallel_step, tp * pp * dp, root, tp, pp, out, timeout=600, **knobs)
        roots.append(out)
        for rank, res in enumerate(per_rank):
            for variant in jobs.RUN_VARIANTS:
                got, want = res[variant], ref[jobs.REFERENCE_OF.get(variant, variant)]
                assert not got["skipped"]
                for name in METRICS:
                    assert got[name] == pytest.approx(want[name], rel=2e-5, abs=1e-7), \
                        f"{name} {variant} layout {(tp, pp, dp)} {knobs} rank {rank}"
        if dp == 2:  # both replicas held rows and guidance windows
            assert {r["topd"]["windows_local"] for r in per_rank} == {1, 2}

    (updates,) = run_on_ranks(jobs.updates_via_checkpoint, 1, root, roots)
    for ((tp, pp, dp), knobs), per_variant in zip(runs, updates):
        for variant in jobs.RUN_VARIANTS:
            want = ref[jobs.REFERENCE_OF.get(variant, variant)]["grads"]
            got = per_variant[variant]
            assert got.keys() == want.keys()
            for k in want:
                torch.testing.assert_close(got[k].double(), want[k], rtol=2e-4, atol=2e-6,
                                           msg=f"grad {k} {variant} layout {(tp, pp, dp)} {knobs}")
            assert max(want[k].abs().max() for k in want) > 1e-4  # the gradients are not trivially zero
