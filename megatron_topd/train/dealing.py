"""Which rollout rows each data-parallel replica trains on, and getting per-row data only to the ranks that use it.

Token ids and log-probs are small (4-8 B per token) and every rank of a replica needs them, so the step's batch is
broadcast whole. A remote teacher's top-k scores are not: at examples/topd_70b.yaml with `teacher.kl=topk`, k = 64,
they are 256 rows x 16k tokens x 64 x (int32 id + float32 log-prob) = 2.1 GB per step, and only the loss reads them,
on the last pipeline stage. Rank 0 (which scored the rollouts as they finished) therefore sends each replica's rows
(128 of them: 1.07 GB) to that replica's last-stage TP rank 0, which broadcasts them over its TP group: the 16
last-stage ranks (2 replicas x TP 8) hold 1.07 GB each, the other 48 nothing (broadcasting the batch with them put
3.2 GB, with int64 ids, on all 64 ranks). Rank 0 sends DP x 1.07 GB over the network per step; the TP broadcast
stays inside a node.
"""
from __future__ import annotations

import functools

import torch.distributed as dist


def deal_rows(lengths: list[int], data_parallel: int) -> list[list[int]]:
    """Row indices per replica: longest first, each to the replica with the fewest tokens so far (ties: lowest
    replica). Every rank computes the same dealing from the lengths alone."""
    load = [0] * data_parallel
    out: list[list[int]] = [[] for _ in range(data_parallel)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        replica = min(range(data_parallel), key=lambda d: (load[d], d))
        load[replica] += lengths[i]
        out[replica].append(i)
    return [sorted(rows) for rows in out]


@functools.cache
def _last_stage_leaders(grid: tuple[int, int, int, int]) -> tuple[int, ...]:
    """Global rank of each replica's last-stage TP rank 0, indexed by data-parallel rank: one all-gather per
    layout (`grid` = world, TP, PP, DP keys the cache; Megatron's rank order is a function of it)."""
    from megatron.core import parallel_state as ps

    me = (ps.get_data_parallel_rank(), ps.is_pipeline_last_stage(ignore_virtual=True),
          ps.get_tensor_model_parallel_rank())
    everyone = [None] * grid[0]
    dist.all_gather_object(everyone, me)
    leaders = {dp: rank for rank, (dp, last, tp) in enumerate(everyone) if last and tp == 0}
    return tuple(leaders[d] for d in range(len(leaders)))


def to_last_stage(items: list | None, replicas: list[list[int]], layout) -> list | None:
    """`items` (one per row, held by global rank 0 only) -> this replica's rows `items[i] for i in
    replicas[dp_rank]` on the ranks of its last pipeline stage; None on every other rank. A collective over the
    world's last-stage ranks and rank 0; call it on every rank."""
    from megatron_topd import parallel

    rank = dist.get_rank()
    leaders = _last_stage_leaders((layout.world_size, layout.tensor_parallel, layout.pipeline_parallel,
                                   layout.data_parallel))
    mine = None
    if rank == 0:
        if items is None:
            raise ValueError("to_last_stage: rank 0 holds no per-row data to deliver")
        for dp, leader in enumerate(leaders):
            part = [items[i] for i in replicas[dp]]
            if leader == 0:
                mine = part
            else:
                dist.send_object_list([part], dst=leader)
    if not layout.is_last_stage:
        return None
    box = [mine]
    if rank == leaders[layout.dp_rank] and rank != 0:
        dist.recv_object_list(box, src=0)
    if layout.tensor_parallel > 1:
        dist.broadcast_object_list(box, src=leaders[layout.dp_rank], group=parallel.tensor_parallel_group())
    return box[0]
