"""Byte sizes of the dtypes the planner reasons about, and GiB/GB formatting (GPU memory is sold in GB = 1e9 B)."""
from __future__ import annotations

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1}
GB = 1e9
GiB = 2**30


def gb(n_bytes: float) -> float:
    return n_bytes / GB


def fmt_gb(n_bytes: float) -> str:
    return f"{n_bytes / GB:.1f}"
