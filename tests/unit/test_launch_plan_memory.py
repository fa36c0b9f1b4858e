"""The launch's plan step asks the memory planner before any node starts (issue 24): a layout it says does not fit
is refused naming the stage and its largest terms, unless launch.force; a CPU job or unreadable specs are not judged."""
import pytest

from megatron_topd.config import Config, from_dict
from megatron_topd.launch.plan import check_memory
from megatron_topd.overrides import apply_overrides
from megatron_topd.plan import load_spec


def _config(*overrides: str) -> Config:
    cfg = from_dict(Config, apply_overrides({}, [
        "parallel.tensor_parallel=8", "parallel.pipeline_parallel=4", "precision.params_dtype=bf16",
        "train.max_seq_length=16384", "train.max_tokens_per_microbatch=16384", "train.prompts_per_step=64",
        "rollout.n_samples=4", "launch.trainer_nodes=8", "launch.tasks_per_node=8", "launch.gpus_per_node=8",
        *overrides]))
    cfg.student = cfg.teacher_spec = load_spec("Llama-3.1-70B")
    return cfg


def test_a_layout_the_planner_refuses_stops_the_job_naming_stage_and_terms():
    cfg = _config("train.teacher_group_microbatches=24")  # no SP, no recompute: 4 x 16k microbatches in flight
    with pytest.raises(ValueError, match=r"does not fit: stage \d needs .* GB > 72.0 GB usable .* largest terms: "
                                         r"activations .*launch.force=true"):
        check_memory(cfg)
    forced = check_memory(_config("train.teacher_group_microbatches=24", "launch.force=true"))
    assert "does NOT fit" in forced and "launch.force=true" in forced


def test_a_layout_that_fits_passes_and_says_its_peak():
    cfg = _config("parallel.sequence_parallel=true", "parallel.recompute=full", "parallel.pipeline_parallel=2",
                  "parallel.last_stage_layers=36", "train.teacher_group_microbatches=16")
    verdict = check_memory(cfg)
    assert verdict.startswith("planner: TP8 PP2") and "GB of 80 GB" in verdict
    assert float(verdict.split("peaks at ")[1].split(" GB")[0]) < 72


def test_cpu_jobs_and_unreadable_specs_are_not_judged(tmp_path):
    assert "not judged" in check_memory(_config("launch.gpus_per_node=0"))
    cfg = _config(f"train.student_checkpoint={tmp_path / 'absent'}")
    cfg.student = None
    assert "not judged" in check_memory(cfg)
