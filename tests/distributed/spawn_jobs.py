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


class _NeedsTwoArguments(ValueError):
    def __init__(self, message: str, row: int):
        super().__init__(f"{message} (row {row})")


def rank0_work_outcomes() -> list[str]:
    """`parallel.on_rank0` when rank 0's work raises (a file error; a type that takes two arguments) and when it
    succeeds: what each rank then raises or returns."""
    import torch.distributed as dist

    from megatron_topd import parallel

    def work(kind: str):
        assert dist.get_rank() == 0, "only rank 0 runs the work"
        if kind == "file":
            raise FileNotFoundError("prompts.jsonl does not exist")
        if kind == "custom":
            raise _NeedsTwoArguments("prompt too long", 500)
        return "rank 0's result"

    outcomes = []
    for kind in ("file", "custom", "none"):
        try:
            outcomes.append(repr(parallel.on_rank0(lambda: work(kind), errors=(ValueError, OSError))))
        except (ValueError, OSError) as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
    return outcomes


def environment_and_modules(names: list[str]) -> dict:
    """What a rank sees of the caller's environment, and whether the fork server's modules were already there when
    the rank started (imported before this function ran, i.e. inherited, not imported again)."""
    import sys

    return {"env": {n: os.environ.get(n) for n in names}, "preloaded": "megatron.core" in sys.modules,
            "pid": os.getpid()}
