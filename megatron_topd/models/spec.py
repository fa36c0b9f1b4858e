"""`ModelSpec`: one description of a Llama/Qwen-style decoder, shared by the model builder, HF conversion and configs.

Why our own dataclass instead of HF's config or Megatron's TransformerConfig: HF configs differ per family and carry
no parallel layout, Megatron's config carries training knobs. A ModelSpec is the architecture alone, saved as YAML
beside every checkpoint so a checkpoint can be rebuilt at any TP/PP without its HF folder.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class RopeScaling:
    """Llama-3 style RoPE frequency scaling (HF `rope_scaling` with rope_type "llama3")."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass
class ModelSpec:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    ffn_hidden_size: int
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (Qwen3 sets it explicitly)
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-6
    qkv_bias: bool = False  # Qwen2
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    tie_word_embeddings: bool = False
    # Mixture of experts (Qwen3-MoE style): every layer is MoE when num_experts is set.
    num_experts: int | None = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: int | None = None
    moe_norm_topk_prob: bool = True
    # Where the spec came from (e.g. "llama", "qwen2", "qwen3", "qwen3_moe"); informational.
    family: str = "llama"
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def kv_channels(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def is_moe(self) -> bool:
        return bool(self.num_experts)

    def validate(self, tensor_parallel: int = 1, pipeline_parallel: int = 1, *, first_stage_layers: int | None = None,
                 last_stage_layers: int | None = None) -> None:
        """Raise ValueError naming the field and the fix when the spec cannot be built on this layout.

        ``first_stage_layers`` / ``last_stage_layers`` (uneven pipeline stages, e.g. 126 layers at PP=4 as 30+32+32+32)
        take their layers first; the rest must split evenly over the middle stages.
        """
        for name in ("vocab_size", "hidden_size", "num_layers", "num_attention_heads", "num_kv_heads", "ffn_hidden_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelSpec.{name}={getattr(self, name)} must be positive")
        if self.num_attention_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelSpec.num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_kv_heads={self.num_kv_heads} (grouped-query attention)"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"ModelSpec.hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly"
            )
        if self.num_attention_heads % tensor_parallel or self.num_kv_heads % tensor_parallel:
            raise ValueError(
                f"tensor_parallel={tensor_parallel} must divide num_attention_heads={self.num_attention_heads} and "
                f"num_kv_heads={self.num_kv_heads}; choose a tensor-parallel size that divides both"
            )
        _check_stage_layers(self.num_layers, pipeline_parallel, first_stage_layers, last_stage_layers)
        if self.is_moe and not self.moe_ffn_hidden_size:
            raise ValueError("ModelSpec.moe_ffn_hidden_size must be set when num_experts is set")
        if self.is_moe and not 1 <= self.moe_router_topk <= self.num_experts:
            raise ValueError(
                f"ModelSpec.moe_router_topk={self.moe_router_topk} must be in [1, num_experts={self.num_experts}]"
            )

    # ---- YAML -------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelSpec fields {unknown}; known fields: {sorted(known)}")
        if d.get("rope_scaling") is not None and not isinstance(d["rope_scaling"], RopeScaling):
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def save_yaml(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load_yaml(cls, path: str | Path) -> "ModelSpec":
        return cls.from_dict(yaml.safe_load(Path(path).read_text()))


def _check_stage_layers(num_layers: int, pp: int, first: int | None, last: int | None) -> None:
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(
                f"pipeline_parallel={pp} must divide num_layers={num_layers}; choose a pipeline size that divides the "
                "layer count, or set parallel.first_stage_layers / parallel.last_stage_layers (uneven stages)"
            )
        return
    if pp < 2:
        raise ValueError("parallel.first_stage_layers / last_stage_layers need pipeline_parallel >= 2")
    for name, n in (("first_stage_layers", first), ("last_stage_layers", last)):
        if n is not None and n < 1:
            raise ValueError(f"parallel.{name}={n} must be >= 1")
    middle_stages = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if middle_stages == 0 and rest != 0 or middle_stages > 0 and (rest <= 0 or rest % middle_stages):
        raise ValueError(
            f"num_layers={num_layers} with parallel.first_stage_layers={first}, last_stage_layers={last} leaves "
            f"{rest} layers for {middle_stages} other stage(s): they must split evenly (and not be empty)"
        )
