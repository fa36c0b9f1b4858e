"""Fixtures for tests against real SGLang servers on CPU (tiny random model + tokenizer built at test time).

One server is shared by the whole session (a start costs 15-30 s on an idle machine, minutes on a loaded one), and
`RolloutTarget` tracks which weights it serves, so a test comparing with Hugging Face uses the right reference even
after a weight-sync test changed them. Without .venv-sglang these tests FAIL (never skip): `make setup-sglang`.
"""
from __future__ import annotations

import asyncio
import json
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
    """What a server logged from now on: its POST /generate lines and the scheduler's prefill token counts.

    Every read waits for what it needs (a number of access-log lines, a number of prompt tokens in the prefill lines)
    with a deadline and fails naming what it waited for: the access log lags the responses, and SGLang writes a prefill
    batch's line after the batch's outputs went out."""

    POST = '"POST /generate HTTP/1.1" 200'

    def __init__(self, server: SGLangServer, timeout_s: float = 120.0):
        self.server, self.at, self.timeout_s = server, server.log_path.stat().st_size, timeout_s

    def text(self, want_posts: int = 0) -> str:
        """The log since construction, once it holds ``want_posts`` POST /generate lines."""
        return self._wait(lambda log: log.count(self.POST) >= want_posts, f"{want_posts} POST /generate lines",
                          lambda log: f"{log.count(self.POST)} POST lines")

    def prefill_tokens(self, want_tokens: int) -> tuple[int, int]:
        """(tokens prefilled, tokens found in the radix cache) over the prefill batches logged since construction,
        once their sum reaches ``want_tokens`` (the prompt tokens the test sent this server: each is either
        prefilled or found in the cache)."""
        log = self._wait(lambda log: sum(self._prefill(log)) >= want_tokens,
                         f"prefill lines covering {want_tokens} prompt tokens",
                         lambda log: "(new, cached) = %s" % (self._prefill(log),))
        return self._prefill(log)

    @staticmethod
    def _prefill(log: str) -> tuple[int, int]:
        return (sum(map(int, re.findall(r"#new-token: (\d+)", log))),
                sum(map(int, re.findall(r"#cached-token: (\d+)", log))))

    def _wait(self, done, what: str, state) -> str:
        deadline = time.monotonic() + self.timeout_s
        while not done(log := self._read()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.server.log_path}: no {what} after {self.timeout_s:.0f} s; it holds "
                                     f"{state(log)}. Log since the test began (last 3000 chars):\n{log[-3000:]}")
            time.sleep(0.05)  # polling interval of a wait on the log's content (deadline above)
        return log

    def _read(self) -> str:
        with open(self.server.log_path, "rb") as f:
            f.seek(self.at)
            return f.read().decode(errors="replace")


def server_load(url: str) -> dict:
    """The server's load as its scheduler last published it (SGLang's GET /v1/loads; one DP rank here): among
    others ``num_running_reqs`` (in the running batch) and ``num_waiting_reqs`` (queued)."""
    with urllib.request.urlopen(f"{url}/v1/loads?include=core", timeout=30) as response:
        (load,) = json.load(response)["loads"]
    return load


async def await_load(url: str, what: str, ok, *, timeout_s: float = 120.0, give_up=None) -> dict:
    """Poll ``url``'s load until ``ok(load)``; return that load. Fails naming ``what`` and the (running, waiting)
    counts seen, when the deadline passes or when ``give_up()`` returns a reason (e.g. the requests it waits for
    already finished). Runs the HTTP call in a thread, so the caller's event loop keeps serving its requests."""
    deadline = time.monotonic() + timeout_s
    seen: list[tuple[int, int]] = []
    while True:
        load = await asyncio.to_thread(server_load, url)
        counts = (load["num_running_reqs"], load["num_waiting_reqs"])
        if not seen or seen[-1] != counts:
            seen.append(counts)
        if ok(load):
            return load
        reason = give_up() if give_up is not None else None
        if reason is None and time.monotonic() > deadline:
            reason = f"not within {timeout_s:.0f} s"
        if reason is not None:
            raise AssertionError(f"waited for {what} on {url}: {reason}; (running, waiting) requests seen: {seen}")
        await asyncio.sleep(0.02)  # polling interval of a wait on the server's reported load (deadline above)


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


@pytest.fixture(scope="package")
def demo_servers(demo_assets, tmp_path_factory) -> dict[str, list[str]]:
    """The tiny demo's student and teacher servers, launched once by the loop's own code (`LaunchedServers`, the
    student with an async run's priority scheduling, which a synchronous run's requests never use) and shared by the
    loop tests. A run pointed at them (`rollout.urls`, `teacher.urls`) first brings the student server to its own
    checkpoint, so each run starts from its student exactly as on servers it launched; the teacher's never change."""
    from megatron_topd.config import load_config
    from megatron_topd.train.setup import LaunchedServers

    cfg = load_config(REPO / "examples" / "cpu_demo.yaml", [
        f"train.student_hf_path={demo_assets['student_hf']}", f"teacher.hf_path={demo_assets['teacher_hf']}",
        f"train.prompts_path={demo_assets['prompts']}", f"rollout.server_python={sglang_python()}",
        f"rollout.server_log_dir={tmp_path_factory.mktemp('demo_server_logs')}", "train.async_rollouts=true"])
    servers = LaunchedServers(cfg)
    try:
        student, teacher = servers.start()
        yield {"student": student, "teacher": teacher}
    finally:
        servers.stop()
