"""Issue 12, must-show 1: the planner's weight, gradient and optimizer bytes equal those of the real student.

The student is built as the trainer builds it (`build_gpt_model` + `wrap_ddp` + `build_optimizer`: Megatron DDP with
fp32 grad buffers and the DistributedOptimizer), takes one optimizer step (Adam's state is allocated lazily), and
every byte is counted from the tensors' storages on every rank. Exact equality, per rank, dense and MoE.
"""
import pytest

from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.plan.model_state import student_state
from megatron_topd.plan.param_shapes import stage_params
from megatron_topd.plan.stages import stage_layers
from tests.distributed import plan_jobs as jobs

# (spec, TP, PP, params dtype[, first-stage layers, last-stage layers]); DP = world / (TP x PP).
CASES = {
    1: [("dense", 1, 1, "bf16"), ("moe", 1, 1, "fp32")],
    2: [("dense", 2, 1, "bf16"), ("moe", 2, 1, "fp32"), ("dense", 1, 2, "bf16"), ("moe", 1, 2, "bf16", 1, 3),
        ("dense", 1, 1, "bf16"), ("moe", 1, 1, "fp32")],
    4: [("dense", 2, 2, "bf16"), ("moe", 2, 2, "fp32")],
}


def _check(world: int) -> set:
    seen = set()
    results = run_on_ranks(jobs.count_layouts, world, CASES[world], timeout=600)
    for rank_results in results:
        for case, got in zip(CASES[world], rank_results):
            spec = {"dense": jobs.DENSE, "moe": jobs.MOE}[case[0]]
            tp, pp, dtype = case[1:4]
            first, last = case[4:6] if len(case) > 4 else (None, None)
            layers = stage_layers(spec.num_layers, pp, first, last)
            stage = got["pp_rank"]
            shapes = [(p.name, p.shape) for p in
                      stage_params(spec, tp, layers[stage], first=stage == 0, last=stage == pp - 1, pp=pp)]
            assert shapes == got["names"], case
            want = student_state(spec, tp=tp, pp=pp, stage=stage, layers=layers, dp=got["dp"],
                                 dp_rank=got["dp_rank"], params_dtype=dtype)
            assert (want.weights, want.gradients, want.optimizer) == (
                got["weights"], got["gradients"], got["optimizer"]), (case, got["pp_rank"], got["dp_rank"])
            assert got["optimizer"] > 0
            seen.add((case[0], tp, pp, got["dp"]))
    return seen


@pytest.mark.slow
def test_state_bytes_equal_the_real_model_at_every_layout():
    seen = _check(1) | _check(2) | _check(4)
    for kind in ("dense", "moe"):
        for layout in [(1, 1, 1), (2, 1, 1), (1, 2, 1), (2, 2, 1), (1, 1, 2)]:
            assert (kind, *layout) in seen
