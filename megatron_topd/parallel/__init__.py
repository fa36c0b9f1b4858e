"""Process groups, device selection and seeds for the trainer.

`initialize` is the one call that turns "N processes" into Megatron's TP x PP x DP layout: torch.distributed
(NCCL on GPU, gloo on CPU), Megatron's parallel_state, and its RNG trackers. On a machine without CUDA it first
applies the CPU adaptations in `cpu_compat` (the only place that touches Megatron-Core internals).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in the TP x PP x DP grid (Megatron's order: tp fastest, then dp, then pp)."""

    world_size: int
    rank: int
    tensor_parallel: int
    pipeline_parallel: int
    data_parallel: int
    tp_rank: int
    pp_rank: int
    dp_rank: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pipeline_parallel - 1


def device() -> torch.device:
    """The device this rank computes on: its local GPU when CUDA is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _init_process_group(backend: str | None, timeout_s: float) -> None:
    if dist.is_initialized():
        return
    # torchrun sets RANK/WORLD_SIZE; under `srun` without torchrun we read Slurm's variables.
    env = os.environ
    if "RANK" not in env and "SLURM_PROCID" in env:
        env["RANK"] = env["SLURM_PROCID"]
        env["WORLD_SIZE"] = env["SLURM_NTASKS"]
        env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("RANK", "0")
    env.setdefault("WORLD_SIZE", "1")
    env.setdefault("LOCAL_RANK", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")
    store = None
    if "MASTER_PORT" not in env:
        if int(env["WORLD_SIZE"]) != 1:
            raise RuntimeError("MASTER_PORT is not set: launch with torchrun/srun or set MASTER_ADDR and MASTER_PORT.")
        store = dist.HashStore()  # one process: an in-memory rendezvous, no port to pick and bind
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env["LOCAL_RANK"]))
    dist.init_process_group(
        backend, store=store, rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
        timeout=timedelta(seconds=timeout_s)
    )


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    *,
    backend: str | None = None,
    seed: int = 1234,
    timeout_s: float = 600.0,
    context_parallel: int = 1,
) -> ParallelLayout:
    """Set up torch.distributed, Megatron's model-parallel groups and RNG trackers; return this rank's layout.

    Data parallelism is whatever is left: world_size / (tensor_parallel * pipeline_parallel * context_parallel).
    ``timeout_s`` applies to every process group (torch.distributed's default group and all of Megatron's): ranks
    that wait in a collective while rank 0 waits for minutes of generation must not time out.
    Safe to call when torch.distributed is already initialised (e.g. by the test harness).
    """
    if not torch.cuda.is_available():
        from megatron_topd.parallel import cpu_compat

        cpu_compat.apply()
    _init_process_group(backend, timeout_s)
    world = dist.get_world_size()
    if tensor_parallel < 1 or pipeline_parallel < 1:
        raise ValueError(f"tensor_parallel={tensor_parallel} and pipeline_parallel={pipeline_parallel} must be >= 1")
    if world % (tensor_parallel * pipeline_parallel * context_parallel):
        raise ValueError(
            f"world size {world} is not divisible by tensor_parallel*pipeline_parallel*context_parallel = "
            f"{tensor_parallel}*{pipeline_parallel}*{context_parallel}; change the parallel sizes or the number of ranks"
        )
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel, pipeline_model_parallel_size=pipeline_parallel,
        context_parallel_size=context_parallel, distributed_timeout_minutes=max(1, round(timeout_s / 60)),
    )
    set_seed(seed)
    return layout()


def layout() -> ParallelLayout:
    from megatron.core import parallel_state as ps

    return ParallelLayout(
        world_size=dist.get_world_size(),
        rank=dist.get_rank(),
        tensor_parallel=ps.get_tensor_model_parallel_world_size(),
        pipeline_parallel=ps.get_pipeline_model_parallel_world_size(),
        data_parallel=ps.get_data_parallel_world_size(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
    )


def set_seed(seed: int) -> None:
    """Seed torch/numpy/random and Megatron's tensor-parallel RNG tracker (per-rank seeds as Megatron lays them out)."""
    import random

    import numpy as np
    from megatron.core import tensor_parallel

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def tensor_parallel_group():
    """Megatron's TP group when model parallelism is initialised, else None (no parallelism)."""
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return None
    if ps.model_parallel_is_initialized():
        return ps.get_tensor_model_parallel_group()
    return None


def broadcast_object(obj, src: int = 0, group=None):
    """``obj`` from global rank ``src`` on every rank of ``group`` (pickled: for small, irregular payloads only);
    ``obj`` itself in a process without torch.distributed or alone in its world."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def on_rank0(fn, *, errors: tuple[type[BaseException], ...] = (Exception,)):
    """``fn()`` run by global rank 0 alone: its result there, None on the other ranks. When it raises one of
    ``errors``, every rank raises that type with its message at once, instead of the others waiting in the next
    collective for a rank that is gone (a bad prompt file, an unreachable server: set-up work rank 0 does alone)."""
    result, failure = None, None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = fn()
        except errors as exc:
            failure = (type(exc), str(exc))
    failure = broadcast_object(failure)
    if failure is not None:
        kind, message = failure
        try:
            error = kind(message)
        except Exception:  # noqa: BLE001 - a type that takes other arguments: the listed type it is one of
            error = next(base for base in errors if issubclass(kind, base))(f"{kind.__name__}: {message}")
        raise error
    return result


def destroy() -> None:
    import sys

    # Importing megatron.core costs seconds: only tear it down when this process actually used it.
    ps = sys.modules.get("megatron.core.parallel_state")
    if ps is not None and ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
