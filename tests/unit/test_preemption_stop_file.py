"""A stop request that reaches the batch script before the trainer's tasks exist is kept in <endpoints>/stop:
the trainer honours it after its next step, and a requeued attempt ignores the previous attempt's file."""
from __future__ import annotations

import json
import signal

import pytest

from megatron_topd.launch import endpoints
from megatron_topd.train import preemption


@pytest.fixture
def clean_preemption():
    saved_state, saved_handler = dict(preemption._state), signal.getsignal(signal.SIGUSR1)
    preemption._state.update(installed=False, signal=None, stopped=False, stop_check=None)
    yield
    preemption._state.clear()
    preemption._state.update(saved_state)
    signal.signal(signal.SIGUSR1, saved_handler)


def test_stop_file_counts_for_this_attempt_only(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_HET_JOB_ID", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert not endpoints.stop_requested(tmp_path)                       # no file
    (tmp_path / "stop").write_text(json.dumps({"attempt": "77.0"}))     # the first attempt's request
    assert not endpoints.stop_requested(tmp_path)
    (tmp_path / "stop").write_text("{not json")
    assert not endpoints.stop_requested(tmp_path)
    (tmp_path / "stop").write_text(json.dumps({"attempt": "77.1"}))
    assert endpoints.stop_requested(tmp_path)


def test_stop_check_and_signal_both_request_a_stop(tmp_path, clean_preemption):
    stop = tmp_path / "stop"
    assert not preemption.stop_requested()                              # not installed: never a stop
    preemption.install(stop_check=stop.exists)
    assert not preemption.stop_requested() and not preemption.stopped_early()
    stop.touch()
    assert preemption.stop_requested() and preemption.stopped_early()
    preemption.reset()
    assert not preemption.stop_requested()                              # reset forgets the stop check too
    signal.raise_signal(signal.SIGUSR1)
    assert preemption.stop_requested()
