"""One optimizer step (and one eval pass) through Megatron's pipeline schedule with a pluggable loss.

A loss function sees this rank's vocabulary shard of the logits and the microbatch, and returns
(scalar loss, {name: scalar tensor}). The schedule runs it on the last pipeline stage only.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

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
    from megatron_topd.models.shared_prefix import mask_for, token_positions
    from megatron_topd.parallel import device

    dev = device()
    batch = {k: v.to(dev, non_blocking=True) if torch.is_tensor(v) else v for k, v in next(data_iterator).items()}
    mask = mask_for(batch)  # None: causal rows; else rollout rows carrying their guidance windows
    with token_positions(batch["position_ids"] if mask is not None else None):
        output = model(input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=mask)

    def loss_func(output_tensor):
        loss, metrics = loss_fn(output_tensor, batch)
        # The schedule divides the returned loss in place by the number of microbatches: report a copy.
        reported = {"loss": loss.detach().clone(), **{k: v.detach().clone() for k, v in metrics.items()}}
        return loss, reported

    return output, loss_func


def run_schedule(model_chunks, batches: list[dict], loss_fn: LossFn, *, forward_only: bool, finalize: bool = True):
    """Megatron's forward-backward schedule over ``batches``; per-microbatch metric dicts (last stage).

    ``finalize=False`` leaves the gradients local (no data-parallel reduction): several calls then accumulate into
    the same grad buffers and the last one, with ``finalize=True``, reduces them once.
    Microbatches may differ in shape: with PP > 1 the model config's ``variable_seq_lengths`` makes stages exchange
    shapes (set by `ParallelConfig.model_overrides`).
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    config = model_chunks[0].config
    saved = config.finalize_model_grads_func
    if not finalize:
        config.finalize_model_grads_func = None
    try:
        return get_forward_backward_func()(
            forward_step_func=partial(_forward_step, loss_fn),
            data_iterator=iter(batches),
            model=model_chunks,
            num_microbatches=len(batches),
            seq_length=batches[0]["tokens"].shape[1],
            micro_batch_size=batches[0]["tokens"].shape[0],
            forward_only=forward_only,
        )
    finally:
        config.finalize_model_grads_func = saved


def reduce_metrics(per_microbatch: list[dict], *, mean: bool = True) -> dict[str, float]:
    """Per-microbatch metrics -> one value per name on every rank.

    Last-stage values are combined over microbatches and data-parallel replicas (mean or sum; names ending in
    ``_max`` take the maximum), then broadcast from the last stage to the other pipeline stages.
    """
    from megatron.core import parallel_state as ps

    from megatron_topd.parallel import device

    dev = device()  # NCCL collectives need tensors on the GPU
    names = sorted(per_microbatch[0]) if per_microbatch else []
    n_names = torch.tensor([len(names)], dtype=torch.long, device=dev)
    # Only last-stage ranks have values; agree on the count first so every rank calls the same collectives.
    dist.all_reduce(n_names, op=dist.ReduceOp.MAX)
    values = torch.zeros(int(n_names.item()), dtype=torch.float64, device=dev)
    if names:
        stacked = torch.stack([torch.stack([m[k].double().to(dev) for m in per_microbatch]) for k in names])
        is_max = torch.tensor([k.endswith("_max") for k in names], device=dev)
        values = torch.where(is_max, stacked.max(1).values, stacked.mean(1) if mean else stacked.sum(1))
        maxima = torch.where(is_max, values, torch.full_like(values, -torch.inf))
        dist.all_reduce(values, group=ps.get_data_parallel_group())
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=ps.get_data_parallel_group())
        if mean:
            values /= ps.get_data_parallel_world_size()
        values = torch.where(is_max, maxima, values)
    last = ps.get_pipeline_model_parallel_last_rank()
    dist.broadcast(values, src=last, group=ps.get_pipeline_model_parallel_group())
    name_list = [names]
    dist.broadcast_object_list(name_list, src=last, group=ps.get_pipeline_model_parallel_group())
    return dict(zip(name_list[0], values.cpu().tolist()))


def guarded_optimizer_step(model_chunks, optimizer, scheduler, per_microbatch: list[dict], *,
                           on_nonfinite: str = "stop") -> tuple[bool, float | None]:
    """One optimizer step unless any rank saw a non-finite loss or gradient; returns (stepped, grad_norm).

    Every rank checks its own loss values (last stage) and gradient buffers, then one all-reduce over all ranks makes
    the decision common: ``skip`` zeroes the gradients and leaves weights, optimizer state and LR untouched on every
    rank; ``stop`` raises `NonFiniteError` on every rank with the same message. Never a hang, never a NaN step.
    """
    from megatron_topd.train.guard import agree_on_nonfinite, local_nonfinite

    bad_ranks = agree_on_nonfinite(local_nonfinite(model_chunks, per_microbatch))
    if bad_ranks:
        if on_nonfinite == "stop":
            from megatron_topd.train.guard import NonFiniteError

            raise NonFiniteError(f"non-finite loss or gradients on rank(s) {bad_ranks}: stopping before the optimizer "
                                 "step (weights, checkpoints and servers keep the last finite state); set "
                                 "train.on_nonfinite=skip to drop such steps instead")
        for chunk in model_chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        return False, None
    update_successful, grad_norm, _ = optimizer.step()
    if update_successful and scheduler is not None:
        scheduler.step(increment=1)
    return bool(update_successful), None if grad_norm is None else float(grad_norm)


def train_step(model_chunks, optimizer, scheduler, batches: list[dict], loss_fn: LossFn, *,
               on_nonfinite: str = "stop") -> StepResult:
    """Forward+backward over `batches` (this DP rank's microbatches), then one (guarded) optimizer step."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_schedule(model_chunks, batches, loss_fn, forward_only=False)
    stepped, grad_norm = guarded_optimizer_step(model_chunks, optimizer, scheduler, losses, on_nonfinite=on_nonfinite)
    metrics = reduce_metrics(losses)
    return StepResult(loss=metrics.pop("loss"), grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"],
                      skipped=not stepped, metrics=metrics)


@torch.no_grad()
def eval_step(model_chunks, batches: list[dict], loss_fn: LossFn) -> dict[str, float]:
    for chunk in model_chunks:
        chunk.eval()
    try:
        losses = run_schedule(model_chunks, batches, loss_fn, forward_only=True)
    finally:
        for chunk in model_chunks:
            chunk.train()
    return reduce_metrics(losses)


def cross_entropy_loss(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict]:
    """Token-mean next-token cross entropy on vocabulary-parallel logits.

    The softmax runs over the real vocabulary only (``batch["vocab_size"]``): Megatron pads the output layer to a
    multiple of 128, and those rows must never enter a softmax (vocab 131 padded to 256: 5.52 instead of HF's 4.85).
    """
    from megatron_topd.losses import vocab_parallel_log_probs

    log_probs = vocab_parallel_log_probs(logits.float(), batch["labels"], vocab_size=batch["vocab_size"])
    mask = batch["loss_mask"].float()
    loss = -(log_probs * mask).sum() / mask.sum().clamp(min=1)
    return loss, {}


def make_lm_batches(tokens: torch.Tensor, micro_batch_size: int, vocab_size: int) -> list[dict]:
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
                "vocab_size": vocab_size,
            }
        )
    return out
