"""Import-only placeholder for SGLang's GPU kernel package `sgl_kernel` (CPU runs only; see ../README.md).

No CPU build of sgl_kernel exists on PyPI, but SGLang imports it at start-up when SGLANG_USE_CPU_ENGINE=1. On this
path SGLang uses sgl_kernel ops only when `torch.ops.sgl_kernel.convert_weight_packed` exists (Intel AMX); this
package registers no ops, so SGLang runs its plain-torch code. Any attribute imported from here is a stand-in that
raises if it is ever called, so a kernel silently missing can never produce wrong numbers.
"""

__version__ = "0.0.0+cpu-placeholder"

# Names SGLang probes to decide whether the real kernels exist: they must stay absent.
_MUST_BE_ABSENT = frozenset({"convert_weight_packed", "convert_weight_packed_scale_zp"})


class _Unavailable:
    """Stands in for a kernel; calling it raises with the kernel's name."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(
            f"sgl_kernel.{self._name} was called, but sgl_kernel here is the CPU import-only placeholder from "
            "megatron_topd/rollout/cpu_shims/. This code path needs the real GPU kernels: run on a GPU with a normal "
            "sglang install, or choose a CPU-capable option (e.g. --attention-backend torch_native)."
        )

    def __repr__(self) -> str:
        return f"<sgl_kernel placeholder {self._name}>"


def __getattr__(name: str):
    if name.startswith("__") or name in _MUST_BE_ABSENT:
        raise AttributeError(name)
    return _Unavailable(name)
