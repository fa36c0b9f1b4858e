"""The code a Slurm job runs: slurm/job.sh copies megatron_topd/ to `TOPD_CODE_DIR` when the job first starts and
every attempt runs from that copy, so an edit to the checkout during the job (or before a requeue) does not change it.
A role checks it really imports that copy: an interpreter older than 3.11 ignores PYTHONSAFEPATH=1 and `python -m`
would import the live checkout from the working directory instead."""
from __future__ import annotations

import os
from pathlib import Path

import megatron_topd


def code_dir() -> str | None:
    """The job's code snapshot this process runs from (None outside slurm/job.sh); raises if it imports other code."""
    snapshot = os.environ.get("TOPD_CODE_DIR")
    if not snapshot:
        return None
    running = Path(megatron_topd.__file__).resolve().parent.parent
    if running != Path(snapshot).resolve():
        raise RuntimeError(f"this task imports megatron_topd from {running}, not from the job's code snapshot "
                           f"{snapshot} (TOPD_CODE_DIR): run it with Python >= 3.11 (PYTHONSAFEPATH=1) or from a "
                           "working directory without a megatron_topd/ folder")
    return snapshot
