"""Stopping before the time limit (issue 23): the rule (one more step and a save must fit in the time left) and its
measurements, from the stop checks at each step's end and the checkpoint tracker's changes; the batch script's end
time counts for its own attempt only."""
from __future__ import annotations

import json
import os

import pytest

from megatron_topd.launch.deadline import Deadline, job_end, too_close


@pytest.fixture
def attempt(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "5")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    monkeypatch.delenv("SLURM_HET_JOB_ID", raising=False)
    return tmp_path


def test_the_rule():
    assert not too_close(remaining_s=100, step_s=60, save_s=30)
    assert too_close(remaining_s=89, step_s=60, save_s=30)
    assert too_close(remaining_s=100, step_s=60, save_s=30, margin_s=11)  # the job's own end needs time too
    assert not too_close(remaining_s=101, step_s=60, save_s=30, margin_s=11)


def test_end_time_of_this_attempt_only(attempt):
    assert job_end(attempt) is None                                            # no limit: no file
    (attempt / "job_end").write_text(json.dumps({"end": 1000, "attempt": "5.1"}))
    assert job_end(attempt) is None                                            # the previous attempt's
    (attempt / "job_end").write_text(json.dumps({"end": 1000, "attempt": "5.2"}))
    assert job_end(attempt) == 1000.0


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_steps_and_saves_are_measured_and_the_run_stops_before_the_limit(attempt, capsys):
    clock, ckpts = Clock(), attempt / "checkpoints"
    ckpts.mkdir()
    tracker = ckpts / "latest_step.txt"
    (attempt / "job_end").write_text(json.dumps({"end": 1000, "attempt": "5.2"}))
    deadline = Deadline(attempt, ckpts, clock=clock)

    def step(seconds: float, save_s: float = 0.0) -> bool:
        clock.now += seconds + save_s
        if save_s:
            tracker.write_text("1")
            os.utime(tracker, (clock.now, clock.now))  # a new mtime, as a save's tracker update gives
        return deadline()

    assert not step(100)                   # set-up + step 1 (100 s): 900 s left >= 100 + 100 (cautious)
    assert not step(50) and deadline.step_s == 50
    assert not step(50, save_s=120) and deadline.save_s == 120 and deadline.step_s == 50
    assert not step(40)                    # t=360: 640 s left >= 50 + 120
    assert not step(50)                    # t=410
    assert not step(50, save_s=100)        # t=560: the longest save stays 120
    assert not step(50)                    # t=610: 390 s left
    assert not step(50)                    # t=660
    assert not step(50)                    # t=710: 290 s left
    assert not step(50)                    # t=760
    assert not step(50)                    # t=810: 190 s left >= 170
    assert step(30)                        # t=840: 160 s left < 50 + 120: stop now, the limit costs no step
    assert "160 s left before the time limit < a step (50 s) + a save (120 s)" in capsys.readouterr().out


def test_without_a_time_limit_it_never_stops(attempt):
    clock = Clock()
    deadline = Deadline(attempt, attempt / "checkpoints", clock=clock)
    for _ in range(3):
        clock.now += 10 ** 6
        assert not deadline()


def test_an_end_time_moved_closer_during_the_first_step_stops_it_and_says_why(attempt, capsys):
    """The batch script rewrites job_end when Slurm moves the end (scontrol update TimeLimit, preemption's
    GraceTime); the first step's check, set-up included, already acts on it."""
    clock = Clock()
    (attempt / "job_end").write_text(json.dumps({"end": 10_000, "attempt": "5.2"}))
    deadline = Deadline(attempt, attempt / "checkpoints", clock=clock)
    (attempt / "job_end").write_text(json.dumps({"end": 150, "attempt": "5.2"}))  # the limit cut mid-step
    clock.now = 80
    assert deadline()                      # 70 s left < 80 s (first step, set-up included) + as long a save
    assert "70 s left before the time limit < a step (80 s) + a save (80 s)" in capsys.readouterr().out


def test_the_margin_counts_and_is_named(attempt, capsys):
    """launch.stop_margin_s: what the job does after the trainer (servers stop, requeue) must fit before the end."""
    clock = Clock()
    (attempt / "job_end").write_text(json.dumps({"end": 170, "attempt": "5.2"}))
    deadline = Deadline(attempt, attempt / "checkpoints", clock=clock, margin_s=60)
    clock.now = 40
    assert deadline()                      # 130 s left < 40 + 40 + 60 (without the margin it would go on)
    assert "+ launch.stop_margin_s (60 s): stopping" in capsys.readouterr().out
