"""SGLangServer start-up errors and the CPU shims, without starting SGLang (the integration tests do that)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time

import pytest

from megatron_topd.rollout import ServerStartError, SGLangServer
from megatron_topd.rollout.server import CPU_SHIMS_DIR


def test_missing_python_names_the_fix(tmp_path):
    server = SGLangServer(tmp_path, python=str(tmp_path / "nope" / "python"), log_dir=tmp_path)
    with pytest.raises(ServerStartError, match=r"make setup-sglang"):
        server.start()


def test_never_healthy_times_out_with_log_tail_and_is_stopped(tmp_path):
    fake = tmp_path / "python"  # a process that starts, logs, spawns a child, and never serves
    fake.write_text(
        f'#!/bin/sh\necho $$ > {tmp_path}/main.pid\nsleep 120 &\necho $! > {tmp_path}/child.pid\n'
        'echo "loading checkpoint shards (pretend)"\nwait\n'
    )
    fake.chmod(0o755)
    server = SGLangServer(tmp_path, python=str(fake), log_dir=tmp_path / "logs", startup_timeout_s=2)
    t0 = time.monotonic()
    with pytest.raises(ServerStartError) as err:
        with server:
            pass
    msg = str(err.value)
    assert "not healthy after 2s" in msg and "loading checkpoint shards (pretend)" in msg and "startup_timeout_s" in msg
    assert time.monotonic() - t0 < 30
    # stopped: the whole process group, so the child it spawned too
    for name in ("main.pid", "child.pid"):
        assert not _alive(int((tmp_path / name).read_text())), f"{name} survived stop()"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has already exited
    except FileNotFoundError:
        return False


def test_cpu_command_and_environment(tmp_path):
    server = SGLangServer(tmp_path, python=sys.executable, device="cpu", dtype="float32", port=31234,
                          extra_args=["--max-total-tokens", "2048"], log_dir=tmp_path)
    cmd = server.command()
    assert cmd[:3] == [sys.executable, "-m", "sglang.launch_server"]
    assert "--attention-backend" in cmd and cmd[-2:] == ["--max-total-tokens", "2048"]  # extra args come last
    env = server.environment()
    assert env["SGLANG_USE_CPU_ENGINE"] == "1" and env["PYTHONPATH"].split(os.pathsep)[0] == str(CPU_SHIMS_DIR)
    gpu = SGLangServer(tmp_path, python=sys.executable, device="cuda", log_dir=tmp_path)
    assert str(CPU_SHIMS_DIR) not in gpu.environment().get("PYTHONPATH", "")
    assert "--attention-backend" not in gpu.command()


def test_sgl_kernel_placeholder_has_no_amx_probe_and_raises_when_called():
    spec = importlib.util.spec_from_file_location("sgl_kernel_placeholder", CPU_SHIMS_DIR / "sgl_kernel" / "__init__.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert not hasattr(mod, "convert_weight_packed")  # SGLang's probe for the AMX kernels must fail
    fn = mod.fused_add_rmsnorm  # importing a name works (SGLang imports many at start-up) ...
    with pytest.raises(RuntimeError, match="CPU import-only placeholder"):
        fn()  # ... calling it never does


def test_sitecustomize_declares_torchvision_schemas_on_first_import():
    code = (
        "import sys, torch\n"
        "assert not hasattr(torch.ops.torchvision, 'nms')\n"
        "try:\n    import torchvision\nexcept Exception:\n    pass\n"
        "print(torch.ops.torchvision.nms._schemas, torch.ops.torchvision.qnms._schemas)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(CPU_SHIMS_DIR)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor" in out.stdout
