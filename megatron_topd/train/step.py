"""One optimizer step (and one eval pass) through Megatron's pipeline schedule with a pluggable loss.

A loss function sees this rank's vocabulary shard of the logits and the microbatch, and returns
(scalar loss, {name: scalar tensor}). The schedule runs it on the last pipeline stage only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Iterable

import torch
import torch.distributed as dist

LossFn = Callable[[torch.Tensor, dict], "tuple[torch.Tensor, dict[str, torch.Tensor]]"]


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None = None
    lr: float | None = None
    skipped: bool = False
    metrics: dict[str, float] = field(default_factory=dict)


def _forward_step(loss_fn: LossFn, data_iterator, model):
    from megatron_topd.parallel import device

    dev = device()
    batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(data_iterator).items()}
    output = model(
        input_ids=batch["tokens"],
        position_ids=batch["position_ids"],
        attention_mask=batch.get("attention_mask"),
    )

    def loss_func(output_tensor):
        loss, metrics = loss_fn(output_tensor, batch)
        # The schedule divides the returned loss in place by the number of microbatches: report a copy.
        reported = {"loss": loss.detach().clone(), **{k: v.detach().clone() for k, v in metrics.items()}}
        return loss, reported

    return output, loss_func


def _run_schedule(model_chunks, batches: list[dict], loss_fn: LossFn, *, forward_only: bool):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    seq_length = batches[0]["tokens"].shape[1]
    micro_batch_size = batches[0]["tokens"].shape[0]
    return get_forward_backward_func()(
        forward_step_func=partial(_forward_step, loss_fn),
        data_iterator=iter(batches),
        model=model_chunks,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def _reduce_metrics(losses_reduced: list[dict]) -> dict[str, float]:
    """Mean over microbatches on the last stage, then over DP, then broadcast from the last stage to all ranks."""
    from megatron.core import parallel_state as ps

    from megatron_topd.parallel import device

    dev = device()  # NCCL collectives need tensors on the GPU
    names = sorted(losses_reduced[0]) if losses_reduced else []
    n_names = torch.tensor([len(names)], dtype=torch.long, device=dev)
    # Only last-stage ranks have values; agree on the count first so every rank calls the same collectives.
    dist.all_reduce(n_names, op=dist.ReduceOp.MAX)
    values = torch.zeros(int(n_names.item()), dtype=torch.float64, device=dev)
    if names:
        values = torch.stack([torch.stack([m[k].double().to(dev) for m in losses_reduced]).mean() for k in names])
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        values /= ps.get_data_parallel_world_size()
    last = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(values, src=last, group=ps.get_pipeline_model_parallel_group())
    name_list = [names]
    dist.broadcast_object_list(name_list, src=last, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(name_list[0], values.cpu().tolist()))


def train_step(model_chunks, optimizer, scheduler, batches: list[dict], loss_fn: LossFn) -> StepResult:
    """Forward+backward over `batches` (this DP rank's microbatches), then one optimizer step."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = _run_schedule(model_chunks, batches, loss_fn, forward_only=False)
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful and scheduler is not None:
        scheduler.step(increment=1)
    metrics = _reduce_metrics(losses)
    return StepResult(
        loss=metrics.pop("loss"),
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=optimizer.param_groups[0]["lr"],
        skipped=not update_successful,
        metrics=metrics,
    )


@torch.no_grad()
def eval_step(model_chunks, batches: list[dict], loss_fn: LossFn) -> dict[str, float]:
    for chunk in model_chunks:
        chunk.eval()
    try:
        losses = _run_schedule(model_chunks, batches, loss_fn, forward_only=True)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return _reduce_metrics(losses)


def cross_entropy_loss(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """Token-mean next-token cross entropy on vocabulary-parallel logits (Megatron's vocab_parallel_cross_entropy)."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    per_token = vocab_parallel_cross_entropy(logits.float(), batch["labels"])
    mask = batch["loss_mask"].float()
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, {}


def make_lm_batches(tokens: torch.Tensor, micro_batch_size: int) -> list[dict]:
    """Split [B, S+1] token ids into next-token-prediction microbatches of `micro_batch_size` sequences."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    seq = inputs.shape[1]
    positions = torch.arange(seq).unsqueeze(0)
    out = []
    for start in range(0, inputs.shape[0], micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        out.append(
            {
                "tokens": inputs[sl],
                "labels": labels[sl],
                "loss_mask": torch.ones_like(labels[sl], dtype=torch.float32),
                "position_ids": positions.expand(inputs[sl].shape[0], -1),
            }
        )
    return out
