"""CPU shim, loaded automatically by Python because this folder is on the SGLang server's PYTHONPATH (CPU only).

torchvision from PyPI is a CUDA build; beside CPU torch its C extension does not load, so `torchvision::nms` and
`torchvision::qnms` are never declared and `import torchvision` dies in `register_fake("torchvision::nms")`.
transformers imports torchvision when it is installed, and SGLang imports transformers, so the server cannot start.
Declaring the two schemas before torchvision loads is enough (no kernel is ever called on the text-only path).

To keep every other process cheap, torch is not imported here: a one-shot import hook declares the schemas only when
something first imports torchvision.

Deterministic inference on CPU (only when MEGATRON_TOPD_CPU_DETERMINISTIC=1, which `SGLangServer(deterministic=True,
device="cpu")` sets): SGLang 0.5.23 refuses `--enable-deterministic-inference` with `--attention-backend torch_native`
(overrides.py `_deterministic_attention_backend`: "Currently only ['ascend', 'fa3', 'fa4', 'flashinfer', 'intel_xpu',
'triton'] attention backends are supported for deterministic inference") and then enables its batch-invariant ops,
which are Triton GPU kernels (`get_dispatch_device_backend()` raises "No supported accelerator (CUDA/XPU) available").
Two patches, applied right after SGLang's own modules load: torch_native joins the deterministic-capable backends (it
runs attention one sequence at a time, so a request's attention never depends on the rest of the batch; SGLang then
disables the radix cache itself, as for every backend outside its radix-supported list), and
`ModelRunner.maybe_enable_batch_invariant_mode` is skipped (plain CPU torch matmuls run instead). The seeded sampler
this unlocks needs `torch.ops.sgl_kernel.murmur_hash32_cpu`, defined by `sgl_kernel/__init__.py` in this folder.
"""
import importlib.abc
import importlib.machinery
import os
import sys


class _DeclareTorchvisionSchemas(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if not hasattr(torch.ops.torchvision, "nms"):
            lib = torch.library.Library("torchvision", "DEF")
            lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _KEEP.append(lib)  # a Library deregisters its definitions when garbage-collected
        return None  # let the normal finders import torchvision


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Run `patch(module)` right after the named module has executed (each patch once)."""

    def __init__(self, patches):
        self.patches = dict(patches)

    def find_spec(self, fullname, path=None, target=None):
        patch = self.patches.pop(fullname, None)
        if patch is None:
            return None
        if not self.patches:
            sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            raise ImportError(f"megatron_topd cpu_shims: cannot patch {fullname} (not found as a source module)")
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            patch(module)

        spec.loader.exec_module = exec_module  # this loader object belongs to this one module
        return spec


def _torch_native_is_deterministic(choices) -> None:
    if "torch_native" not in choices.DETERMINISTIC_ATTENTION_BACKEND_CHOICES:
        choices.add_deterministic_attention_backend_choices(["torch_native"])


def _skip_gpu_batch_invariant_ops(model_runner) -> None:
    def maybe_enable_batch_invariant_mode(self):
        return None  # SGLang's batch-invariant ops are Triton GPU kernels; CPU runs plain torch

    model_runner.ModelRunner.maybe_enable_batch_invariant_mode = maybe_enable_batch_invariant_mode


_KEEP: list = []
sys.meta_path.insert(0, _DeclareTorchvisionSchemas())
if os.environ.get("MEGATRON_TOPD_CPU_DETERMINISTIC") == "1":
    sys.meta_path.insert(0, _PatchAfterImport({
        "sglang.srt.arg_groups.choices": _torch_native_is_deterministic,
        "sglang.srt.model_executor.model_runner": _skip_gpu_batch_invariant_ops,
    }))
