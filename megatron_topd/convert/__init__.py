"""HF <-> Megatron-Core conversion (Llama, Qwen2, Qwen3, Qwen3-MoE), shared by tools/ and by weight sync.

- `families`: HF config.json <-> ModelSpec;  `mapping`: which HF tensors make which Megatron parameter;
  `layout`: the tensor re-layouts (grouped QKV, gate/up, vocab padding, TP shard merging).
- `hf_to_megatron` / `megatron_to_hf`: the two converters behind tools/convert_*.py.
- `export.export_hf_weights`: full HF-named tensors streamed from a live TP/PP-sharded model (through global rank 0;
  `export_stage_hf_weights`: each pipeline stage's own tensors on that stage).
See docs/conversion.md.
"""
from megatron_topd.convert.export import export_hf_weights, export_stage_hf_weights, iter_buckets, stage_role
from megatron_topd.convert.families import (
    SUPPORTED_ARCHITECTURES,
    UnsupportedModelError,
    hf_config_from_spec,
    spec_from_hf_config,
)
from megatron_topd.convert.mapping import TensorMap, TensorNamesError, tensor_maps

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "TensorMap",
    "TensorNamesError",
    "UnsupportedModelError",
    "export_hf_weights",
    "export_stage_hf_weights",
    "hf_config_from_spec",
    "iter_buckets",
    "spec_from_hf_config",
    "stage_role",
    "tensor_maps",
]
