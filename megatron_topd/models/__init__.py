"""Model provider: `ModelSpec` (architecture) and `build_gpt_model` (Megatron-Core GPTModel on the current layout)."""
from megatron_topd.models.build import build_gpt_model, padded_vocab_size, transformer_config
from megatron_topd.models.precision import PrecisionConfig
from megatron_topd.models.spec import ModelSpec, RopeScaling

__all__ = ["ModelSpec", "RopeScaling", "PrecisionConfig", "build_gpt_model", "padded_vocab_size", "transformer_config"]
