"""Group `(hf_name, tensor)` pairs into size-limited buckets, checking names and tensors on the way.

A bucket holds tensors of one dtype only, so a flat byte buffer of the bucket keeps every tensor aligned to its
element size (SGLang's receiver requires it) and the receiver can view each slice back as its dtype.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch


def iter_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (name, tensor), each under `max_bytes` unless one tensor alone is larger."""
    if max_bytes < 1:
        raise ValueError(f"bucket size {max_bytes} bytes: use a positive size (rollout.sync_bucket_mb)")
    seen: set[str] = set()
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for item in named_tensors:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise TypeError(f"weight sync expects (hf_name, tensor) pairs, got {type(item).__name__}")
        name, t = item
        if not isinstance(name, str) or not name:
            raise TypeError(f"weight name {name!r} must be a non-empty string")
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"weight {name}: expected a torch.Tensor, got {type(t).__name__}")
        if name in seen:
            raise ValueError(f"weight {name} appears twice in the export: every HF name must be sent once")
        seen.add(name)
        nbytes = t.numel() * t.element_size()
        if bucket and (size + nbytes > max_bytes or t.dtype != bucket[0][1].dtype):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket
    if not seen:
        raise ValueError("weight sync got no tensors: the export iterator was empty")


def flatten(bucket: list[tuple[str, torch.Tensor]], device: torch.device) -> torch.Tensor:
    """One uint8 buffer holding the bucket's tensors back to back (the layout of SGLang's flattened_bucket)."""
    return torch.cat([t.detach().to(device).contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])


def meta(bucket: list[tuple[str, torch.Tensor]]) -> dict:
    """names/dtypes/shapes as SGLang's update requests spell them."""
    return {
        "names": [n for n, _ in bucket],
        "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
        "shapes": [list(t.shape) for _, t in bucket],
    }
