"""NeMo-Run's sbatch script requeues on any non-zero exit while retries remain; the guard in its setup lines lets
`scontrol requeue` through only when this attempt's trainer.exit holds the stop code 75 (issue 23): a config error or
a crash is not retried. Each role's command execs Python, so a signal to the step reaches the role, not a shell."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from megatron_topd.launch.nemo_run import STOP_EXIT_CODE, requeue_guard, role_commands
from megatron_topd.train.preemption import REQUEUE_EXIT_CODE


@pytest.fixture
def guarded(tmp_path):
    """Run `scontrol ARGS` in a shell with the guard, as attempt 9.1; returns what reached the real scontrol."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$*" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)

    def run(*args: str) -> tuple[list[str], str]:
        out = subprocess.run(["bash", "-c", requeue_guard(tmp_path) + '\nscontrol "$@"', "x", *args],
                             capture_output=True, text=True, check=True,
                             env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "9",
                                  "SLURM_RESTART_COUNT": "1"})
        return (calls.read_text().splitlines() if calls.exists() else []), out.stdout
    return run, tmp_path / "trainer.exit"


def test_only_a_stop_of_this_attempt_is_requeued(guarded):
    run, exit_file = guarded
    assert STOP_EXIT_CODE == REQUEUE_EXIT_CODE
    assert run("requeue", "9") == ([], "[topd] not requeued: the trainer did not stop on request "
                                       f"(see {exit_file})\n")                     # no exit file: it crashed
    for code, attempt in ((1, "9.1"), (75, "9.0")):                                # failed; an earlier attempt's stop
        exit_file.write_text(json.dumps({"code": code, "attempt": attempt}))
        assert run("requeue", "9")[0] == []
    exit_file.write_text(json.dumps({"code": 75, "attempt": "9.1"}))               # as endpoints.write_exit writes it
    assert run("requeue", "9")[0] == ["requeue 9"]
    assert run("show", "job", "9")[0] == ["requeue 9", "show job 9"]               # other commands pass through


def test_each_role_execs_its_python():
    cmds = role_commands("c.yaml", ["a=1"], trainer_python="python3", server_python="py")
    assert all(c.startswith("exec ") for c in cmds.values())
