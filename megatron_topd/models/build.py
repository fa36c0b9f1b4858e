"""Build a Megatron-Core GPTModel for a `ModelSpec` on the current parallel layout.

Transformer Engine layers when TE is importable and a GPU is present (needed for FP8), Megatron's local layers
otherwise (CPU, tests); Megatron's fused kernels where the machine runs them (models/fusions.py). Logits stay
vocabulary-parallel (`parallel_output=True`): our losses consume the shards.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from megatron_topd.models.fusions import Stack, fusion_flags
from megatron_topd.models.precision import PrecisionConfig, use_transformer_engine
from megatron_topd.models.shared_prefix import enable_token_positions
from megatron_topd.models.spec import ModelSpec

VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tensor_parallel: int, multiple: int = VOCAB_PAD_MULTIPLE) -> int:
    """Vocab rows as Megatron holds them: padded to `multiple`, independent of TP so checkpoints reshard."""
    padded = math.ceil(vocab_size / multiple) * multiple
    if padded % tensor_parallel:
        raise ValueError(
            f"padded vocab {padded} (vocab_size={vocab_size} rounded up to {multiple}) is not divisible by "
            f"tensor_parallel={tensor_parallel}; use a tensor-parallel size that divides {padded}"
        )
    return padded


def transformer_config(spec: ModelSpec, precision: PrecisionConfig | None = None, **overrides):
    """Megatron TransformerConfig for the spec on the current TP/PP layout (read from parallel_state)."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer import TransformerConfig

    precision = precision or PrecisionConfig()
    tp = ps.get_tensor_model_parallel_world_size()
    pp = ps.get_pipeline_model_parallel_world_size()
    spec.validate(tp, pp, first_stage_layers=overrides.get("num_layers_in_first_pipeline_stage"),
                  last_stage_layers=overrides.get("num_layers_in_last_pipeline_stage"))
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_kv_heads,
        kv_channels=spec.kv_channels,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=spec.qkv_bias,
        qk_layernorm=spec.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        params_dtype=precision.torch_dtype,
        pipeline_dtype=precision.torch_dtype,
        bf16=precision.params_dtype == "bf16",
        use_cpu_initialization=not on_gpu,
        **fusion_flags(Stack.installed()),  # on where this machine runs them, off on CPU (models/fusions.py)
        init_method_std=0.02,
        batch_p2p_sync=on_gpu,
        moe_token_dispatcher_type="alltoall",  # (dense models too: Megatron checks it against variable_seq_lengths)
    )
    if spec.is_moe:
        kwargs.update(
            num_moe_experts=spec.num_experts,
            moe_router_topk=spec.moe_router_topk,
            moe_ffn_hidden_size=spec.moe_ffn_hidden_size,
            # Qwen3-MoE: softmax over all experts, take top-k, renormalise iff norm_topk_prob.
            # Megatron: pre_softmax=False is top-k then softmax over the k (== renormalised softmax).
            moe_router_pre_softmax=not spec.moe_norm_topk_prob,
            moe_router_score_function="softmax",
            moe_grouped_gemm=False,
            moe_aux_loss_coeff=0.0,
            moe_router_load_balancing_type="none",
            moe_router_dtype="fp32",
        )
    if precision.fp8:
        kwargs.update(
            fp8=precision.fp8,
            fp8_recipe=precision.fp8_recipe,
            fp8_amax_history_len=precision.fp8_amax_history_len,
            fp8_amax_compute_algo=precision.fp8_amax_compute_algo,
            fp8_param=precision.fp8_param_gather,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(spec: ModelSpec, config):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if use_transformer_engine():
        return specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=spec.num_experts, moe_grouped_gemm=False, qk_layernorm=spec.qk_norm
        )
    if config.fp8:
        raise RuntimeError("FP8 needs Transformer Engine layers; see PrecisionConfig.validate for what is missing")
    return specs.get_gpt_layer_local_spec(
        num_experts=spec.num_experts, moe_grouped_gemm=False, qk_layernorm=spec.qk_norm, normalization="RMSNorm"
    )


def llama3_inv_freq(spec: ModelSpec) -> torch.Tensor:
    """RoPE inverse frequencies with Llama-3 scaling using all four of the spec's scaling parameters.

    Megatron's RotaryEmbedding takes only the factor (low/high/original are fixed at 1/4/8192), so we compute the
    frequencies ourselves, exactly as HF's `_compute_llama3_parameters` defines them.
    """
    dim = spec.kv_channels
    inv_freq = 1.0 / (spec.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    rs = spec.rope_scaling
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def build_gpt_model(
    spec: ModelSpec,
    *,
    pre_process: bool | None = None,
    post_process: bool | None = None,
    precision: PrecisionConfig | None = None,
    vp_stage: int | None = None,
    **config_overrides,
):
    """A GPTModel for this rank's pipeline stage. pre/post_process default to first/last stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel

    if pre_process is None:
        pre_process = ps.is_pipeline_first_stage()
    if post_process is None:
        post_process = ps.is_pipeline_last_stage()
    config = transformer_config(spec, precision, **config_overrides)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(spec, config),
        vocab_size=padded_vocab_size(spec.vocab_size, config.tensor_model_parallel_size),
        max_sequence_length=spec.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=spec.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=spec.rope_theta,  # a float: fractional thetas must not be truncated
        vp_stage=vp_stage,
    )
    if spec.rope_scaling is not None:
        model.rotary_pos_emb.inv_freq = llama3_inv_freq(spec).to(model.rotary_pos_emb.inv_freq.device)
    enable_token_positions(model)  # shared-prefix guidance rows (models/shared_prefix.py)
    if torch.cuda.is_available():
        model.cuda()
    return model
