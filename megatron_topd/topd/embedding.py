"""Embedding rows for the OT cost, looked up vocabulary-parallel (never gathering the table).

Each TP rank holds rows ``[vocab_start, vocab_start + V/TP)`` of the input-embedding table (Megatron's
`VocabParallelEmbedding` layout). A lookup is Megatron's own recipe: every rank fills the rows it owns, zeros the
others, and one SUM all-reduce over the TP group completes them - ``[n_ids, hidden]`` crosses ranks, never
``[V, hidden]``.
Ids are deduplicated first, so a step's windows cost one all-reduce of ``[unique ids, hidden]``.
The rows are constants of the step (no autograd graph): the OT weights must never carry gradient into the table.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def vocab_parallel_rows(
    ids: torch.Tensor,
    local_table: torch.Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype | None = torch.float32,
) -> torch.Tensor:
    """Rows ``[*ids.shape, hidden]`` of the full table for ``ids`` (float32, or the table's own dtype with
    ``dtype=None``: the all-reduce adds only zeros to each row, so it is exact in any dtype); every rank of ``group``
    must call it.

    ``group=None`` means the table is whole on this rank (no TP). ``vocab_start`` defaults to Megatron's even split
    (``tp_rank * local_rows``); ``vocab_size`` (the padded vocabulary) defaults to ``local_rows * tp_size``.
    """
    if local_table.dim() != 2:
        raise ValueError(f"local_table must be [rows, hidden], got shape {tuple(local_table.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids must be an integer tensor of token ids, got {ids.dtype}")
    tp = dist.get_world_size(group) if group is not None else 1
    tp_rank = dist.get_rank(group) if group is not None else 0
    local_rows = local_table.shape[0]
    start = tp_rank * local_rows if vocab_start is None else int(vocab_start)
    size = local_rows * tp if vocab_size is None else int(vocab_size)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= size):
        raise ValueError(
            f"token ids must lie in [0, {size}) (the embedding table's vocabulary), got range "
            f"[{int(ids.min())}, {int(ids.max())}]: check the tokenizer or pass vocab_size"
        )
    flat = ids.reshape(-1).to(local_table.device)
    unique, inverse = torch.unique(flat, return_inverse=True)
    with torch.no_grad():
        owned = (unique >= start) & (unique < start + local_rows)
        out_dtype = local_table.dtype if dtype is None else dtype
        if bool(owned.all()):
            rows = local_table.detach()[unique - start].to(out_dtype)
        else:  # copy only the rows this rank owns (1/TP of them), zeros elsewhere
            rows = torch.zeros(unique.numel(), local_table.shape[1], dtype=out_dtype, device=local_table.device)
            rows[owned] = local_table.detach()[unique[owned] - start].to(out_dtype)
        if group is not None and tp > 1:
            dist.all_reduce(rows, op=dist.ReduceOp.SUM, group=group)
    if unique.numel() == flat.numel() and torch.equal(unique, flat):
        return rows.reshape(*ids.shape, local_table.shape[1])  # already sorted and unique: skip the copy
    return rows[inverse].reshape(*ids.shape, local_table.shape[1])


def embedding_lookup(
    local_table: torch.Tensor,
    *,
    group=None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    dtype: torch.dtype | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Bind a (local shard of an) embedding table: ``embed(ids) -> rows``, the form `probe.run_probe` takes.

    Rows keep the table's dtype by default (``dtype=None``): `divergence` upcasts them chunk by chunk, so a bf16 table's
    rows cross the TP group at half the bytes and are never copied whole in float32 (same values either way).

    For a Megatron model pass ``model.embedding.word_embeddings.weight`` with ``vocab_start_index`` of that module
    and ``group=parallel.tensor_parallel_group()``.
    """
    return lambda ids: vocab_parallel_rows(
        ids, local_table, group=group, vocab_start=vocab_start, vocab_size=vocab_size, dtype=dtype
    )
