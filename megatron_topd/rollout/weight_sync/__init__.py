"""Trainer -> SGLang weight sync from an iterator of (hf_name, tensor): disk, tensor (same host) or distributed."""
from __future__ import annotations

from .base import SyncStats, WeightSync
from .disk import DiskWeightSync
from .distributed import DistributedWeightSync
from .tensor import TensorWeightSync


def make_weight_sync(cfg, urls: list[str]) -> WeightSync:
    """The sync path a validated `RolloutConfig` asks for, pointed at `urls`."""
    common = dict(bucket_bytes=int(cfg.sync_bucket_mb * 2**20), pause_mode=cfg.pause_mode, timeout_s=cfg.sync_timeout_s)
    if cfg.sync_method == "disk":
        return DiskWeightSync(urls, cfg.sync_dir, model_path=cfg.model_path or None, **common)
    if cfg.sync_method == "tensor":
        return TensorWeightSync(urls, tp_size=cfg.tp_size, **common)
    return DistributedWeightSync(urls, master_address=cfg.sync_master_address, master_port=cfg.sync_master_port,
                                 backend=cfg.resolved_sync_backend, tp_size=cfg.tp_size, **common)


__all__ = ["DiskWeightSync", "DistributedWeightSync", "SyncStats", "TensorWeightSync", "WeightSync", "make_weight_sync"]
