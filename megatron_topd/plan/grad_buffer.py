"""Megatron DDP's contiguous parameter/gradient buffer and the DistributedOptimizer's shard of it, computed offline.

Mirrors `DistributedOptimizer._compute_per_buffer_param_layout` (megatron-core 0.19): parameters are placed back to
front (backprop order), each start padded to a multiple of 64 elements; a tied-embedding copy (`shared_embedding`)
gets a bucket of its own; every bucket end is padded to a multiple of lcm(DP, 128). With `overlap_grad_reduce=False`
(our `wrap_ddp`) there is no size-based bucketing. The optimizer splits every bucket into DP equal contiguous ranges;
DP rank r owns, of each parameter, the part inside its range (`_build_model_gbuf_param_range_map`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_topd.plan.param_shapes import ParamShape

PARAM_ALIGN = 64
BUCKET_ALIGN = 128


def _pad(n: int, divisor: int) -> int:
    return -(-n // divisor) * divisor


@dataclass(frozen=True)
class BufferLayout:
    ranges: tuple[tuple[int, int], ...]  # per parameter (in registration order): [start, end) in the buffer
    buckets: tuple[tuple[int, int], ...]  # [start, end) of each padded bucket
    numel: int  # padded buffer size (elements): the grad buffer and, with the distributed optimizer, the param buffer

    def shard_numel(self, dp: int, dp_rank: int) -> int:
        """Elements of real parameters inside DP rank `dp_rank`'s range of every bucket (its optimizer shard)."""
        total = 0
        for b_start, b_end in self.buckets:
            size = (b_end - b_start) // dp
            lo, hi = b_start + dp_rank * size, b_start + (dp_rank + 1) * size
            for start, end in self.ranges:
                total += max(0, min(end, hi) - max(start, lo))
        return total


def buffer_layout(params: list[ParamShape], dp: int, *, distributed_optimizer: bool = True) -> BufferLayout:
    if not distributed_optimizer:  # plain DDP: no padding at all
        ranges, start = [], 0
        for p in reversed(params):
            ranges.append((start, start + p.numel))
            start += p.numel
        return BufferLayout(tuple(reversed(ranges)), ((0, start),), start)
    bucket_divisor = math.lcm(dp, BUCKET_ALIGN)
    ranges: list[tuple[int, int]] = []
    buckets: list[tuple[int, int]] = []
    start = bucket_start = 0
    in_bucket = 0

    def close(end: int) -> int:
        padded = _pad(end, bucket_divisor)
        buckets.append((bucket_start, padded))
        return padded

    for p in reversed(params):
        start = _pad(start, PARAM_ALIGN)
        if p.shared_embedding and in_bucket:
            bucket_start = start = close(start)
            in_bucket = 0
        end = start + p.numel
        ranges.append((start, end))
        in_bucket += 1
        if p.shared_embedding:
            bucket_start = start = close(end)
            in_bucket = 0
        else:
            start = end
    if in_bucket:
        close(start)
    return BufferLayout(tuple(reversed(ranges)), tuple(buckets), buckets[-1][1] if buckets else 0)
