"""Numeric precision of the student (and teacher): fp32 / bf16 params and FP8 matmuls via Transformer Engine.

FP8 is never a silent fallback: asking for it where Transformer Engine or an FP8-capable GPU is missing is an error
at config validation, before any process group or model exists.
"""
from __future__ import annotations

from dataclasses import dataclass

FP8_FORMATS = ("e4m3", "hybrid")
# Recipes as Transformer Engine names them, with the lowest GPU compute capability each runs on.
FP8_RECIPES = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}


@dataclass
class PrecisionConfig:
    params_dtype: str = "fp32"  # fp32 | bf16 (bf16 keeps fp32 main params in the optimizer)
    fp8: str | None = None  # None | e4m3 | hybrid
    fp8_recipe: str = "delayed"  # delayed | tensorwise | blockwise | mxfp8
    fp8_amax_history_len: int = 1024
    fp8_amax_compute_algo: str = "max"
    fp8_param_gather: bool = False

    @property
    def torch_dtype(self):
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16}[self.params_dtype]

    def validate(self) -> None:
        if self.params_dtype not in ("fp32", "bf16"):
            raise ValueError(f"precision.params_dtype={self.params_dtype!r}: use 'fp32' or 'bf16'")
        if self.fp8 is None:
            return
        if self.fp8 not in FP8_FORMATS:
            raise ValueError(f"precision.fp8={self.fp8!r}: use one of {FP8_FORMATS} or null to disable FP8")
        if self.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"precision.fp8_recipe={self.fp8_recipe!r}: use one of {sorted(FP8_RECIPES)}")
        check_fp8_available(self.fp8_recipe)


def use_transformer_engine() -> bool:
    """Build Transformer Engine layers: only with a GPU and an importable TE (FP8 needs both)."""
    import torch

    return torch.cuda.is_available() and transformer_engine_available()[0]


def transformer_engine_available() -> tuple[bool, str]:
    """(available, reason). A broken TE install raises RuntimeError on import, not ImportError: both mean 'no'."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - ImportError, RuntimeError (broken install), OSError (missing libs)
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


def check_fp8_available(recipe: str) -> None:
    """Raise RuntimeError saying exactly what is missing for FP8 with `recipe` on this machine."""
    import torch

    fix = "set precision.fp8=null to train in bf16/fp32, or run on an FP8-capable GPU with Transformer Engine"
    if not torch.cuda.is_available():
        raise RuntimeError(f"precision.fp8 requested but no CUDA GPU is visible (FP8 needs Hopper or newer); {fix}")
    need = FP8_RECIPES[recipe]
    have = torch.cuda.get_device_capability()
    if have < need:
        raise RuntimeError(
            f"precision.fp8_recipe={recipe!r} needs compute capability >= {need[0]}.{need[1]}, this GPU "
            f"({torch.cuda.get_device_name()}) has {have[0]}.{have[1]}; {fix}"
        )
    ok, why = transformer_engine_available()
    if not ok:
        raise RuntimeError(
            f"precision.fp8 requested but Transformer Engine is not importable ({why}); "
            f"install it with `pip install -e .[te]` (or use an NGC PyTorch container), or {fix}"
        )
