"""Early, specific errors for bad input: each names the argument and says what to change."""
from __future__ import annotations

import math

import torch

_FLOATS = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def logits(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOATS:
        raise TypeError(f"{fn}: {name} has dtype {x.dtype}; pass float32 or bfloat16 logits (float16/float64 also work)")
    if x.dim() < 1:
        raise ValueError(f"{fn}: {name} must have a vocabulary dimension last, got a 0-d tensor")


def same_shards(fn: str, student: torch.Tensor, teacher: torch.Tensor) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{fn}: student_logits {tuple(student.shape)} and teacher_logits {tuple(teacher.shape)} differ in shape; "
            f"both must be this rank's [..., V_local] shard of the same tokens, sharded over the same group "
            f"(run the teacher with the student's tensor-parallel size)"
        )
    if student.device != teacher.device:
        raise ValueError(f"{fn}: student_logits is on {student.device} but teacher_logits is on {teacher.device}")


def token_ids(fn: str, name: str, ids, shape: tuple, vocab_size: int, device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{fn}: {name} has dtype {ids.dtype}; token ids must be an integer tensor (e.g. torch.long)")
    if tuple(ids.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {tuple(ids.shape)}, expected {tuple(shape)} to match the logits")
    if ids.device != device:
        raise ValueError(f"{fn}: {name} is on {ids.device} but the logits are on {device}")
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(
                f"{fn}: {name} contains id {bad}, outside [0, vocab_size={vocab_size}); ids at or above vocab_size "
                f"are Megatron's padding and have no probability"
            )


def temperature(fn: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{fn}: temperature must be a finite number > 0, got {value!r}")
    return float(value)


def direction(fn: str, value) -> str:
    if value not in ("reverse", "forward"):
        raise ValueError(
            f"{fn}: direction={value!r}; use 'reverse' for KL(p_student || p_teacher) or 'forward' for "
            f"KL(p_teacher || p_student)"
        )
    return value


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32 arithmetic for fp32/bf16/fp16 input; float64 input stays float64 (gradcheck needs it)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def raise_nonfinite(fn: str, bad_rows: torch.Tensor, shape: tuple, local: dict[str, torch.Tensor]) -> None:
    """Raise for the first token whose combined statistics are NaN/Inf (every rank raises the same error)."""
    first = int(bad_rows.nonzero()[0, 0])
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), shape)) if shape else ()
    here = ", ".join(f"{k} {'finite' if bool(torch.isfinite(v[first]).all()) else 'NOT finite'}" for k, v in local.items())
    raise FloatingPointError(
        f"{fn}: NaN or Inf in the logits of token {index} ({int(bad_rows.sum())} token(s) affected). The check runs on "
        f"statistics combined over all vocabulary shards, so the bad value may sit on another rank; on this rank's "
        f"shard that row is: {here}. Fix the producer of the logits, or pass check_finite=False to let NaN/Inf "
        f"propagate into the outputs instead of raising."
    )
