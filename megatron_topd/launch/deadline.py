"""Stop before the allocation's time limit: a job that Slurm ends at its limit ends TIMEOUT, which it never requeues,
and loses every step since the last checkpoint.

slurm/job.sh reads the job's end time on the host (`squeue -o %e`; tasks have no Slurm client) into
`<endpoints>/job_end` ({"end": <epoch s>, "attempt": ...}). At the end of each step (the trainer's stop check) a
`Deadline` asks for a stop, i.e. a checkpoint and a requeue, when the time left is below what the next step and a
save after it take, measured in this attempt, plus `launch.stop_margin_s` (what the job does after the trainer: its
servers stop, the batch script requeues): so a time limit never costs more than the step in flight.

Measured from the stop checks themselves, one per step, taken after that step's save if it made one: an interval
in which `checkpoints/latest_step.txt` changed held a step and a save, the others a step alone. Until a save has
been seen, a save is taken to last as long as a step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from megatron_topd.launch import endpoints

END_FILE = "job_end"


def too_close(remaining_s: float, step_s: float, save_s: float, margin_s: float = 0.0) -> bool:
    """The decision rule: stop now unless one more step, a save after it and the margin fit in the time left."""
    return remaining_s < step_s + save_s + margin_s


def job_end(root: str | Path) -> float | None:
    """This attempt's end time (epoch seconds) as the batch script wrote it, or None (no limit, no file)."""
    try:
        entry = json.loads((Path(root) / END_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return float(entry["end"]) if entry.get("attempt") == endpoints.attempt_id() else None


class Deadline:
    """A stop check: True once the time left is too short for another step plus a save (see `too_close`)."""

    def __init__(self, root: str | Path, checkpoints: str | Path, clock=time.time, margin_s: float = 0.0):
        self.root, self.tracker, self.clock = root, Path(checkpoints) / "latest_step.txt", clock
        self.margin_s = margin_s  # launch.stop_margin_s
        self.started, self.last = clock(), None
        self.saved_at = self._tracker_mtime()
        self.step_s = 0.0  # the longest step without a save
        self.save_s: float | None = None  # the longest save (an interval with a save, less a step)

    def _tracker_mtime(self) -> float | None:
        try:
            return self.tracker.stat().st_mtime
        except OSError:
            return None

    def __call__(self) -> bool:
        now, end = self.clock(), job_end(self.root)
        saved_at = self._tracker_mtime()
        saved, self.saved_at = saved_at != self.saved_at, saved_at
        if self.last is None:  # the first step: its interval holds the set-up too, a cautious estimate for now
            self.last = now
            step_s = save_s = now - self.started
        else:
            interval, self.last = now - self.last, now
            if not saved:
                self.step_s = max(self.step_s, interval)
            else:
                step = self.step_s or interval / 2  # no step without a save seen yet: split it evenly
                self.step_s, self.save_s = step, max(self.save_s or 0.0, interval - step)
            step_s, save_s = self.step_s, self.save_s if self.save_s is not None else self.step_s
        if end is None:
            return False
        stop = too_close(end - now, step_s, save_s, self.margin_s)
        if stop:
            print(f"[trainer {endpoints.node_name()}] {end - now:.0f} s left before the time limit < a step "
                  f"({step_s:.0f} s) + a save ({save_s:.0f} s) + launch.stop_margin_s ({self.margin_s:.0f} s): "
                  "stopping with a checkpoint", flush=True)
        return stop
