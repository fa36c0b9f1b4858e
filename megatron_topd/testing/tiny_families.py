"""Tiny random Hugging Face checkpoints, one per supported family, built offline at test time.

Why beside `tiny_hf`: the converters must be shown on each family's distinguishing feature, which the shared tiny
Llama/Qwen factory does not cover: Llama-3 RoPE scaling, Qwen2 q/k/v biases, Qwen3 q/k RMSNorm with an explicit
head_dim and tied embeddings, and a Qwen3-MoE with a few experts. Weights are written by transformers'
`save_pretrained` (hub layout: per-expert tensors, several safetensors shards + index), so the converters read exactly
what a downloaded checkpoint looks like. The tokenizer comes from `tiny_hf.build_tokenizer`.

    from megatron_topd.testing.tiny_families import build_family_model
    hf_dir = build_family_model(tmp_path / "qwen3", "qwen3")
"""
from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3", "qwen3_moe")

# Shared shape: 4 layers (2 per stage at PP=2), 4 query / 2 kv heads (one kv group per rank at TP=2), vocab 1000
# (padded to 1024 in Megatron, so the padding path is exercised).
_COMMON = dict(
    vocab_size=1000,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    # Larger than HF's 0.02 so logits are far from uniform and a 1e-4 parity bound means something.
    initializer_range=0.1,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)


def family_config(family: str, **overrides):
    """The transformers config of the tiny model of `family` (overrides change any field, e.g. to scale it up)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    if family == "llama":  # Llama-3.1 style: large rope theta and llama3 frequency scaling, untied
        kw = dict(
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                # Small, so that all three frequency bands (kept, smoothed, divided) occur at head_dim 16.
                "original_max_position_embeddings": 64,
            },
            tie_word_embeddings=False,
        )
        cls, arch = LlamaConfig, "LlamaForCausalLM"
    elif family == "qwen2":  # q/k/v biases
        kw = dict(rope_theta=1000000.0, tie_word_embeddings=False)
        cls, arch = Qwen2Config, "Qwen2ForCausalLM"
    elif family == "qwen3":  # q/k RMSNorm, head_dim != hidden/heads, tied embeddings (like Qwen3-4B)
        kw = dict(rope_theta=1000000.0, head_dim=32, tie_word_embeddings=True)
        cls, arch = Qwen3Config, "Qwen3ForCausalLM"
    elif family == "qwen3_moe":  # every layer MoE, top-2 of 4 experts, renormalised (like Qwen3-30B-A3B)
        kw = dict(
            rope_theta=1000000.0,
            head_dim=16,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            norm_topk_prob=True,
            tie_word_embeddings=False,
        )
        cls, arch = Qwen3MoeConfig, "Qwen3MoeForCausalLM"
    else:
        raise ValueError(f"family={family!r}: choose one of {FAMILIES}")
    config = cls(**{**_COMMON, **kw, **overrides})
    config.architectures = [arch]
    return config


def build_family_model(
    out_dir: str | Path,
    family: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str = "200KB",
    tokenizer: bool = True,
    **overrides,
) -> Path:
    """Write config.json, safetensors shards + index and (optionally) a tokenizer for a tiny random `family` model.

    Norm weights and biases are randomised too (HF initialises them to 1 and 0), so a converter that drops or
    misplaces one of them changes the logits.
    """
    from transformers import AutoModelForCausalLM

    from megatron_topd.testing.tiny_hf import build_tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = family_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("mlp.gate.weight"):  # router: well-separated expert scores, no near-ties in top-k
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
    model.to(dtype).save_pretrained(out, max_shard_size=max_shard_size)
    if tokenizer:
        build_tokenizer(out, config.vocab_size, seed)
    return out
