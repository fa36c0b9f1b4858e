"""rollout/hold_sigterm.py: a server started through it keeps SIGTERM pending in its main process and in the
processes it spawns, although its main process starts multiprocessing's resource tracker (which unblocks SIGTERM
after its own spawn, as in SGLang's main process); started without it, the same program dies of SIGTERM.
Real processes and signals, no SGLang (the Slurm tier sends SIGTERM to a real server's job)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from megatron_topd.rollout import SGLangServer
from megatron_topd.rollout.server import HOLD_SIGTERM

# A stand-in for SGLang's main process: starts the resource tracker, spawns a child, says "ready", then (after the
# test's SIGTERM to its whole process group) reports whether SIGTERM is pending in itself and in its child.
APP = """
import json, multiprocessing as mp, signal, sys
from multiprocessing import resource_tracker

def child(conn):
    conn.recv()
    conn.send(signal.SIGTERM in signal.sigpending())

if __name__ == "__main__":
    resource_tracker.ensure_running()
    ctx = mp.get_context("spawn")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=child, args=(theirs,))
    proc.start()
    print("ready", sys.argv[1:], flush=True)
    sys.stdin.readline()
    mine.send("?")
    print(json.dumps({"main": signal.SIGTERM in signal.sigpending(), "child": mine.recv()}), flush=True)
    proc.join()
"""


def run_app(tmp_path, launch: list[str]) -> tuple[int, str]:
    (tmp_path / "held_app.py").write_text(APP)
    proc = subprocess.Popen([sys.executable, *launch, "held_app", "--port", "1"], cwd=tmp_path, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(tmp_path)},
                            # as launch/serve.py: the role holds SIGTERM, its children inherit the mask
                            preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM}))
    try:
        assert proc.stdout.readline().strip() == "ready ['--port', '1']"
        os.killpg(proc.pid, signal.SIGTERM)  # as Slurm: every process of the step
        try:
            proc.stdin.write("\n")
            proc.stdin.flush()
        except BrokenPipeError:
            pass
        out, _ = proc.communicate(timeout=60)
        return proc.returncode, out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_sigterm_stays_pending_in_the_server_and_its_children(tmp_path):
    code, out = run_app(tmp_path, [str(HOLD_SIGTERM)])
    assert code == 0 and json.loads(out) == {"main": True, "child": True}, out


def test_without_it_the_resource_tracker_unblocks_sigterm_and_the_server_dies(tmp_path):
    code, out = run_app(tmp_path, ["-m"])
    assert code == -signal.SIGTERM, (code, out)


def test_sglang_server_holding_sigterm_runs_sglang_through_it(tmp_path):
    held = SGLangServer(tmp_path, python=sys.executable, port=31234, log_dir=tmp_path, hold_sigterm=True)
    assert held.command()[:3] == [sys.executable, str(HOLD_SIGTERM), "sglang.launch_server"]
    plain = SGLangServer(tmp_path, python=sys.executable, port=31234, log_dir=tmp_path)
    assert plain.command()[1:3] == ["-m", "sglang.launch_server"] and plain.command()[3:] == held.command()[3:]
