"""Where this rank's vocabulary shard sits in the full vocabulary, and which of its columns are real ids.

Megatron's layout: rank r of the tensor-parallel group holds ids [r*V_local, (r+1)*V_local). Megatron pads the
vocabulary so that it divides by the group size; ids >= vocab_size are padding and belong to neither distribution.
Padding always sits at the end, so on every rank the real columns are a prefix [0, n_valid) of the shard: we slice
them instead of masking, and padded columns cost nothing and get an exact zero gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


@dataclass(frozen=True)
class VocabShard:
    group: object  # a torch.distributed ProcessGroup, or None when there is no parallelism
    world: int
    rank: int
    v_local: int
    vocab_size: int

    @property
    def start(self) -> int:
        """First global id held by this rank."""
        return self.rank * self.v_local

    @property
    def n_valid(self) -> int:
        """How many of this rank's columns are real ids (the rest is Megatron's padding)."""
        return max(0, min(self.v_local, self.vocab_size - self.start))


def resolve_group(group):
    """`group=None` means Megatron's TP group when it is initialised, else no parallelism."""
    if group is not None:
        return group
    if not (dist.is_available() and dist.is_initialized()):
        return None  # Megatron's groups cannot exist without torch.distributed; don't import Megatron for nothing.
    from megatron_topd.parallel import tensor_parallel_group

    return tensor_parallel_group()


def vocab_shard(fn: str, v_local: int, group, vocab_size: int | None) -> VocabShard:
    """Resolve the group and check `vocab_size` against group size x V_local (the error names the fix)."""
    group = resolve_group(group)
    if group is None:
        world, rank = 1, 0
    else:
        world, rank = dist.get_world_size(group), dist.get_rank(group)
    full = world * v_local
    if v_local < 1:
        raise ValueError(f"{fn}: the logits' last dimension (V_local) is {v_local}; it must be >= 1")
    if vocab_size is None:
        vocab_size = full
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise TypeError(f"{fn}: vocab_size must be an int or None, got {type(vocab_size).__name__}")
    if not 1 <= vocab_size <= full:
        raise ValueError(
            f"{fn}: vocab_size={vocab_size} is inconsistent with the shards: the group has {world} rank(s) x "
            f"V_local={v_local} = {full} columns, so vocab_size must be in [1, {full}]. Pass the true (unpadded) "
            f"vocabulary size, and the group the logits are sharded over (group=None uses Megatron's TP group)."
        )
    return VocabShard(group=group, world=world, rank=rank, v_local=v_local, vocab_size=vocab_size)
