"""Issue 2 unit checks: model spec, FP8 validation, config loading, cpu_compat version guard."""
import json

import pytest
import torch

from megatron_topd.config import Config, load_config
from megatron_topd.models import ModelSpec, PrecisionConfig, padded_vocab_size
from megatron_topd.models.spec import RopeScaling
from megatron_topd.parallel import cpu_compat


def tiny_spec(**kw):
    base = dict(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64)
    return ModelSpec(**{**base, **kw})


def test_fp8_on_cpu_fails_at_validation_with_a_clear_message():
    assert not torch.cuda.is_available()
    with pytest.raises(RuntimeError, match=r"precision.fp8 requested but no CUDA GPU.*set precision.fp8=null"):
        PrecisionConfig(fp8="e4m3").validate()
    with pytest.raises(RuntimeError, match="no CUDA GPU"):
        load_config(overrides=["precision.fp8=hybrid", "precision.fp8_recipe=tensorwise"])
    with pytest.raises(ValueError, match="precision.fp8='e5m2'"):
        PrecisionConfig(fp8="e5m2").validate()
    PrecisionConfig(fp8=None, params_dtype="bf16").validate()


def test_model_spec_yaml_roundtrip_and_validation(tmp_path):
    spec = tiny_spec(rope_scaling=RopeScaling(factor=8.0), qk_norm=True, head_dim=16)
    spec.save_yaml(tmp_path / "s.yaml")
    assert ModelSpec.load_yaml(tmp_path / "s.yaml") == spec
    with pytest.raises(ValueError, match="tensor_parallel=4 must divide.*num_kv_heads=2"):
        spec.validate(tensor_parallel=4)
    with pytest.raises(ValueError, match="pipeline_parallel=3 must divide num_layers=2"):
        spec.validate(pipeline_parallel=3)
    with pytest.raises(ValueError, match="unknown ModelSpec fields \\['hidden'\\]"):
        ModelSpec.from_dict({**spec.to_dict(), "hidden": 3})


def test_padded_vocab_is_independent_of_tp():
    assert {padded_vocab_size(151936, tp) for tp in (1, 2, 4, 8)} == {151936}
    assert padded_vocab_size(100, 1) == padded_vocab_size(100, 4) == 128
    with pytest.raises(ValueError, match="not divisible by tensor_parallel=3"):
        padded_vocab_size(100, 3)


def test_config_yaml_and_dotted_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 5\nparallel:\n  tensor_parallel: 2\n")
    cfg = load_config(path, ["train.steps=7", "optim.lr=3e-5", "topd.variant=opd"])
    assert isinstance(cfg, Config)
    assert (cfg.train.steps, cfg.parallel.tensor_parallel, cfg.optim.lr, cfg.topd.variant) == (7, 2, 3e-5, "opd")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['train.stepz'\]"):
        load_config(path, ["train.stepz=1"])
    with pytest.raises(ValueError, match="teacher_spec.vocab_size"):
        load_config(overrides=[f"student={json.dumps(tiny_spec().to_dict())}",
                               f"teacher_spec={json.dumps(tiny_spec(vocab_size=101).to_dict())}"])


def test_cpu_compat_matches_installed_megatron_and_detects_moved_code():
    """Fails loudly when a new Megatron-Core moves a name or rewrites a patched line."""
    assert cpu_compat.check_version().startswith("0.19.")
    assert cpu_compat.verify() == []
    import megatron.core.optimizer.clip_grads as clip_grads

    with pytest.raises(cpu_compat.CpuCompatError, match="expected 1 occurrence"):
        cpu_compat._recompile(clip_grads, "clip_grad_by_total_norm_fp32", [("a line that is not there", "x", 1)])
    with pytest.raises(AttributeError):
        cpu_compat._resolve(clip_grads, "no_such_function")
