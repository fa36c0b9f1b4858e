"""The job's API key file (issue 23): written once per attempt with mode 0600 by whichever role comes first, the same
key for every role, refused when others can read it; the header the clients send."""
from __future__ import annotations

import os

import pytest

from megatron_topd.launch import endpoints
from megatron_topd.rollout.auth import KEY_FILE_ENV, auth_headers, create_key_file, job_key, read_key


@pytest.fixture
def attempt(monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "41")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    monkeypatch.delenv("SLURM_HET_JOB_ID", raising=False)
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)


def test_every_role_of_an_attempt_gets_one_private_key(tmp_path, attempt, monkeypatch):
    first = endpoints.use_api_key(tmp_path)
    key = job_key()
    assert first == tmp_path / "api_key.41.0" and os.environ[KEY_FILE_ENV] == str(first)
    assert oct(first.stat().st_mode & 0o777) == "0o600" and len(key) == 64
    assert endpoints.use_api_key(tmp_path) == first and job_key() == key  # a later role reads the same key
    assert auth_headers() == {"Authorization": f"Bearer {key}"}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued attempt: a new key
    assert endpoints.use_api_key(tmp_path) == tmp_path / "api_key.41.1" and job_key() != key


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "api_key"
    assert create_key_file(path)
    path.chmod(0o644)
    with pytest.raises(PermissionError, match="0600"):
        read_key(path)
    empty = tmp_path / "empty"
    empty.touch(mode=0o600)
    with pytest.raises(ValueError, match="empty"):
        read_key(empty)


def test_without_a_job_key_no_header_is_sent(monkeypatch):
    monkeypatch.delenv(KEY_FILE_ENV, raising=False)
    assert job_key() is None and auth_headers() == {}
    assert auth_headers("k") == {"Authorization": "Bearer k"}
