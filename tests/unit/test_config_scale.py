"""Issue 9: every config section validates with errors that name the field; the long-context knobs map onto
Megatron's TransformerConfig; machine-dependent knobs fail clearly on this (CPU) machine."""
import pytest

from megatron_topd.config import ParallelConfig, load_config
from megatron_topd.models import ModelSpec

DEMO = "examples/cpu_demo.yaml"


@pytest.mark.parametrize("override, field", [
    ("rollout.device=tpu", "rollout.device"),
    ("rollout.max_new_tokens=600", "train.max_seq_length"),
    ("train.on_nonfinite=ignore", "train.on_nonfinite"),
    ("train.max_tokens_per_microbatch=100", "train.max_tokens_per_microbatch"),
    ("train.teacher_group_microbatches=0", "train.teacher_group_microbatches"),
    ("parallel.recompute=some", "parallel.recompute"),
    ("parallel.timeout_minutes=0", "parallel.timeout_minutes"),
    ("train.log_interval=5", "train.log_interval"),  # removed: read nowhere
    ("rollout.top_logprobs=5", "rollout.top_logprobs"),  # removed: read nowhere
])
def test_bad_fields_are_named(override, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(DEMO, [override])


def test_rollout_model_path_defaults_to_the_student_hf_folder():
    cfg = load_config(DEMO, ["train.student_hf_path=/models/student"])
    assert cfg.rollout.model_path == "/models/student"


def test_knobs_map_onto_megatron_fields():
    p = ParallelConfig(tensor_parallel=2, pipeline_parallel=4, recompute="full", first_stage_layers=30,
                       last_stage_layers=32)
    p.validate()
    assert p.model_overrides() == {
        "sequence_parallel": False, "context_parallel_size": 1, "recompute_granularity": "full",
        "recompute_method": "uniform", "recompute_num_layers": 1, "num_layers_in_first_pipeline_stage": 30,
        "num_layers_in_last_pipeline_stage": 32, "variable_seq_lengths": True}


def test_uneven_stages_validate_against_the_layer_count():
    spec = ModelSpec(vocab_size=100, hidden_size=64, num_layers=126, num_attention_heads=8, num_kv_heads=8,
                     ffn_hidden_size=128)
    with pytest.raises(ValueError, match="pipeline_parallel=4 must divide num_layers=126"):
        spec.validate(1, 4)
    spec.validate(1, 4, first_stage_layers=30, last_stage_layers=32)  # 30 + 32 + 32 + 32
    with pytest.raises(ValueError, match="leaves 65 layers for 2 other stage"):
        spec.validate(1, 4, first_stage_layers=30, last_stage_layers=31)


def test_machine_dependent_knobs_fail_clearly_without_transformer_engine():
    with pytest.raises(ValueError, match="sequence_parallel=true needs Transformer Engine"):
        ParallelConfig(tensor_parallel=2, sequence_parallel=True).check_machine()
    with pytest.raises(ValueError, match="context_parallel=2 needs Transformer Engine"):
        ParallelConfig(context_parallel=2).check_machine()
    with pytest.raises(ValueError, match="sequence_parallel=true needs parallel.tensor_parallel >= 2"):
        ParallelConfig(sequence_parallel=True).validate()
