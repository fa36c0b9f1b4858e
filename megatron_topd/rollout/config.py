"""`RolloutConfig`: the SGLang servers, sampling, client robustness and weight sync of the rollout layer.

The lead's top-level config nests this dataclass under `rollout`; `validate()` fails early with the field name and
the fix, so a bad value never reaches a server that takes half a minute to start.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial

from megatron_topd import checks

SYNC_METHODS = ("disk", "tensor", "distributed")
SYNC_BACKENDS = ("auto", "gloo", "nccl")
PAUSE_MODES = ("retract", "in_place", "abort")
DEVICES = ("cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")

_choice = partial(checks.choice, "rollout")
_int_at_least = partial(checks.int_at_least, "rollout")
_int_in = partial(checks.int_in, "rollout")
_number_in = partial(checks.number_in, "rollout")


@dataclass
class RolloutConfig:
    # --- servers: launch `num_servers` of them (ports: given or free), or use running ones through `urls` ---
    server_python: str = ".venv-sglang/bin/python"  # interpreter with sglang installed (never the trainer's)
    model_path: str = ""  # HF checkpoint directory the servers start from
    urls: list[str] = field(default_factory=list)  # already-running servers; when set nothing is launched
    num_servers: int = 1
    host: str = "127.0.0.1"
    ports: list[int] = field(default_factory=list)  # one per server; empty = pick free ports
    device: str = "cpu"  # cpu uses the shims in rollout/cpu_shims; cuda uses a normal sglang install
    dtype: str = "auto"
    tp_size: int = 1
    mem_fraction_static: float | None = None  # None = 0.05 on cpu, SGLang's own default on cuda
    context_length: int | None = None
    extra_server_args: list[str] = field(default_factory=list)  # appended last, so they override the defaults
    server_log_dir: str = "runs/sglang"
    startup_timeout_s: float = 300.0
    server_seed: int = 0
    # --enable-deterministic-inference on launched servers: each sample's sampling_seed is honoured and a sample no
    # longer depends on what else the server batches with it (docs/rollout.md "Reproducible sampling"). Off by
    # default: it costs the radix cache on CPU and batch-invariant (slower) kernels on GPU. With `urls`, start those
    # servers with the flag yourself.
    deterministic: bool = False
    # The probe's window requests go ahead of queued rollouts on a student server (async rollouts share the servers
    # with the probe): launched student servers run SGLang's priority scheduling when train.async_rollouts is on,
    # windows are sent at priority 1 and rollouts at 0 - a gap below SGLang's preemption threshold (10), so no
    # running rollout is retracted; windows only jump the queue. With `urls` and async rollouts, start those servers
    # with --enable-priority-scheduling yourself (a server without it ignores the priorities).
    windows_first: bool = True
    # --- sampling of student rollouts (DESIGN: n=4, temperature 1.0) ---
    n_samples: int = 4
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    max_new_tokens: int = 1024
    seed: int | None = None  # per-sample seeds are derived from it; honoured only with `deterministic: true`
    # --- client ---
    request_timeout_s: float = 600.0  # one HTTP request (one prompt and its n samples)
    connect_timeout_s: float = 10.0
    max_retries: int = 3  # per request, on connection errors, timeouts, 5xx and aborted generations
    retry_backoff_s: float = 0.5  # doubles per attempt, capped at 30 s
    max_inflight_per_server: int = 64
    # --- weight sync (trainer -> servers) ---
    sync_method: str = "distributed"  # disk | tensor (same host) | distributed (gloo on cpu, nccl on cuda)
    sync_bucket_mb: float = 512.0  # tensors are sent in buckets up to this size
    sync_dir: str = "runs/weight_sync"  # disk: where the safetensors checkpoint is written
    sync_master_address: str = "127.0.0.1"  # distributed: address of trainer rank 0, reachable from the servers
    sync_master_port: int = 0  # 0 = a free port
    sync_backend: str = "auto"  # auto = nccl on cuda, gloo on cpu
    sync_timeout_s: float = 600.0
    pause_mode: str = "retract"  # how in-flight generations wait out a sync (SGLang /pause_generation modes)

    def validate(self, *, require_model: bool = True) -> "RolloutConfig":
        """Raise ValueError naming the first bad field and how to fix it; return self for chaining.

        ``require_model=False`` checks everything but the server source (a run config before its paths are filled).
        """
        if require_model and not self.urls and not self.model_path:
            raise ValueError("rollout.model_path is empty: set it to an HF checkpoint directory, or set rollout.urls")
        _choice("device", self.device, DEVICES)
        _choice("dtype", self.dtype, DTYPES)
        _choice("sync_method", self.sync_method, SYNC_METHODS)
        _choice("sync_backend", self.sync_backend, SYNC_BACKENDS)
        _choice("pause_mode", self.pause_mode, PAUSE_MODES)
        if self.device == "cpu" and self.sync_backend == "nccl":
            raise ValueError("rollout.sync_backend='nccl' with rollout.device='cpu': use 'gloo' or 'auto'")
        for i, url in enumerate(self.urls):
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"rollout.urls[{i}]={url!r}: use a full URL such as http://127.0.0.1:30000")
        _int_at_least("num_servers", self.num_servers, 1)
        if self.ports and len(self.ports) != self.num_servers:
            raise ValueError(
                f"rollout.ports has {len(self.ports)} entries for rollout.num_servers={self.num_servers}: "
                "give one port per server, or leave rollout.ports empty to pick free ports"
            )
        for i, port in enumerate(self.ports):
            _int_in(f"ports[{i}]", port, 1, 65535)
        _int_at_least("tp_size", self.tp_size, 1)
        for i, arg in enumerate(self.extra_server_args):
            if not isinstance(arg, str):  # a dotted override [--max-total-tokens,16384] parses the number as an int
                raise ValueError(f"rollout.extra_server_args[{i}]={arg!r} is not a string: quote it, e.g. "
                                 '\'rollout.extra_server_args=["--max-total-tokens","16384"]\'')
        for name in ("deterministic", "windows_first"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"rollout.{name}={getattr(self, name)!r}: use true or false")
        if self.mem_fraction_static is not None:
            _number_in("mem_fraction_static", self.mem_fraction_static, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.context_length is not None:
            _int_at_least("context_length", self.context_length, 2)
        _number_in("startup_timeout_s", self.startup_timeout_s, 0.0, math.inf, lo_open=True)
        _int_at_least("n_samples", self.n_samples, 1)
        _number_in("temperature", self.temperature, 0.0, math.inf)
        _number_in("top_p", self.top_p, 0.0, 1.0, lo_open=True)
        if self.top_k != -1:
            _int_at_least("top_k", self.top_k, 1, "(or -1 for off)")
        _int_at_least("max_new_tokens", self.max_new_tokens, 1)
        if self.seed is not None:
            _int_in("seed", self.seed, 0, 2**62)
        _number_in("request_timeout_s", self.request_timeout_s, 0.0, math.inf, lo_open=True)
        _number_in("connect_timeout_s", self.connect_timeout_s, 0.0, math.inf, lo_open=True)
        _int_at_least("max_retries", self.max_retries, 0)
        _number_in("retry_backoff_s", self.retry_backoff_s, 0.0, 60.0)
        _int_at_least("max_inflight_per_server", self.max_inflight_per_server, 1)
        _number_in("sync_bucket_mb", self.sync_bucket_mb, 0.0, math.inf, lo_open=True)
        if self.sync_method == "disk" and not self.sync_dir:
            raise ValueError("rollout.sync_dir is empty with sync_method='disk': set a directory the servers can read")
        _int_in("sync_master_port", self.sync_master_port, 0, 65535)
        _number_in("sync_timeout_s", self.sync_timeout_s, 0.0, math.inf, lo_open=True)
        return self

    @property
    def resolved_sync_backend(self) -> str:
        if self.sync_backend != "auto":
            return self.sync_backend
        return "nccl" if self.device == "cuda" else "gloo"


def windows_ahead(rollout: RolloutConfig, async_rollouts: bool) -> bool:
    """Whether requests carry priorities (`rollout.windows_first`): only async rollouts share a student server with
    the probe's windows, so a synchronous run sends exactly the requests it always sent."""
    return async_rollouts and rollout.windows_first


def student_server_flags(rollout: RolloutConfig, async_rollouts: bool) -> list[str]:
    """SGLang flags a launched student server needs beyond `rollout.extra_server_args` (loop and Slurm launcher)."""
    return ["--enable-priority-scheduling"] if windows_ahead(rollout, async_rollouts) else []
