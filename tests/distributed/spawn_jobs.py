"""Rank functions for the harness's own test (tests/distributed/test_spawn.py)."""
from __future__ import annotations

import os


def all_reduce_rank() -> dict:
    """The rank's view of the rendezvous and one collective over every rank."""
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return {"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": float(t),
            "master_port": os.environ.get("MASTER_PORT")}


def fail_on_rank_one() -> None:
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("rank one was told to fail")
    dist.barrier()  # rank 0 is left waiting for its peer: the harness must still come back
