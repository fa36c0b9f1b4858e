"""Serialize named tensors the way SGLang's `/update_weights_from_tensor` reads them, without importing sglang.

SGLang's `MultiprocessingSerializer.serialize` is `multiprocessing.reduction.ForkingPickler(buf).dump(obj)` (base64
for HTTP), where obj is a list of (name, tensor), and torch's reductions share each tensor's memory instead of
copying it: CUDA tensors as CUDA IPC handles, CPU tensors through shared memory. The server unpickles with an
allow-list that includes torch's rebuild functions. So this module uses torch's ForkingPickler itself, with two
adaptations SGLang also makes on its sending side:

- CPU tensors are shared with the "file_system" strategy (a /dev/shm file per storage). The default "file_descriptor"
  strategy hands fds over a socket that checks the sender's multiprocessing authkey; the server's scheduler has
  another one, fails with `AuthenticationError: digest sent was rejected`, and the whole server dies. The strategy is
  switched only while pickling.
- CUDA tensors carry the GPU's UUID instead of its index (SGLang's `monkey_patch_torch_reductions` does the same on
  both sides), so trainer and server may see the GPU under different CUDA_VISIBLE_DEVICES numbering.

The file_system strategy starts a `torch_shm_manager` helper process in the trainer; it outlives the trainer while a
server still maps a segment. `end_shm_managers()` ends it by PID; it must be the last tensor sync of the process
(torch cannot restart its manager), which is why `TensorWeightSync.close()` calls it.

Why not a helper subprocess in .venv-sglang: it would need the tensors handed over by the same IPC mechanism first,
so it could only add a hop; the pickle format is plain torch.
"""
from __future__ import annotations

import base64
import contextlib
import io
from multiprocessing.reduction import ForkingPickler

import psutil
import torch
import torch.multiprocessing as torch_mp
from torch.multiprocessing import reductions


def _reduce_tensor(t: torch.Tensor):
    rebuild, args = reductions.reduce_tensor(t)
    if t.is_cuda:  # args[6] is the device index in torch's CUDA reduction
        args = (*args[:6], str(torch.cuda.get_device_properties(args[6]).uuid), *args[7:])
    return rebuild, args


class _Pickler(ForkingPickler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dispatch_table[torch.Tensor] = _reduce_tensor
        self.dispatch_table[torch.nn.Parameter] = _reduce_tensor


@contextlib.contextmanager
def file_system_sharing():
    previous = torch_mp.get_sharing_strategy()
    torch_mp.set_sharing_strategy("file_system")
    try:
        yield
    finally:
        torch_mp.set_sharing_strategy(previous)


def serialize_named_tensors(named: list[tuple[str, torch.Tensor]]) -> str:
    """Base64 ForkingPickler payload of [(name, tensor)]; the tensors must stay alive until the server has loaded them."""
    buf = io.BytesIO()
    with file_system_sharing():
        _Pickler(buf).dump(named)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def shm_manager_pids() -> list[int]:
    """PIDs of torch_shm_manager processes started by this process."""
    return [p.pid for p in psutil.Process().children(recursive=False) if _name(p) == "torch_shm_manager"]


def end_shm_managers(pids: list[int] | None = None, timeout_s: float = 5.0) -> list[int]:
    """Terminate (then kill) this process's torch_shm_manager helpers; returns the PIDs ended."""
    procs = []
    for pid in pids if pids is not None else shm_manager_pids():
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout_s)
    return [p.pid for p in procs]


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""
