"""`SGLangServer`: launch `python -m sglang.launch_server` in its own environment and own it until it stops.

The trainer never imports sglang: a server is a subprocess of the configured interpreter (`.venv-sglang/bin/python`
here, the cluster's sglang install elsewhere) and the rest of the rollout layer talks to it over HTTP. On CPU the shims
in `cpu_shims/` go first on its PYTHONPATH, with SGLANG_USE_CPU_ENGINE=1.

Each server runs in its own process group (SGLang starts scheduler and detokenizer children), so `stop()` ends the
whole tree. Live servers are stopped at interpreter exit and on SIGTERM; on Linux a server launched from the main
thread also gets SIGTERM if the launching process dies.

With an API key (the job's, `auth.py`), SGLang gets it from a 0600 `--config` YAML file (never on its command line,
which every user can list), and its output reaches the log through a pipe that hides the key: SGLang 0.5.23 logs
all its server arguments, `api_key` included.

With `hold_sigterm=True` (the Slurm server roles) SGLang runs with SIGTERM held (`hold_sigterm.py`): Slurm's SIGTERM
to the job's processes does not stop it, and `stop()` ends it with SIGKILL.
"""
from __future__ import annotations

import atexit
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import weakref
from functools import partial
from pathlib import Path

from .auth import auth_headers, job_key
from .errors import ServerStartError

CPU_SHIMS_DIR = Path(__file__).resolve().parent / "cpu_shims"
HOLD_SIGTERM = Path(__file__).resolve().parent / "hold_sigterm.py"  # runs SGLang with SIGTERM blocked
# Flags that make SGLang 0.5.23 run on a plain CPU (see docs/rollout.md); extra_args come later and override them.
CPU_DEFAULT_ARGS = (
    "--attention-backend", "torch_native",
    "--sampling-backend", "pytorch",
    "--disable-cuda-graph",
    "--skip-server-warmup",
    "--max-total-tokens", "4096",
    # An idle scheduler otherwise polls its sockets at ~80% of a core: on a CPU machine that shares its cores with
    # the trainer, every training pass would compete with every idle server.
    "--sleep-on-idle",
)
_LIVE: "weakref.WeakSet[SGLangServer]" = weakref.WeakSet()
_HANDLERS_INSTALLED = False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


_LAUNCHER_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "GROUP_WORLD_SIZE",
                  "ROLE_RANK", "ROLE_WORLD_SIZE", "ROLE_NAME", "MASTER_ADDR", "MASTER_PORT", "TORCH_NCCL_ASYNC_ERROR_HANDLING"}


# What uvicorn logs when the HTTP port is taken (SGLang binds it only after loading the model).
HTTP_BIND_ERROR = "error while attempting to bind on address"


class SGLangServer:
    """One SGLang HTTP server process. Use as a context manager, or call `start()` / `wait_healthy()` / `stop()`."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        python: str | os.PathLike = ".venv-sglang/bin/python",
        host: str = "127.0.0.1",
        port: int | None = None,
        bind: str | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        tp_size: int = 1,
        mem_fraction_static: float | None = None,
        context_length: int | None = None,
        seed: int = 0,
        deterministic: bool = False,
        extra_args: list[str] | tuple[str, ...] = (),
        log_dir: str | os.PathLike = "runs/sglang",
        startup_timeout_s: float = 300.0,
        env: dict[str, str] | None = None,
        module: str = "sglang.launch_server",
        api_key: str | None = None,
        hold_sigterm: bool = False,
    ):
        # Absolute paths: the server runs in its log directory (it drops crash files into its working directory).
        self.model_path = str(Path(model_path).absolute()) if Path(model_path).exists() else str(model_path)
        self.python = str(Path(python).absolute()) if os.sep in str(python) else str(python)
        self.host = host  # the address in the URL (what clients reach)
        self.bind = bind or host  # the address SGLang binds (e.g. 0.0.0.0: every interface of the node)
        self.port = port or free_port(self.bind)
        # A port we picked is free when picked, but SGLang binds it only after ~20 s of start-up, and meanwhile another
        # process (a second server's internal ports, a gloo store) can take it: then start again on a fresh port.
        self._port_given = bool(port)  # a port the user gave is never changed
        self._port_retries = 0 if port else 3
        self.device = device
        self.dtype = dtype
        self.tp_size = tp_size
        self.mem_fraction_static = mem_fraction_static
        self.context_length = context_length
        self.seed = seed
        self.deterministic = deterministic
        self.extra_args = list(extra_args)
        self.log_dir = Path(log_dir)
        self.startup_timeout_s = startup_timeout_s
        self.env = dict(env or {})
        self.module = module
        self.api_key = api_key if api_key is not None else job_key()  # None: no key (a local run)
        self.hold_sigterm = hold_sigterm  # SIGTERM held (hold_sigterm.py); stop() uses SIGKILL
        self.proc: subprocess.Popen | None = None
        self._log_file = None
        self._log_copier: threading.Thread | None = None

    @classmethod
    def from_config(cls, cfg, index: int = 0) -> "SGLangServer":
        """Server `index` of a validated `RolloutConfig`."""
        return cls(
            cfg.model_path,
            python=cfg.server_python,
            host=cfg.host,
            port=cfg.ports[index] if cfg.ports else None,
            device=cfg.device,
            dtype=cfg.dtype,
            tp_size=cfg.tp_size,
            mem_fraction_static=cfg.mem_fraction_static,
            context_length=cfg.context_length,
            seed=cfg.server_seed,
            deterministic=cfg.deterministic,
            extra_args=cfg.extra_server_args,
            log_dir=cfg.server_log_dir,
            startup_timeout_s=cfg.startup_timeout_s,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        launch = [str(HOLD_SIGTERM), self.module] if self.hold_sigterm else ["-m", self.module]
        cmd = [self.python, *launch, "--model-path", self.model_path, "--host", self.bind,
               "--port", str(self.port), "--device", self.device, "--dtype", self.dtype,
               "--tp-size", str(self.tp_size), "--random-seed", str(self.seed)]
        if self.device == "cpu":
            cmd += CPU_DEFAULT_ARGS
        mem = self.mem_fraction_static if self.mem_fraction_static is not None else (0.05 if self.device == "cpu" else None)
        if mem is not None:
            cmd += ["--mem-fraction-static", str(mem)]
        if self.context_length is not None:
            cmd += ["--context-length", str(self.context_length)]
        if self.deterministic:  # per-request sampling_seed honoured, batch-invariant kernels (docs/rollout.md)
            cmd += ["--enable-deterministic-inference"]
        if self.api_key:
            cmd += ["--config", str(self.key_config_path)]
        return cmd + self.extra_args

    @property
    def key_config_path(self) -> Path:
        """The 0600 YAML that hands SGLang its `api_key` (its `--config`; removed when the server stops)."""
        return self.log_dir / f".sglang-{self.host}-{self.port}.key.yaml"

    def environment(self) -> dict[str, str]:
        # A trainer rank launched by torchrun/srun carries RANK, WORLD_SIZE, MASTER_* ...: SGLang's own
        # torch.distributed init would read them and wait forever for the trainer's other ranks. Drop them.
        env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_VARS and not k.startswith("TORCHELASTIC_")}
        # As if its venv were activated: SGLang runs tools of its env (py-spy for crash dumps, ninja).
        python = shutil.which(self.python) or self.python
        env["PATH"] = os.pathsep.join([str(Path(python).absolute().parent), env.get("PATH", "")])
        if self.device == "cpu":
            env["SGLANG_USE_CPU_ENGINE"] = "1"
            env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CPU_SHIMS_DIR), env.get("PYTHONPATH", "")) if p)
            if self.deterministic:  # lets torch_native serve --enable-deterministic-inference (cpu_shims/README.md)
                env["MEGATRON_TOPD_CPU_DETERMINISTIC"] = "1"
        env.update(self.env)
        return env

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> "SGLangServer":
        """Spawn the server (returns at once; call `wait_healthy()`)."""
        if self.proc is not None:
            raise RuntimeError(f"SGLangServer {self.url} was already started")
        python = shutil.which(self.python)
        if python is None:
            raise ServerStartError(
                f"SGLang python {self.python!r} does not exist or is not executable: run `make setup-sglang` "
                "(builds .venv-sglang), or set rollout.server_python to an interpreter with sglang installed"
            )
        _install_exit_handlers()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.log_path, "ab", buffering=0)
        self._log_file.write(f"\n=== {time.strftime('%F %T')} {' '.join(self.command())}\n".encode())
        in_main = threading.current_thread() is threading.main_thread()
        if self.api_key:
            fd = os.open(self.key_config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)  # an older file keeps its mode through O_CREAT
            with os.fdopen(fd, "w") as f:
                f.write(f"api-key: '{self.api_key}'\n")
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.api_key else self._log_file,
            stderr=subprocess.STDOUT,
            env=self.environment(),
            cwd=self.log_path.parent,
            start_new_session=True,  # own process group: stop() ends the scheduler/detokenizer children too
            # with SIGTERM held only SIGKILL ends it when the launching thread's process dies
            preexec_fn=partial(_die_with_parent, signal.SIGKILL if self.hold_sigterm else signal.SIGTERM)
            if (in_main and sys.platform == "linux") else None,
        )
        if self.api_key:
            self._log_copier = threading.Thread(target=_copy_hiding, daemon=True, name=f"log {self.url}",
                                                args=(self.proc.stdout, self._log_file, self.api_key))
            self._log_copier.start()
        _LIVE.add(self)
        return self

    def wait_healthy(self, timeout_s: float | None = None) -> "SGLangServer":
        """Poll GET /health until 200; raise ServerStartError with the log tail if the process exits or time runs out."""
        deadline = time.monotonic() + (self.startup_timeout_s if timeout_s is None else timeout_s)
        while True:
            code = self.proc.poll() if self.proc else None
            if code is not None:
                self._finish_log()  # all it wrote, before the log is read
            log = self._this_attempts_log() if self.proc is not None else ""
            # uvicorn's bind error is final, but SGLang then takes ~10 s to exit (its warm-up request times out):
            # a server that cannot bind its HTTP port is stopped at once, not waited for.
            http_bind_failed = HTTP_BIND_ERROR in log
            if (code is not None or http_bind_failed) and self._port_retries > 0 and "address already in use" in log:
                self._port_retries -= 1
                self._restart_on_a_new_port()
                deadline = time.monotonic() + (self.startup_timeout_s if timeout_s is None else timeout_s)
                continue
            if http_bind_failed:
                url = self.url
                self.stop()
                why = ("the port was given, so it is not changed; give a free port or none (one is picked)"
                       if self._port_given else "every port picked for it was taken before it could bind one")
                raise ServerStartError(f"SGLang server {url} could not bind its port {self.port} "
                                       f"(log: {self.log_path}): {why}.\n--- log tail ---\n{self.log_tail()}")
            if self.proc is None or code is not None:
                raise ServerStartError(
                    f"SGLang server {self.url} exited with code {code} before becoming healthy "
                    f"(log: {self.log_path}).\n--- log tail ---\n{self.log_tail()}"
                )
            if self.healthy():
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise ServerStartError(
                    f"SGLang server {self.url} not healthy after {self.startup_timeout_s:.0f}s; stopped it "
                    f"(log: {self.log_path}). Raise rollout.startup_timeout_s if the model is large.\n"
                    f"--- log tail ---\n{self.log_tail()}"
                )
            time.sleep(0.5)

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"sglang-{self.host}-{self.port}.log"

    def _this_attempts_log(self) -> str:
        """This start's part of the log (SGLang's shutdown traceback can push the bind error out of any tail)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return text[text.rfind("\n=== "):]

    def _restart_on_a_new_port(self) -> None:
        self.stop()
        old = self.port
        self.port = free_port(self.bind)
        self.start()
        note = f"(port {old} was taken before the server could bind it; restarted on {self.port})\n"
        self._log_file.write(note.encode())

    def healthy(self) -> bool:
        try:
            request = urllib.request.Request(self.url + "/health", headers=auth_headers(self.api_key))
            with urllib.request.urlopen(request, timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            return False

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM the server's process group, SIGKILL it after `timeout_s` (at once when SIGTERM is held).
        Idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None and not self.hold_sigterm:
            _signal_group(proc, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        if proc is not None:
            _signal_group(proc, signal.SIGKILL)  # also reaps children that outlived the main process
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            _wait_group_gone(proc.pid, timeout_s=10)  # SIGKILL is delivered asynchronously to the group's members
        _LIVE.discard(self)
        self._finish_log()
        self.key_config_path.unlink(missing_ok=True)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _finish_log(self) -> None:
        """Wait for the log copier to pass on the last of the output (the pipe ends when the process group has)."""
        if self._log_copier is not None:
            self._log_copier.join(timeout=10)
            if not self._log_copier.is_alive():
                self._log_copier = None

    def kill(self) -> None:
        """SIGKILL the whole server at once (what a crashed node looks like to the client)."""
        if self.proc is not None:
            _signal_group(self.proc, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 64 * 1024))
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log file)"
        # SGLang logs all its server args on one ~20 kB line: cut long lines so the tail stays readable.
        return "\n".join(line if len(line) <= 400 else line[:400] + " ..." for line in text.splitlines()[-lines:])

    def __enter__(self) -> "SGLangServer":
        if self.proc is None:
            self.start()
        try:
            return self.wait_healthy()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"SGLangServer({self.url}, model={self.model_path!r}, {state})"


class ServerGroup:
    """Several servers started together: all spawn at once, then all are awaited (start-up overlaps)."""

    def __init__(self, servers: list[SGLangServer]):
        self.servers = servers

    @classmethod
    def from_config(cls, cfg) -> "ServerGroup":
        return cls([SGLangServer.from_config(cfg, i) for i in range(cfg.num_servers)])

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def start(self) -> "ServerGroup":
        try:
            for s in self.servers:
                s.start()
            for s in self.servers:
                s.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for s in self.servers:
            if s.proc is not None:
                _signal_group(s.proc, signal.SIGTERM)  # all at once, then wait for each
        for s in self.servers:
            s.stop()

    def __enter__(self) -> "ServerGroup":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _copy_hiding(stream, log_file, secret: str) -> None:
    """Copy a server's output to its log line by line, with `secret` replaced."""
    hidden, secret_bytes = b"<api key hidden>", secret.encode()
    with stream:
        for line in iter(stream.readline, b""):
            log_file.write(line.replace(secret_bytes, hidden))


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout_s: float) -> None:
    """Wait until no live (non-zombie) process of group ``pgid`` is left: `stop()` returns with the server's whole
    process tree gone, not merely signalled."""
    deadline = time.monotonic() + timeout_s
    while _group_members(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)  # polling interval of a wait on /proc (deadline above)


def _group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid`` (from /proc; zombies have exited and are left out)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # exited while we looked
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def _die_with_parent(sig: int = signal.SIGTERM) -> None:
    """In the child before exec: ask Linux to send it `sig` when the launching thread's process dies."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))


def stop_all() -> None:
    """Stop every server this process started and has not stopped yet."""
    for server in list(_LIVE):
        server.stop(timeout_s=15.0)


def _install_exit_handlers() -> None:
    global _HANDLERS_INSTALLED
    if _HANDLERS_INSTALLED:
        return
    _HANDLERS_INSTALLED = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):
        stop_all()
        if callable(previous):
            previous(signum, frame)
        else:  # default action: die of SIGTERM, as we would have without this handler
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)

    signal.signal(signal.SIGTERM, on_sigterm)
