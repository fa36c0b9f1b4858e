"""Preemption: a signal asks the run to stop; every rank finishes the current step, checkpoints, and exits.

Slurm sends the signal (`--signal=B:USR1@<s>` before the time limit; `scancel --signal=USR1 --batch` by hand or by a
preemption hook) to the batch script, which writes a stop file (`<endpoints>/stop`, read through
`install(stop_check=...)`) rather than signalling the trainer's tasks: a request that comes before they exist (plan,
server start-up) is kept, and a task that has not yet installed its handler is not killed by the signal. A SIGUSR1
sent to a trainer process directly works too. The handler only sets a flag: the
step in flight (generation, collectives, optimizer) runs to its end. At the end of each step every rank calls
`stop_requested()`, one MAX all-reduce of that flag over the world, so all ranks take the same decision in the same
step even when the signal reached only some of them (or reached them during different steps): no rank is left
waiting in a collective. Under Slurm SIGTERM is a stop request too (launch/trainer.py installs both): preemption
with GraceTime and `scancel --signal=TERM` send it to every task of the job, and the server roles hold it until the
trainer has ended (launch/serve.py). The loop then saves a checkpoint and returns; `megatron_topd.launch.trainer`
exits with `REQUEUE_EXIT_CODE` so the batch script requeues the job, which resumes from that checkpoint.
"""
from __future__ import annotations

import signal
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist

REQUEUE_EXIT_CODE = 75  # EX_TEMPFAIL: "stopped on request, checkpoint saved, run me again"

_state = {"installed": False, "signal": None, "reported": False, "stopped": False, "stop_check": None}


def install(signals: tuple[int, ...] = (signal.SIGUSR1,), stop_check: Callable[[], bool] | None = None) -> None:
    """Turn `signals` into a stop request, and `stop_check()` returning True too (a stop file; it may be given by a
    later call). Idempotent. Call before anything slow, so an early signal is kept."""
    if stop_check is not None:
        _state["stop_check"] = stop_check
    if _state["installed"]:
        return

    def handler(signum, frame):
        _state["signal"] = signum

    for sig in signals:
        signal.signal(sig, handler)
    _state["installed"] = True


def requested_locally() -> bool:
    check = _state["stop_check"]
    by_check = check is not None and bool(check())  # called every step: it may measure them (launch/deadline.py)
    if _state["signal"] is not None:
        if not _state["reported"]:  # said here, not in the handler (no I/O inside a signal handler)
            _state["reported"] = True
            print(f"[preemption] rank {dist.get_rank() if dist.is_initialized() else 0}: "
                  f"{signal.Signals(_state['signal']).name} received, stopping after this step", flush=True)
        return True
    return by_check


def stop_requested(group=None) -> bool:
    """True on every rank when any rank got the signal. A collective: every rank calls it once per step.

    Without `install()` (a plain `megatron-topd train`) no rank can get a stop request: False without communication.
    """
    if not _state["installed"]:
        return False
    if not (dist.is_available() and dist.is_initialized()):
        stop = requested_locally()
    else:
        from megatron_topd.parallel import device

        flag = torch.tensor([1.0 if requested_locally() else 0.0], device=device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
        stop = bool(flag.item() > 0)
    if stop:
        _state["stopped"] = True
    return stop


def stopped_early() -> bool:
    """The loop stopped on a request (checkpoint saved): the process should exit with REQUEUE_EXIT_CODE."""
    return _state["stopped"]


def reset() -> None:
    """Forget the request (tests running several loops in one process)."""
    _state.update(signal=None, reported=False, stopped=False, stop_check=None)


TEMPORARY_MARK = "PREEMPTION_CHECKPOINT"


def mark_temporary(path) -> None:
    """Mark a checkpoint made only because of a stop request (off the save_interval schedule); rank 0 writes."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        (Path(path) / TEMPORARY_MARK).write_text("saved on a stop request; removed once a later checkpoint exists\n")


def prune_temporary(ckpt_root) -> list[str]:
    """Remove stop-request checkpoints older than the latest one (at 70B each holds the optimizer: ~1 TB), so a
    requeued run ends with the checkpoints of an uninterrupted run. Call on one rank, after training."""
    import shutil

    from megatron_topd.checkpointing import latest_step

    latest = latest_step(ckpt_root)
    removed = []
    for mark in sorted(Path(ckpt_root).glob(f"step_*/{TEMPORARY_MARK}")):
        step = int(mark.parent.name.split("_")[1])
        if latest is not None and step < latest:
            shutil.rmtree(mark.parent)
            removed.append(mark.parent.name)
    return removed
