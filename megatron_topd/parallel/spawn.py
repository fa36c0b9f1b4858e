"""Run a function on N local ranks over gloo: the one multi-rank harness of tests and benchmarks.

Why a harness of our own and not torchrun: tests need the per-rank return values and the traceback of whichever
rank failed, inside one pytest process, with a hard timeout so a hung collective fails the test instead of CI.
"""
from __future__ import annotations

import os
import pickle
import socket
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankFailed(RuntimeError):
    """A rank raised; the message carries every failing rank's traceback."""


@dataclass
class _Job:
    fn: Callable
    args: tuple
    kwargs: dict
    world_size: int
    port: int
    threads: int
    env: dict


def _rank_main(rank: int, job: _Job, queue) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(job.port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(job.world_size),
        LOCAL_WORLD_SIZE=str(job.world_size),
        **job.env,
    )
    import warnings

    import torch
    import torch.distributed as dist

    # Megatron-Core and torch.distributed warn about deprecations on every rank; keep test logs readable.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(job.threads)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=job.world_size)
        result = job.fn(*job.args, **job.kwargs)
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
    finally:
        try:
            from megatron_topd.parallel import destroy

            destroy()
        except Exception:  # noqa: BLE001
            pass


def run_on_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    threads_per_rank: int = 1,
    env: dict | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Call ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results in rank order.

    ``fn`` must be importable (module level). torch.distributed is initialised before it runs
    (RANK/WORLD_SIZE/MASTER_* set), so ``fn`` may call ``megatron_topd.parallel.initialize``.
    Raises RankFailed with the tracebacks of the failing ranks, or TimeoutError if any rank hangs.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    job = _Job(fn, args, kwargs, world_size, free_port(), threads_per_rank, dict(env or {}))
    procs = [ctx.Process(target=_rank_main, args=(r, job, queue), daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"run_on_ranks({fn.__qualname__}, world_size={world_size}): ranks "
                    f"{sorted(set(range(world_size)) - set(results) - set(errors))} did not finish in {timeout:.0f}s"
                    + ("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
                )
            try:
                rank, status, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results and i not in errors]
                if dead:
                    errors.update({i: f"process exited with code {procs[i].exitcode} without reporting" for i in dead})
                continue
            if status == "ok":
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
                # One failed rank usually leaves its peers blocked in a collective: stop waiting soon.
                deadline = min(deadline, time.monotonic() + 10.0)
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        raise RankFailed("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world_size)]
