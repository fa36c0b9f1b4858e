"""Checkpoint I/O, shared by train/ and convert/ (both import it downwards).

Distributed checkpoints (Megatron `dist_checkpointing`, torch_dist format): model, optimizer, scheduler, step, RNG states and any extra training state (data position, rollout position) — loadable at another TP/PP/DP.

Model and optimizer tensors are saved as per-parameter ShardedTensors, so a checkpoint written at TP2 loads at TP1 or
TP2xPP2. RNG states are per rank: they are restored only when the layout is unchanged (a resumed run reproduces the
un-stopped run exactly); after a layout change they are re-seeded from the config seed.
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

TRACKER_FILE = "latest_step.txt"


def _step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def unwrap(model):
    """The GPTModel inside Megatron's DDP (and Float16Module) wrappers: checkpoints hold its names."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout_key() -> tuple[int, int, int]:
    from megatron.core import parallel_state as ps

    return (
        ps.get_tensor_model_parallel_world_size(),
        ps.get_pipeline_model_parallel_world_size(),
        ps.get_data_parallel_world_size(),
    )


def _ensure_optimizer_state(optimizer) -> None:
    """Give every Adam parameter without state a zero state (step 0) - before a load, or a save before any step.

    Megatron's DistributedOptimizer builds its loading template from `state_dict()`, which, with torch's Adam (no
    TE/apex fused Adam), needs a `step` entry per parameter; a freshly built optimizer has none yet.
    """
    inner_optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    for opt in inner_optimizers:
        torch_opt = opt.optimizer
        for group in torch_opt.param_groups:
            for p in group["params"]:
                state = torch_opt.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                    state["step"] = torch.zeros((), dtype=torch.float32)


def _unshare_adam_steps(optimizer) -> None:
    """Give each parameter its own Adam `step` tensor after a load.

    Without TE/apex fused Adam, Megatron's DistributedOptimizer.load_state_dict puts ONE step tensor into every
    parameter's state; torch's Adam then increments that shared tensor once per parameter per step, which corrupts
    the bias correction after a resume. Found by tests/distributed/test_checkpoint.py.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


def _sharded_state(model_chunks, optimizer, scheduler, *, is_loading: bool) -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    model = unwrap(model_chunks[0])
    model_sd = model.sharded_state_dict()
    state = {"model": model_sd}
    if optimizer is not None:
        # Loading into a fresh optimizer, or saving one that never stepped (the run's first steps were skipped by the
        # non-finite guard): a zero Adam state at step 0 is exactly "no update yet".
        _ensure_optimizer_state(optimizer)
        # 'fully_reshardable': optimizer state in the canonical per-parameter layout, so it reshards across TP/PP/DP.
        state["optimizer"] = optimizer.sharded_state_dict(
            model_sd,
            is_loading=is_loading,
            metadata={
                "distrib_optim_sharding_type": "fully_reshardable",
                # Gather over the gloo DP group (Megatron's supported option); its NCCL path assumes CUDA.
                "distrib_optim_fully_reshardable_mem_efficient": not torch.cuda.is_available(),
            },
        )
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    # One RNG record per rank, addressed by its (pp, tp, dp) coordinates.
    tp, pp, dp = _layout_key()
    state["rng_state"] = ShardedObject(
        "rng_state",
        _rng_state(),
        (pp, tp, dp),
        (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(), ps.get_data_parallel_rank()),
        replica_id=0,
    )
    return state


def save_checkpoint(root: str | Path, step: int, model_chunks, optimizer=None, scheduler=None, extra: dict | None = None) -> Path:
    """Save under `root/step_XXXXXXXX` on every rank (collective); update `root/latest_step.txt`."""
    from megatron.core import dist_checkpointing

    path = _step_dir(root, step)
    if dist.get_rank() == 0:
        path.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    state = _sharded_state(model_chunks, optimizer, scheduler, is_loading=False)
    state["step"] = step
    state["extra"] = extra or {}
    dist_checkpointing.save(state, str(path))
    if dist.get_rank() == 0:
        tp, pp, dp = _layout_key()
        (path / "topd_meta.json").write_text(json.dumps({"step": step, "tp": tp, "pp": pp, "dp": dp}))
        tmp = Path(root) / (TRACKER_FILE + ".tmp")
        tmp.write_text(str(step))
        os.replace(tmp, Path(root) / TRACKER_FILE)
    dist.barrier()
    return path


def prune_checkpoints(root: str | Path, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` complete checkpoints under ``root`` (0: keep all); never the one
    latest_step.txt names, nor anything newer (a save in progress). Call on one rank, after `save_checkpoint`
    returned on every rank. At 70B each checkpoint with its optimizer state is about 1 TB."""
    import shutil

    latest = latest_step(root)
    if keep < 1 or latest is None:
        return []
    steps = sorted(int(d.name.split("_")[1]) for d in Path(root).glob("step_*")
                   if d.is_dir() and (d / "topd_meta.json").is_file() and int(d.name.split("_")[1]) <= latest)
    removed = []
    for step in steps[:-keep] if len(steps) > keep else []:
        if step != latest:
            shutil.rmtree(_step_dir(root, step))
            removed.append(_step_dir(root, step).name)
    return removed


def latest_step(root: str | Path) -> int | None:
    tracker = Path(root) / TRACKER_FILE
    return int(tracker.read_text().strip()) if tracker.exists() else None


def load_checkpoint(
    root: str | Path, model_chunks, optimizer=None, scheduler=None, *, step: int | None = None
) -> dict:
    """Load a checkpoint (the latest unless `step`) into the live model/optimizer; return {'step', 'extra', 'rng_restored'}.

    Pass optimizer=None to load weights only (e.g. evaluation, or a student initialised from a converted checkpoint).
    """
    from megatron.core import dist_checkpointing

    if step is None:
        step = latest_step(root)
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {root} (missing {TRACKER_FILE}); check checkpoint.load_dir")
    path = _step_dir(root, step)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    meta = json.loads((path / "topd_meta.json").read_text())
    same_layout = (meta["tp"], meta["pp"], meta["dp"]) == _layout_key()
    state = _sharded_state(model_chunks, optimizer, scheduler, is_loading=True)
    if not same_layout:
        state.pop("rng_state")
    loaded = dist_checkpointing.load(state, str(path))
    unwrap(model_chunks[0]).load_state_dict(loaded["model"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])
        _unshare_adam_steps(optimizer)
    if scheduler is not None and "scheduler" in loaded:
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout:
        _set_rng_state(loaded["rng_state"])
    return {"step": loaded["step"], "extra": loaded.get("extra", {}), "rng_restored": same_layout}


def load_model_weights(path: str | Path, model_chunks) -> None:
    """Load only model weights from a checkpoint folder written by `save_checkpoint` or tools/convert_hf_to_megatron."""
    from megatron.core import dist_checkpointing

    model = unwrap(model_chunks[0])
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(path))
    model.load_state_dict(loaded["model"])
