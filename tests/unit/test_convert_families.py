"""HF config.json <-> ModelSpec: each family's features are carried, unsupported ones are clear errors."""
import json

import pytest

from megatron_topd.convert.families import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    check_layout,
    hf_config_from_spec,
    spec_from_hf_config,
)
from megatron_topd.models.spec import RopeScaling
from megatron_topd.testing.tiny_families import FAMILIES, family_config

# config.json as published on the Hub (transformers-4 layout: rope_theta + rope_scaling, num_experts).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
    "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": False,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "torch_dtype": "bfloat16", "vocab_size": 128256,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1, "head_dim": 128,
    "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144, "max_position_embeddings": 40960,
    "mlp_only_layers": [], "model_type": "qwen3_moe", "moe_intermediate_size": 768, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
    "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
}


def tiny(family):
    return json.loads(family_config(family).to_json_string())


def test_family_features_are_carried():
    llama, qwen2, qwen3, moe = (spec_from_hf_config(tiny(f)) for f in FAMILIES)
    assert llama.rope_theta == 500000.0 and llama.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64)
    assert (llama.qkv_bias, llama.qk_norm, llama.tie_word_embeddings) == (False, False, False)
    assert qwen2.qkv_bias and not qwen2.qk_norm and qwen2.rope_theta == 1e6 and qwen2.rope_scaling is None
    assert qwen3.qk_norm and qwen3.tie_word_embeddings and qwen3.head_dim == 32 and qwen3.kv_channels == 32
    assert (moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size, moe.moe_norm_topk_prob) == (4, 2, 32, True)
    assert moe.qk_norm and moe.head_dim is None and moe.family == "qwen3_moe"


def test_hub_configs_parse():
    llama = spec_from_hf_config(LLAMA_31_8B)
    assert (llama.num_kv_heads, llama.ffn_hidden_size, llama.norm_eps) == (8, 14336, 1e-5)
    assert llama.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
    moe = spec_from_hf_config(QWEN3_30B_A3B)
    assert (moe.num_experts, moe.moe_router_topk, moe.moe_ffn_hidden_size, moe.head_dim) == (128, 8, 768, 128)
    assert moe.rope_scaling is None and moe.rope_theta == 1e6


@pytest.mark.parametrize("config", [LLAMA_31_8B, QWEN3_30B_A3B] + [tiny(f) for f in FAMILIES])
def test_config_roundtrip_through_spec(config, tmp_path):
    from transformers import AutoConfig

    spec = spec_from_hf_config(config)
    written = hf_config_from_spec(spec, base=config)
    assert spec_from_hf_config(written) == spec
    (tmp_path / "config.json").write_text(json.dumps(written))
    loaded = AutoConfig.from_pretrained(tmp_path)  # transformers reads what we write
    assert spec_from_hf_config(json.loads(loaded.to_json_string())) == spec


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(UnsupportedModelError) as err:
        spec_from_hf_config({**LLAMA_31_8B, "architectures": ["MistralForCausalLM"]})
    assert "MistralForCausalLM" in str(err.value)
    assert all(arch in str(err.value) for arch in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}}, "yarn"),
        ({"mlp_only_layers": [0, 3]}, "mlp_only_layers"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
        ({"use_sliding_window": True}, "sliding"),
    ],
)
def test_unsupported_features_are_errors(change, match):
    with pytest.raises(UnsupportedModelError, match=match):
        spec_from_hf_config({**QWEN3_30B_A3B, **change})


def test_layout_errors_name_the_field():
    spec = spec_from_hf_config(QWEN3_30B_A3B)  # 32 query heads, 4 kv heads, 48 layers
    check_layout(spec, 4, 4)
    with pytest.raises(ValueError, match="num_kv_heads=4"):
        check_layout(spec, 8, 1)
    with pytest.raises(ValueError, match="num_layers=48"):
        check_layout(spec, 1, 5)
