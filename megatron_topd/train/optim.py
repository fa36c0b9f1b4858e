"""Student wrapping for training: Megatron DDP + DistributedOptimizer (+ LR schedule), all from Megatron-Core."""
from __future__ import annotations

import torch

from megatron_topd.train.config import OptimConfig


def wrap_ddp(model, *, use_distributed_optimizer: bool = True, bucket_size: int | None = None):
    """Megatron DDP: fp32 grad buffers, reduce-scatter for the distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
        bucket_size=bucket_size,
        average_in_collective=False,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model)


def build_optimizer(model_chunks, cfg: OptimConfig, *, params_dtype: torch.dtype = torch.float32, total_steps: int = 1):
    """Megatron optimizer (Adam, DistributedOptimizer by default) and its LR scheduler for DDP-wrapped chunks."""
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    bf16 = params_dtype == torch.bfloat16
    config = OptimizerConfig(
        optimizer=cfg.optimizer,
        sgd_momentum=0.0,
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad,
        bf16=bf16,
        params_dtype=params_dtype,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model_chunks)
    decay_steps = max(cfg.lr_decay_steps or total_steps, cfg.warmup_steps + 1)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.warmup_steps,
        lr_decay_steps=decay_steps,
        lr_decay_style=cfg.lr_decay_style,
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=decay_steps,
        wd_incr_style="constant",
    )
    # The schedule calls these: grad all-reduce across DP/embedding groups, loss scaling, no-sync for microbatches.
    for chunk in model_chunks:
        chunk.config.finalize_model_grads_func = finalize_model_grads
        chunk.config.grad_scale_func = optimizer.scale_loss
        chunk.config.no_sync_func = chunk.no_sync
    return optimizer, scheduler
