"""The only collectives of the losses: in-place all-reduces of per-token scalars over the vocabulary group."""
from __future__ import annotations

import torch
import torch.distributed as dist

from megatron_topd.losses._shard import VocabShard


def all_reduce_max_(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    if shard.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=shard.group)
    return x


def all_reduce_sum_(x: torch.Tensor, shard: VocabShard) -> torch.Tensor:
    if shard.world > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=shard.group)
    return x
