"""HF `config.json` <-> `ModelSpec` for the supported families (Llama, Qwen2, Qwen3, Qwen3-MoE).

Why through transformers' config classes: they apply each family's defaults and read both the hub layout of
config.json (`rope_theta` + `rope_scaling`, `num_experts`) and transformers-5's (`rope_parameters`,
`num_local_experts`). Anything a ModelSpec cannot express (other RoPE types, sliding windows, dense layers among MoE
layers, biases Megatron would not apply) is an error naming the field, never silently dropped.
"""
from __future__ import annotations

from typing import Any

from megatron_topd.models.spec import ModelSpec, RopeScaling

# HF architecture name -> family.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
ARCHITECTURE_OF = {family: arch for arch, family in SUPPORTED_ARCHITECTURES.items()}


class UnsupportedModelError(ValueError):
    """The HF model uses an architecture or a feature the converter does not map."""


def _config_class(family: str):
    import transformers

    return {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "qwen3_moe": transformers.Qwen3MoeConfig,
    }[family]


def family_of(config: dict[str, Any]) -> str:
    """The family of a raw config.json dict, from `architectures` (or `model_type` when that is missing)."""
    archs = config.get("architectures") or []
    if archs:
        if len(archs) != 1 or archs[0] not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"config.json architectures={archs}: supported architectures are {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        return SUPPORTED_ARCHITECTURES[archs[0]]
    model_type = config.get("model_type")
    if model_type in ARCHITECTURE_OF:
        return model_type
    raise UnsupportedModelError(
        f"config.json has no 'architectures' and model_type={model_type!r}: supported architectures are "
        f"{sorted(SUPPORTED_ARCHITECTURES)}"
    )


def _rope(cfg) -> tuple[float, RopeScaling | None]:
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    theta = params.get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta is None:
        raise UnsupportedModelError("config.json gives no rope_theta (nor rope_parameters.rope_theta)")
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type == "llama3":
        return float(theta), RopeScaling(
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedModelError(
        f"config.json rope type {rope_type!r} is not supported: use rope_type 'default' or 'llama3' "
        "(yarn/linear/dynamic scaling have no ModelSpec field)"
    )


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise UnsupportedModelError(message)


def spec_from_hf_config(config: dict[str, Any]) -> ModelSpec:
    """The ModelSpec of a raw HF config.json dict (raises UnsupportedModelError naming the offending field)."""
    family = family_of(config)
    _require(
        not config.get("quantization_config"),
        f"config.json has quantization_config {config.get('quantization_config')}: convert an unquantized checkpoint",
    )
    raw = {k: v for k, v in config.items() if k not in ("model_type", "transformers_version")}
    cfg = _config_class(family).from_dict(raw)
    _require(cfg.hidden_act == "silu", f"config.json hidden_act={cfg.hidden_act!r}: only 'silu' (SwiGLU) is supported")
    heads, hidden = cfg.num_attention_heads, cfg.hidden_size
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    theta, scaling = _rope(cfg)
    if family == "llama":
        _require(not cfg.attention_bias, "config.json attention_bias=true (Llama): q/k/v/o biases are not supported")
        _require(not cfg.mlp_bias, "config.json mlp_bias=true (Llama): MLP biases are not supported")
    if family == "qwen2":
        _require(
            not getattr(cfg, "use_sliding_window", False),
            "config.json use_sliding_window=true (Qwen2): sliding-window attention is not supported; set it false",
        )
    if family in ("qwen3", "qwen3_moe"):
        _require(not cfg.attention_bias, f"config.json attention_bias=true ({family}): biases are not supported")
        _require(
            not getattr(cfg, "use_sliding_window", False),
            f"config.json use_sliding_window=true ({family}): sliding-window attention is not supported",
        )
    moe: dict[str, Any] = {}
    if family == "qwen3_moe":
        _require(
            cfg.decoder_sparse_step == 1 and not list(cfg.mlp_only_layers or []),
            f"config.json decoder_sparse_step={cfg.decoder_sparse_step}, mlp_only_layers={cfg.mlp_only_layers}: "
            "only all-MoE models are supported (decoder_sparse_step 1, mlp_only_layers [])",
        )
        moe = dict(
            num_experts=cfg.num_experts,
            moe_router_topk=cfg.num_experts_per_tok,
            moe_ffn_hidden_size=cfg.moe_intermediate_size,
            moe_norm_topk_prob=bool(cfg.norm_topk_prob),
        )
    spec = ModelSpec(
        vocab_size=cfg.vocab_size,
        hidden_size=hidden,
        num_layers=cfg.num_hidden_layers,
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        ffn_hidden_size=cfg.intermediate_size,
        head_dim=None if head_dim * heads == hidden else head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(cfg.rms_norm_eps),
        qkv_bias=family == "qwen2",
        qk_norm=family in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(cfg.tie_word_embeddings),
        family=family,
        **moe,
    )
    spec.validate()
    return spec


def check_layout(spec: ModelSpec, tensor_parallel: int, pipeline_parallel: int) -> None:
    """Raise ValueError naming the field and the fix when `spec` cannot run at this TP/PP (before any heavy work)."""
    from megatron_topd.models.build import padded_vocab_size

    spec.validate(tensor_parallel, pipeline_parallel)
    padded_vocab_size(spec.vocab_size, tensor_parallel)


def hf_config_from_spec(spec: ModelSpec, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """A config.json dict (hub layout, readable by transformers 4 and 5) for `spec`.

    `base` (the original HF config, kept beside converted checkpoints) contributes the fields a ModelSpec does not
    carry (token ids, initializer range, ...); every architectural field comes from the spec.
    """
    family = spec.family
    if family not in ARCHITECTURE_OF:
        raise UnsupportedModelError(f"ModelSpec.family={family!r}: supported families are {sorted(ARCHITECTURE_OF)}")
    out = {k: v for k, v in (base or {}).items() if k not in _SPEC_KEYS}
    out.update(
        architectures=[ARCHITECTURE_OF[family]],
        model_type=family,
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.kv_channels,
        hidden_act="silu",
        max_position_embeddings=spec.max_position_embeddings,
        rms_norm_eps=spec.norm_eps,
        rope_theta=spec.rope_theta,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    if spec.rope_scaling is not None:
        rs = spec.rope_scaling
        out["rope_scaling"] = dict(
            rope_type="llama3",
            factor=rs.factor,
            low_freq_factor=rs.low_freq_factor,
            high_freq_factor=rs.high_freq_factor,
            original_max_position_embeddings=rs.original_max_position_embeddings,
        )
    if family == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif family == "qwen2":
        out.update(use_sliding_window=False)
    else:
        out.update(attention_bias=False, use_sliding_window=False)
    if family == "qwen3_moe":
        out.update(
            num_experts=spec.num_experts,
            num_experts_per_tok=spec.moe_router_topk,
            moe_intermediate_size=spec.moe_ffn_hidden_size,
            norm_topk_prob=spec.moe_norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    elif spec.is_moe:
        raise UnsupportedModelError(f"ModelSpec.family={family!r} with num_experts set: only qwen3_moe has experts")
    return out


# Fields written from the spec (and their transformers-5 spellings, dropped from `base` so they cannot disagree).
_SPEC_KEYS = {
    "architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
    "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
    "rope_theta", "rope_scaling", "rope_parameters", "tie_word_embeddings", "attention_bias", "mlp_bias",
    "use_sliding_window", "num_experts", "num_local_experts", "num_experts_per_tok", "moe_intermediate_size",
    "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "transformers_version", "layer_types",
}
