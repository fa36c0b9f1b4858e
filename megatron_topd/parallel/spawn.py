"""Run a function on N local ranks over gloo: the one multi-rank harness of tests and benchmarks.

Why a harness of our own and not torchrun: tests need the per-rank return values and the traceback of whichever
rank failed, inside one pytest process, with a hard timeout so a hung collective fails the test instead of CI.

Rendezvous: the parent owns it, as torchrun's agent does. It creates a TCPStore on a port the OS picks (port 0, bound
at once and read back), holds it until every rank has finished, and the ranks connect to it as clients
(`init_process_group(store=...)`). No port is ever chosen by one process and bound later by another, so nothing can
take it in between (with MASTER_PORT picked in the parent and bound by rank 0 after its imports, it could).

Start-up: ranks are forked from multiprocessing's fork server, which imports torch and Megatron-Core once (about 5 s
of CPU that every spawned rank paid again, in each of the test suite's few dozen spawns). The server only imports:
it runs no torch op, so no OpenMP pool exists to be broken by the fork. A forked rank would see the server's
environment, not the caller's, so the caller's environment travels with the job and replaces it.
"""
from __future__ import annotations

import os
import pickle
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch.multiprocessing as mp


class RankFailed(RuntimeError):
    """A rank raised; the message carries every failing rank's traceback."""


@dataclass
class _Job:
    fn: Callable
    args: tuple
    kwargs: dict
    world_size: int
    store_port: int  # the parent's TCPStore on 127.0.0.1
    timeout: float
    threads: int
    env: dict  # the caller's whole environment at the call, with the call's additions


# What every rank imports anyway; the fork server imports it once. Import-only modules (no op runs at import).
PRELOAD = ("torch", "torch.distributed", "megatron.core", "megatron_topd.models", "megatron_topd.parallel",
           "megatron_topd.train.step")


def _context():
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # read when the server starts (the first spawn of this process)
    return ctx


def _rank_main(rank: int, job: _Job, queue) -> None:
    # No MASTER_PORT: torch.distributed is initialised from the parent's store below, and nothing in a rank may bind
    # a rendezvous port of its own.
    os.environ.clear()
    os.environ.update(job.env)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(job.world_size),
        LOCAL_WORLD_SIZE=str(job.world_size),
    )
    import warnings

    import torch
    import torch.distributed as dist

    # Megatron-Core and torch.distributed warn about deprecations on every rank; keep test logs readable.
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(job.threads)
    try:
        from datetime import timedelta

        store = dist.TCPStore("127.0.0.1", job.store_port, job.world_size, is_master=False,
                              timeout=timedelta(seconds=job.timeout))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=job.world_size)
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
    (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR set; the rendezvous is a TCPStore this process holds), so ``fn`` may
    call ``megatron_topd.parallel.initialize``.
    Raises RankFailed with the tracebacks of the failing ranks, or TimeoutError if any rank hangs.
    """
    from datetime import timedelta

    import torch.distributed as dist

    # Bound here, on a port the OS chose, before any rank exists; closed only after every rank has exited.
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False,
                          timeout=timedelta(seconds=timeout))
    ctx = _context()
    queue = ctx.Queue()
    job = _Job(fn, args, kwargs, world_size, store.port, timeout, threads_per_rank, {**os.environ, **(env or {})})
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
        del store  # the rendezvous outlives every rank
    if errors:
        raise RankFailed("".join(f"\n--- rank {r} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [results[r] for r in range(world_size)]
