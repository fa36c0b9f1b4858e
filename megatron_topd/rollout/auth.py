"""The job's API key for its SGLang servers: who holds it, and the header every call sends.

Servers answer anyone who reaches their node; a key generated per job keeps other jobs' processes from replacing
the student's weights (`/update_weights_*`, `/init_weights_update_group`), pausing it or using it. The key lives in
one file that only the job's user can read (mode 0600); the environment variable `TOPD_API_KEY_FILE` names that file
(a path, not the key: environments and command lines of other users' processes can be listed, file modes hold).
SGLang's `--api-key` alone guards every endpoint but /health*, /ready* and /metrics*, the weight-update and
pause/continue ones included (`sglang.srt.utils.auth`: admin endpoints take the api key while no admin key is set).
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

KEY_FILE_ENV = "TOPD_API_KEY_FILE"
# What another job's process could otherwise do to this job's servers: generate, replace or re-point the weights,
# pause them, drop their cache (the tests check that each one refuses a call without the key).
GUARDED_ENDPOINTS = (
    "/generate", "/v1/completions", "/update_weights_from_disk", "/init_weights_update_group",
    "/update_weights_from_distributed", "/update_weights_from_tensor", "/update_weights_from_ipc",
    "/begin_weight_update", "/end_weight_update", "/destroy_weights_update_group", "/update_weight_version",
    "/pause_generation", "/continue_generation", "/abort_request", "/flush_cache", "/release_memory_occupation",
    "/resume_memory_occupation", "/get_weights_by_name", "/server_info", "/model_info",
)


def read_key(path: str | os.PathLike) -> str:
    """The key in `path`; refuses a file that others could read (then it is no secret) or an empty one."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise PermissionError(f"API key file {path} has mode {mode:o}: others can read it; it must be 0600 "
                              f"(chmod 600 {path}, or let the launcher write a fresh one)")
    key = path.read_text().strip()
    if not key:
        raise ValueError(f"API key file {path} is empty")
    return key


def create_key_file(path: str | os.PathLike) -> bool:
    """Write a fresh random key to `path` (mode 0600) unless the file exists; True if this call wrote it.
    Atomic across processes and nodes: the key is written to a private temporary file that is then hard-linked to
    `path`, which fails when another role came first, so every reader sees a whole key."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def job_key() -> str | None:
    """This job's key (the file `TOPD_API_KEY_FILE` names), or None outside a keyed job (local runs, tests)."""
    path = os.environ.get(KEY_FILE_ENV)
    return read_key(path) if path else None


def auth_headers(key: str | None = None) -> dict[str, str]:
    """`Authorization: Bearer <key>` for `key` (default: the job's), or no header without one."""
    key = job_key() if key is None else key
    return {"Authorization": f"Bearer {key}"} if key else {}
