"""The non-finite guard: one decision for every rank, so a NaN on one rank never becomes a hang or a NaN step.

bf16 training has no grad scaler to catch overflows, and a non-finite loss exists only on the last pipeline stage:
raising there alone would leave the other stages waiting in the schedule's next p2p forever. Each rank instead
reports a flag; one all-reduce of a [world_size] vector (a few bytes per rank) tells everyone which ranks were bad.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class NonFiniteError(FloatingPointError):
    """Raised identically on every rank when the step saw a non-finite loss or gradient (train.on_nonfinite=stop)."""


def local_nonfinite(model_chunks, per_microbatch: list[dict] | None = None) -> bool:
    """This rank's verdict: any non-finite reported loss/metric or gradient buffer value."""
    for m in per_microbatch or []:
        for v in m.values():
            if torch.is_tensor(v) and not bool(torch.isfinite(v).all()):
                return True
    for chunk in model_chunks or []:
        for buffer in list(getattr(chunk, "buffers", [])) + list(getattr(chunk, "expert_parallel_buffers", [])):
            if not bool(torch.isfinite(buffer.grad_data).all()):
                return True
    return False


def agree_on_nonfinite(local_bad: bool) -> list[int]:
    """The global ranks that reported a non-finite value (the same list on every rank)."""
    from megatron_topd.parallel import device

    flags = torch.zeros(dist.get_world_size(), dtype=torch.float32, device=device())
    flags[dist.get_rank()] = float(local_bad)
    dist.all_reduce(flags)
    return torch.nonzero(flags.cpu()).flatten().tolist()
