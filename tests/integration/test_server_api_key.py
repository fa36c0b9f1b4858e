"""A server started with the job's API key (issue 23) refuses every call without it - /generate and each
weight-update, pause and cache endpoint - and serves the job's own clients, which send it; the key never shows on a
command line or in the server's log, although SGLang logs all its arguments."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import psutil
import pytest

from megatron_topd.rollout import SamplingParams, SGLangClient
from megatron_topd.rollout.auth import GUARDED_ENDPOINTS, KEY_FILE_ENV, create_key_file, read_key
from megatron_topd.rollout.weight_sync import admin

from .conftest import start_server

pytestmark = [pytest.mark.sglang, pytest.mark.slow]


def status(url: str, headers: dict | None = None, payload: dict | None = None) -> int:
    """The HTTP status of a POST of `payload` (default {}) to `url`."""
    request = urllib.request.Request(url, data=json.dumps(payload or {}).encode(), method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


@pytest.fixture(scope="module")
def keyed(tiny_model_dir, tmp_path_factory):
    """A server that took the key from the job's key file (TOPD_API_KEY_FILE), as a launched role's servers do (one
    server start for this module)."""
    folder = tmp_path_factory.mktemp("keyed")
    key_file = folder / "api_key"
    assert create_key_file(key_file) and not create_key_file(key_file)  # a second writer keeps the first key
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_FILE_ENV, str(key_file))
        server = start_server(tiny_model_dir, folder / "logs")
        try:
            yield server.wait_healthy(), read_key(key_file)  # /health answers without a key (probes)
        finally:
            server.stop()


def test_without_the_key_every_guarded_endpoint_is_refused(keyed):
    server, key = keyed
    for path in GUARDED_ENDPOINTS:
        assert status(server.url + path) == 401, f"{path} answered a request without the key"
        assert status(server.url + path, {"Authorization": "Bearer not-the-key"}) == 401, path


def test_the_jobs_own_calls_succeed(keyed, tiny_model_dir):
    server, key = keyed
    gens = SGLangClient([server.url], context_length=512).generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(gens[0][0].token_ids) == 4
    admin.call_all([server.url], "/pause_generation", {"mode": "abort"})
    admin.call_all([server.url], "/update_weights_from_disk", {"model_path": str(tiny_model_dir)})
    admin.call_all([server.url], "/continue_generation", {})
    assert admin.call(server.url, "/model_info", method="GET")["model_path"]
    # The distributed and tensor paths pass the key check too: with an empty body they fail on the body, not on it.
    for path in ("/init_weights_update_group", "/update_weights_from_distributed", "/update_weights_from_tensor"):
        assert status(server.url + path, {"Authorization": f"Bearer {key}"}) in (400, 422), path


def test_the_key_is_on_no_command_line_and_in_no_log(keyed):
    server, key = keyed
    processes = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
    assert len(processes) >= 3  # the HTTP server, its scheduler and detokenizer
    for p in processes:
        assert key not in " ".join(p.cmdline()), f"the key is on the command line of {p.pid} ({p.name()})"
    assert oct(server.key_config_path.stat().st_mode & 0o777) == "0o600"
    log = server.log_path.read_text()
    assert "'api_key': '<api key hidden>'" in log, "SGLang logs its arguments: the key's place there is hidden"
    assert key not in log

