"""`export_hf_weights`: stream a live TP/PP-sharded Megatron model's weights as full HF-named tensors, for weight sync.

Protocol (every rank of the job calls it and iterates it to the end, in lockstep):
- The stream is the same on every rank: `(hf_name, tensor)` in HF checkpoint order (`mapping.tensor_maps`). Global
  rank 0 gets the full tensors (on the model's device); every other rank gets `(hf_name, None)`, so callers can run
  their own collectives (e.g. a broadcast to SGLang) per item without extra bookkeeping.
- For each parameter, the owning pipeline stage's tensor-parallel ranks gather their shards to TP rank 0 of that
  stage (`dist.gather` over the TP group, or the expert-TP group for experts); that rank merges them into the full
  Megatron tensor and sends it to global rank 0 over point-to-point (`dist.send`/`recv`; rank 0 and the sender share
  a pipeline group). Shapes come from the spec and dtypes from a one-off all-gather of small integer codes, so no
  tensor is pickled. Only data-parallel replica 0 communicates; other replicas yield names with None at once.
- Tied embeddings: `lm_head.weight` is not exported (HF ties it); the last stage's copy of the embedding is unused.
- Peak extra memory on rank 0 is one full parameter (the largest: the embedding, or one expert-merged fc1).

`export_stage_hf_weights` is the same stream cut per pipeline stage, without the funnel: each stage's first TP rank
(of DP replica 0) gets its own stage's full tensors and nothing travels between stages, so every stage can push its
layers to the servers itself (`rollout/weight_sync/distributed.py`); `stage_role()` says which rank that is.

Expert parallelism (EP > 1) is not supported yet: a clear error. Megatron's default rank order (tp fastest, pp
slowest) is assumed, as `parallel.initialize` sets it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_topd.convert import layout
from megatron_topd.convert.live import canonical_parameters
from megatron_topd.convert.mapping import TensorMap, megatron_shape, tensor_maps, to_hf
from megatron_topd.models.spec import ModelSpec

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _groups(spec: ModelSpec):
    from megatron.core import parallel_state as ps

    if ps.get_expert_model_parallel_world_size() != 1:
        raise NotImplementedError(
            f"export_hf_weights: expert_model_parallel_size={ps.get_expert_model_parallel_world_size()} is not "
            "supported yet (experts are gathered over tensor parallelism only); use expert_model_parallel_size=1"
        )
    tp_group = ps.get_tensor_model_parallel_group()
    etp_group = ps.get_expert_tensor_parallel_group() if spec.is_moe else tp_group
    if spec.is_moe and dist.get_world_size(etp_group) > 1:
        if dist.get_process_group_ranks(etp_group)[0] != dist.get_process_group_ranks(tp_group)[0]:
            raise NotImplementedError("export_hf_weights: the expert-TP group must start at the TP group's rank 0")
    return tp_group, etp_group, ps.get_pipeline_model_parallel_group()


def _owner_table(maps: list[TensorMap], local: dict, pp_group, device) -> torch.Tensor:
    """[pp, n_maps] int codes: 0 = stage does not hold the parameter, k = holds it with dtype _DTYPES[k-1]."""
    codes = torch.zeros(len(maps), dtype=torch.int64, device=device)
    for i, m in enumerate(maps):
        if m.megatron in local:
            codes[i] = _DTYPES.index(local[m.megatron].dtype) + 1
    table = [torch.zeros_like(codes) for _ in range(dist.get_world_size(pp_group))]
    dist.all_gather(table, codes, group=pp_group)
    return torch.stack(table).cpu()


def _gather_full(m: TensorMap, shard: torch.Tensor, group) -> torch.Tensor | None:
    """Merge the TP shards of one parameter on the group's first rank (None on the others)."""
    size = dist.get_world_size(group)
    if size == 1 or m.tp == "replicated":
        return shard if dist.get_rank(group) == 0 else None
    shard = shard.contiguous()
    gather_list = [torch.empty_like(shard) for _ in range(size)] if dist.get_rank(group) == 0 else None
    dist.gather(shard, gather_list, group=group, group_dst=0)
    return layout.merge_tp_shards(m.tp, gather_list) if gather_list is not None else None


@dataclass(frozen=True)
class StageRole:
    """This rank's part in a per-stage weight push: `pushes` on the first TP rank of data-parallel replica 0 of each
    pipeline stage (the rank that holds the stage's full tensors in `export_stage_hf_weights`)."""

    stage: int
    stages: int
    pushes: bool


def stage_role() -> StageRole:
    from megatron.core import parallel_state as ps

    pushes = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank(with_context_parallel=True) == 0
    return StageRole(ps.get_pipeline_model_parallel_rank(), ps.get_pipeline_model_parallel_world_size(), pushes)


def _owned_full_tensors(model, spec: ModelSpec):
    """Shared set-up of both exports (data-parallel replica 0 only): yields `(map, owner stage, dtype, device, full)`
    for every map in HF order, where `full` is the merged Megatron tensor on the owner stage's first TP rank and None
    elsewhere (the owner stage's TP ranks gather; the other stages do nothing for this map)."""
    maps = tensor_maps(spec)
    local = {k: v.detach() for k, v in canonical_parameters(model, spec).items()}
    tp_group, etp_group, pp_group = _groups(spec)
    device = next(iter(local.values())).device  # NCCL on GPU, gloo on CPU: communicate where the weights are
    table = _owner_table(maps, local, pp_group, device)
    my_stage = dist.get_rank(pp_group)
    for i, m in enumerate(maps):
        holders = torch.nonzero(table[:, i]).flatten().tolist()
        if not holders:
            raise ValueError(f"no pipeline stage holds {m.megatron}: the model does not match the ModelSpec")
        owner = holders[0]
        full = _gather_full(m, local[m.megatron], etp_group if m.expert else tp_group) if my_stage == owner else None
        yield m, owner, _DTYPES[int(table[owner, i]) - 1], device, full


def _hf_items(m: TensorMap, full: torch.Tensor | None, spec: ModelSpec, dtype):
    if full is None:
        return [(name, None) for name in m.hf]
    return [(name, t if dtype is None else t.to(dtype)) for name, t in zip(m.hf, to_hf(m, full, spec))]


@torch.no_grad()
def export_hf_weights(
    model, spec: ModelSpec, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield `(hf_name, full tensor on global rank 0 / None elsewhere)` for every HF tensor of `spec`'s model.

    `model`: this rank's GPTModel (or DDP-wrapped, or a list of virtual-pipeline chunks). `dtype`: cast on rank 0
    (default: the parameters' dtype). Every rank must consume the whole iterator (it drives collectives).
    """
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        for m in tensor_maps(spec):
            for name in m.hf:
                yield name, None
        return
    tp_group = ps.get_tensor_model_parallel_group()
    pp_ranks = dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())
    me = dist.get_rank()
    # TP rank 0 of DP replica 0 on every stage: exactly the pipeline group that contains global rank 0.
    in_rank0_pipeline = dist.get_rank(tp_group) == 0
    for m, owner, dtype_, device, full in _owned_full_tensors(model, spec):
        if in_rank0_pipeline:
            sender = pp_ranks[owner]  # TP rank 0 of the owning stage
            if me == 0 and sender != 0:
                shape = megatron_shape(m, spec, dist.get_world_size(tp_group))
                full = torch.empty(shape, dtype=dtype_, device=device)
                dist.recv(full, src=sender)
            elif me == sender and sender != 0:
                dist.send(full.contiguous(), dst=0)
        yield from _hf_items(m, full if me == 0 else None, spec, dtype)


@torch.no_grad()
def export_stage_hf_weights(
    model, spec: ModelSpec, *, dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Yield this pipeline stage's own HF tensors, for a push in which every stage sends its own layers.

    On the stage's first TP rank of data-parallel replica 0 (`stage_role().pushes`): `(hf_name, full tensor)` for
    every tensor the stage owns, in HF order; on its other TP ranks the same names with None (they take part in the
    TP gathers, so they must iterate to the end too); on other data-parallel replicas nothing. No tensor leaves its
    stage: the only collectives are the TP gathers and one all-gather of ownership codes over the pipeline group.
    """
    from megatron.core import parallel_state as ps

    if ps.get_data_parallel_rank(with_context_parallel=True) != 0:
        return
    my_stage = ps.get_pipeline_model_parallel_rank()
    for m, owner, _, _, full in _owned_full_tensors(model, spec):
        if owner == my_stage:
            yield from _hf_items(m, full, spec, dtype)


def iter_buckets(
    stream, spec: ModelSpec, bucket_bytes: int, element_size: int = 2
) -> Iterator[list[tuple[str, torch.Tensor | None]]]:
    """Group an export stream into lists of about `bucket_bytes` (sizes from the spec's shapes x `element_size`).

    Sizes come from the spec, not from the tensors, so every rank (including those that get None) cuts its
    buckets after the same names.
    """
    from megatron_topd.convert.mapping import hf_shapes

    shapes = hf_shapes(spec)
    bucket, size = [], 0
    for name, tensor in stream:
        bucket.append((name, tensor))
        size += element_size * int(torch.Size(shapes[name]).numel())
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket
