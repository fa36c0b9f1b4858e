"""Run a Python module (SGLang's `sglang.launch_server`) with SIGTERM held: blocked in this process, its threads and
every process it starts, so a SIGTERM stays pending instead of stopping the server.

    python hold_sigterm.py MODULE [ARG ...]        (as `python -m MODULE ARG ...`)

Why: Slurm asks a job to stop (preemption with GraceTime, `scancel --signal=TERM`) by sending SIGTERM to every process
of its steps, SGLang's scheduler and detokenizer included. The trainer's step in flight needs its servers until it
has checkpointed, so the server role (launch/serve.py) starts SGLang through this file and stops it itself, with
SIGKILL, once the trainer has ended. A blocked signal is held whatever handlers SGLang or uvicorn install, and the
mask is inherited through fork and exec. Blocking alone does not hold, though: multiprocessing's resource tracker,
which SGLang's main process starts, blocks SIGINT/SIGTERM around its spawn and then unblocks them (SIG_UNBLOCK,
whatever the mask was before), so here `signal.pthread_sigmask` never unblocks SIGTERM.

Standard library only, run by path with SGLang's interpreter (which need not import megatron_topd).
"""
import os
import runpy
import signal
import sys

HELD = signal.SIGTERM
_pthread_sigmask = signal.pthread_sigmask


def pthread_sigmask(how, mask):
    """`signal.pthread_sigmask` that keeps SIGTERM blocked."""
    mask = set(mask)
    if how == signal.SIG_UNBLOCK:
        mask.discard(HELD)
    elif how == signal.SIG_SETMASK:
        mask.add(HELD)
    return _pthread_sigmask(how, mask)


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(f"usage: {sys.executable} {sys.argv[0]} MODULE [ARG ...]")
    _pthread_sigmask(signal.SIG_BLOCK, {HELD})
    signal.pthread_sigmask = pthread_sigmask
    if sys.path and sys.path[0] == os.path.dirname(os.path.abspath(__file__)):
        del sys.path[0]  # this folder's modules (config, server, ...) must not shadow the server's imports
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
