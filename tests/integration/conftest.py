"""Fixtures for tests against real SGLang servers on CPU (tiny random model + tokenizer built at test time).

One server is shared by the whole session (a start costs 15-30 s on an idle machine, minutes on a loaded one), and
`RolloutTarget` tracks which weights it serves, so a test comparing with Hugging Face uses the right reference even
after a weight-sync test changed them. Without .venv-sglang these tests FAIL (never skip): `make setup-sglang`.
"""
from __future__ import annotations

import os
import re
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from megatron_topd.rollout import SGLangClient, SGLangServer
from safetensors.torch import load_file

from megatron_topd.testing.tiny_hf import build_tiny_model, load_hf_model, load_spec

REPO = Path(__file__).resolve().parents[2]


def sglang_python() -> str:
    """The SGLang interpreter (env MEGATRON_TOPD_SGLANG_PYTHON overrides); fails the test when it is missing."""
    python = os.environ.get("MEGATRON_TOPD_SGLANG_PYTHON", str(REPO / ".venv-sglang" / "bin" / "python"))
    if not os.access(python, os.X_OK):
        pytest.fail(
            f"SGLang interpreter {python} not found: these tests need a real SGLang server. Run `make setup-sglang` "
            "(builds .venv-sglang), or point MEGATRON_TOPD_SGLANG_PYTHON at a python with sglang installed."
        )
    return python


class ServerLog:
    """What a server logged from now on: its POST /generate lines and the scheduler's prefill token counts."""

    POST = '"POST /generate HTTP/1.1" 200'

    def __init__(self, server: SGLangServer):
        self.server, self.at = server, server.log_path.stat().st_size

    def text(self, want_posts: int = 0) -> str:
        """The log since construction, once it holds ``want_posts`` POST lines (the access log lags; 10 s at most)."""
        deadline = time.monotonic() + 10
        while self._read().count(self.POST) < want_posts and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.3)  # the scheduler's lines of the last batch
        return self._read()

    def prefill_tokens(self, want_posts: int = 0) -> tuple[int, int]:
        """(tokens prefilled, tokens found in the radix cache) over the prefill batches logged since construction."""
        log = self.text(want_posts)
        return (sum(map(int, re.findall(r"#new-token: (\d+)", log))),
                sum(map(int, re.findall(r"#cached-token: (\d+)", log))))

    def _read(self) -> str:
        with open(self.server.log_path, "rb") as f:
            f.seek(self.at)
            return f.read().decode(errors="replace")


def flush_cache(server: SGLangServer) -> None:
    urllib.request.urlopen(urllib.request.Request(server.url + "/flush_cache", data=b"", method="POST"),
                           timeout=60).read()


def start_server(model_dir: Path, log_dir: Path, **kw) -> SGLangServer:
    server = SGLangServer(model_dir, python=sglang_python(), dtype="float32", context_length=512, log_dir=log_dir,
                          startup_timeout_s=600, **kw)
    server.start()
    return server


class RolloutTarget:
    """A running server, the model directory it started from, and the weights it serves now."""

    def __init__(self, server: SGLangServer, model_dir: Path):
        self.server = server
        self.url = server.url
        self.model_dir = model_dir
        self.spec = load_spec(model_dir)
        self.state = load_file(str(model_dir / "model.safetensors"))
        self.version = "default"
        self._hf = None

    def served(self, state: dict[str, torch.Tensor], version: str) -> None:
        """Record that the server now serves `state` as `version` (call after a successful sync)."""
        self.state, self.version, self._hf = state, version, None

    def hf(self):
        """transformers model with the weights the server serves now."""
        if self._hf is None:
            self._hf = load_hf_model(self.model_dir, self.state)
        return self._hf

    def client(self, **kw) -> SGLangClient:
        return SGLangClient([self.url], vocab_size=self.spec.vocab_size, context_length=512, **kw)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama") / "model", arch="llama", seed=0)


# Package scope: the servers' schedulers poll the CPU even when idle, so they stop once the integration tests end
# (the unit tests that follow get both cores). test_loop_topd.py sorts first and runs before they start.
@pytest.fixture(scope="package")
def _servers(tiny_model_dir, tmp_path_factory):
    """Spawn the shared server and a spare at once (start-ups overlap); each fixture waits for its own."""
    logs = tmp_path_factory.mktemp("sglang_logs")
    servers = {"main": start_server(tiny_model_dir, logs)}
    try:
        servers["spare"] = start_server(tiny_model_dir, logs)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


@pytest.fixture(scope="package")
def rollout_target(_servers, tiny_model_dir) -> RolloutTarget:
    return RolloutTarget(_servers["main"].wait_healthy(), tiny_model_dir)


@pytest.fixture(scope="package")
def spare_server(_servers) -> SGLangServer:
    """A second server on the same checkpoint, for tests that kill a server (it serves the original weights)."""
    return _servers["spare"].wait_healthy()
