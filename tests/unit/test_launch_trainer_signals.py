"""The trainer role's task takes a stop request that comes while it still imports torch (seconds, before any handler
could be installed) instead of dying of it: SIGTERM (preemption with GraceTime, `scancel --signal=TERM`) and SIGUSR1
are held from the first line of `launch/trainer.py`'s main and handed to the stop handler once it is in place.
A real process: the signal is sent by the process to itself at the moment torch's import starts (an import hook),
so the test does not depend on timing."""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[2]

# Runs the trainer's entry point as `python -m megatron_topd.launch.trainer` would, with an import hook that sends
# the signal when `import torch` begins; the config path does not exist, so the task ends right after its set-up.
PROGRAM = """
import importlib.abc, os, runpy, signal, sys

SIG = int(sys.argv[1])

class SignalOnTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "torch":
            sys.meta_path.remove(self)
            os.kill(os.getpid(), SIG)
        return None

sys.meta_path.insert(0, SignalOnTorch())
sys.argv = ["megatron_topd.launch.trainer", "--config", "/nonexistent/topd.yaml"]
try:
    runpy.run_module("megatron_topd.launch.trainer", run_name="__main__", alter_sys=True)
except (Exception, SystemExit) as e:
    print("ended with", type(e).__name__, e, flush=True)
from megatron_topd.train import preemption
print("stop requested:", preemption.requested_locally(), flush=True)
"""


def test_a_sigterm_during_the_torch_import_is_kept_as_a_stop_request():
    """SIGTERM (SIGUSR1 is held by the same line); before the fix the task died of it (returncode -15)."""
    sig = signal.SIGTERM
    proc = subprocess.run([sys.executable, "-c", PROGRAM, str(int(sig))], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, (proc.returncode, proc.stdout, proc.stderr[-2000:])  # -sig: it died of it
    assert "ended with FileNotFoundError" in proc.stdout, proc.stdout  # it went on to read its config
    assert f"{sig.name} received, stopping after this step" in proc.stdout and "stop requested: True" in proc.stdout
