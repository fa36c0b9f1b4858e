"""Megatron's fusions: one decision per stack (models/fusions.py), Megatron-Core agreeing with it on this machine, and
the planner counting what the SwiGLU fusion changes (plan/activations.py)."""
import pytest
import torch.nn.functional as F

from megatron_topd.models.fusions import CPU, GPU_TE, Stack, fusion_flags
from megatron_topd.plan import load_spec
from megatron_topd.plan.activations import layer_activations

FLAGS = ("bias_activation_fusion", "bias_dropout_fusion", "apply_rope_fusion", "gradient_accumulation_fusion",
         "masked_softmax_fusion", "persist_layer_norm")


def test_decision_per_stack():
    assert fusion_flags(CPU) == dict.fromkeys(FLAGS, False)
    gpu = fusion_flags(GPU_TE)
    assert gpu == {**dict.fromkeys(FLAGS, False), "bias_activation_fusion": True, "bias_dropout_fusion": True,
                   "apply_rope_fusion": True}
    # apex's wgrad kernel turns gradient-accumulation fusion on; without CUDA nothing is on, whatever is installed
    assert fusion_flags(Stack(cuda=True, triton=True, apex_gradient_accumulation=True))["gradient_accumulation_fusion"]
    assert fusion_flags(Stack(triton=True, te_fused_rope=True, apex_gradient_accumulation=True)) == fusion_flags(CPU)
    # torch.compile needs Triton on a GPU; TE's RoPE kernel alone does not bring the jit fusions
    no_triton = fusion_flags(Stack(cuda=True, te_fused_rope=True))
    assert no_triton["apply_rope_fusion"] and not no_triton["bias_activation_fusion"]
    # the fused causal softmax ignores an explicit mask (shared-prefix rows): never on
    assert not any(fusion_flags(Stack(True, True, True, True))[k] for k in ("masked_softmax_fusion",
                                                                              "persist_layer_norm"))


def _config(**flags):
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                             gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
                             normalization="RMSNorm", **flags)


def test_megatron_accepts_this_machines_flags_and_refuses_rope_fusion_without_te():
    flags = fusion_flags(Stack.installed())
    assert flags == fusion_flags(CPU)  # the CPU: every fusion off
    assert all(getattr(_config(**flags), k) == v for k, v in flags.items())
    with pytest.raises(ValueError, match="apply_rope_fusion is not available"):  # Megatron's own check agrees
        _config(**{**flags, "apply_rope_fusion": True})


def test_unfused_swiglu_keeps_two_ffn_widths_more_per_token():
    spec = load_spec("Llama-3.1-70B")
    f, t, e = spec.ffn_hidden_size, 8, 2
    fused = layer_activations(spec, tp=t, sp=True, profile="te_flash")
    unfused = layer_activations(spec, tp=t, sp=True, profile="te_flash", fused_swiglu=False)
    assert fused == layer_activations(spec, tp=t, sp=True, profile="te_flash", fused_swiglu=True)  # GPU+TE: fused
    assert unfused.per_token - fused.per_token == 2 * f * e / t  # SiLU's output and the linear half
    full = layer_activations(spec, tp=t, sp=True, profile="te_flash", recompute="full", fused_swiglu=False)
    assert full.recompute_per_token == unfused.per_token  # full recompute rebuilds the unfused layer
    local = layer_activations(spec, tp=t, profile="local_unfused", act_bytes=4)
    assert local == layer_activations(spec, tp=t, profile="local_unfused", act_bytes=4, fused_swiglu=False)
    assert local.per_token - layer_activations(spec, tp=t, profile="local_unfused", act_bytes=4,
                                               fused_swiglu=True).per_token == 2 * f * 4 / t
