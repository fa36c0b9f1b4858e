"""Endpoint hand-off between roles: each server writes its URL to `<endpoints>/<role>/<name>.json` once healthy; the
trainer waits for the expected count, with a deadline and an error that names the missing role and its log.

Files carry the attempt (`<job id>.<restart count>`): a requeued job never reads the URLs of its previous run.
A role's end is a file too: `<endpoints>/trainer.exit` holds the trainer's exit code, and the servers stop on it;
`<endpoints>/stop` is the batch script's stop request to the trainer (see train/preemption.py).
`<endpoints>/api_key.<attempt>` (0600) is the key every server of the attempt requires (rollout/auth.py).
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

EXIT_FILE = "trainer.exit"


def job_id() -> str | None:
    """The Slurm job id shared by every step: a heterogeneous job's components each have their own SLURM_JOB_ID,
    their leader's id is SLURM_HET_JOB_ID."""
    return os.environ.get("SLURM_HET_JOB_ID") or os.environ.get("SLURM_JOB_ID")


def attempt_id() -> str:
    """This run's identity: Slurm job id and restart count (both visible to every step of the job)."""
    job = job_id()
    if job is None:
        return f"local-{os.getppid()}"
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"


def node_name() -> str:
    """The Slurm node this process runs on (virtual nodes share one host: `hostname` would not tell them apart)."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname()


def publish(root: str | Path, role: str, name: str, url: str, *, log: str = "", **extra) -> Path:
    """Atomically write one endpoint file (a reader never sees half a file)."""
    folder = Path(root) / role
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    tmp = folder / f".{name}.json.tmp"
    tmp.write_text(json.dumps({"url": url, "attempt": attempt_id(), "node": node_name(), "log": log, **extra}))
    os.replace(tmp, path)
    return path


def publish_failure(root: str | Path, role: str, name: str, *, node: str, log: str, tail: str, error: str,
                    serving: bool = False) -> Path:
    """A server that exited or never became healthy: `<endpoints>/<role>/<name>.failed`, which the trainer's wait
    turns into an error at once (naming role, node, log and its last lines) instead of waiting out its deadline.
    `serving`: it died after it had served (launch/server_loss.py: the job requeues; a start-up failure fails it)."""
    folder = Path(root) / role
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.failed"
    tmp = folder / f".{name}.failed.tmp"
    tmp.write_text(json.dumps({"role": role, "name": name, "node": node, "log": log, "tail": tail, "error": error,
                               "serving": serving, "attempt": attempt_id()}))
    os.replace(tmp, path)
    return path


def _this_attempt(folder: Path, pattern: str) -> list[dict]:
    """The JSON files ``pattern`` in ``folder`` written by this attempt, sorted by file name (half-written or
    unreadable files are skipped: their writer has not finished)."""
    out = []
    for path in sorted(folder.glob(pattern)) if folder.is_dir() else []:
        try:
            entry = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            continue
        if entry.get("attempt") == attempt_id():
            out.append(entry)
    return out


def failures(root: str | Path, roles) -> list[dict]:
    """This attempt's failed servers of `roles`."""
    return [entry for role in roles for entry in _this_attempt(Path(root) / role, "*.failed")]


class ServerRoleFailed(RuntimeError):
    """A server role reported that one of its servers exited or never became healthy."""


def read(root: str | Path, role: str) -> list[dict]:
    """This attempt's endpoints of `role`, sorted by file name (a stable order for every reader)."""
    return _this_attempt(Path(root) / role, "*.json")


def wait_for(root: str | Path, expected: dict[str, int], *, timeout_s: float, logs: dict[str, str] | None = None,
             poll_s: float = 1.0) -> dict[str, list[str]]:
    """Block until every role has its expected number of URLs; return {role: [urls]}.

    Raises TimeoutError naming each role that is short, how many came, and where its log is. A server that died
    before becoming healthy shows up here as a missing URL; its log says why.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        failed = failures(root, expected)
        if failed:
            raise ServerRoleFailed("\n".join(
                f"{f['role']} server {f['name']} on node {f['node']} failed: {f['error']}\n  log: {f['log']}\n"
                f"--- last lines of its log ---\n{f['tail']}" for f in failed))
        found = {role: read(root, role) for role in expected}
        short = {role: n for role, n in expected.items() if len(found[role]) < n}
        if not short:
            return {role: [e["url"] for e in found[role][: expected[role]]] for role in expected}
        if time.monotonic() > deadline:
            lines = [f"  {role}: {len(found[role])} of {n} server URL(s) in {Path(root) / role} "
                     f"(log: {(logs or {}).get(role, 'the role log under launch.log_dir')})" for role, n in short.items()]
            raise TimeoutError(f"waited {timeout_s:.0f}s (launch.endpoint_timeout_s) for the SGLang servers; missing:\n"
                               + "\n".join(lines) + "\nA server that failed to start says why in its log.")
        time.sleep(poll_s)


def write_exit(root: str | Path, code: int) -> None:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    # Several ranks may write it at once (a stop request ends every rank with 75): one temporary file each.
    tmp = root / f".{EXIT_FILE}.{node_name()}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps({"code": int(code), "attempt": attempt_id()}))
    os.replace(tmp, root / EXIT_FILE)


def read_exit(root: str | Path) -> int | None:
    """The trainer's exit code of this attempt, or None while it runs."""
    try:
        entry = json.loads((Path(root) / EXIT_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return int(entry["code"]) if entry.get("attempt") == attempt_id() else None


def use_api_key(root: str | Path) -> Path:
    """Point this process (and the servers and clients it starts) at this attempt's API key file,
    `<endpoints>/api_key.<attempt>` (mode 0600); the first role to ask writes it, the others read the same key."""
    from megatron_topd.rollout.auth import KEY_FILE_ENV, create_key_file, read_key

    path = Path(root) / f"api_key.{attempt_id()}"
    path.parent.mkdir(parents=True, exist_ok=True)
    create_key_file(path)
    read_key(path)  # fails here, naming the file, if it is not the job's user's alone
    os.environ[KEY_FILE_ENV] = str(path)
    return path


STOP_FILE = "stop"


def stop_requested(root: str | Path) -> bool:
    """The batch script asked this attempt to stop (`<endpoints>/stop`, written by slurm/job.sh's SIGUSR1 trap as
    {"attempt": ...}): a stale file of an earlier attempt is ignored."""
    try:
        entry = json.loads((Path(root) / STOP_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return entry.get("attempt") == attempt_id()
