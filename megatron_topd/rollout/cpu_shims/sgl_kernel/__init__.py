"""Import-only placeholder for SGLang's GPU kernel package `sgl_kernel` (CPU runs only; see ../README.md).

No CPU build of sgl_kernel exists on PyPI, but SGLang imports it at start-up when SGLANG_USE_CPU_ENGINE=1. On this
path SGLang uses sgl_kernel ops only when `torch.ops.sgl_kernel.convert_weight_packed` exists (Intel AMX); this
package never registers that op, so SGLang runs its plain-torch code. Any attribute imported from here is a stand-in
that raises if it is ever called, so a kernel silently missing can never produce wrong numbers.

One op is real: `torch.ops.sgl_kernel.murmur_hash32_cpu`, which SGLang's seeded sampler (`multinomial_with_seed`,
used only with --enable-deterministic-inference) calls on CPU tensors (sglang/kernels/ops/sampling/murmur_hash.py).
It is written here in plain torch, bit for bit the MurmurHash3 of SGLang's Triton kernel `murmur_hash32_kernel`.
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


_MASK = 0xFFFFFFFF


def _mul32(a, c: int):
    """(a * c) mod 2**32 for int64 tensors a in [0, 2**32) without int64 overflow."""
    lo = a * (c & 0xFFFF)
    hi = ((a * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK


def _rotl32(x, r: int):
    return ((x << r) | (x >> (32 - r))) & _MASK


def _mix(h, k):
    k = _rotl32(_mul32(k, 0xCC9E2D51), 15)
    k = _mul32(k, 0x1B873593)
    h = _rotl32(h ^ k, 13)
    return (_mul32(h, 5) + 0xE6546B64) & _MASK


def _fmix(h):
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def murmur_hash32_reference(seed, positions, col_indices):
    """uint32 [n, m]: MurmurHash3 of (seed[i] as two 32-bit blocks, positions[i], col_indices[j]), as SGLang's kernel."""
    import torch

    s = seed.view(torch.int64) if seed.dtype == torch.uint64 else seed.to(torch.int64)
    s_lo = (s & _MASK).view(-1, 1)
    s_hi = ((s >> 32) & _MASK).view(-1, 1)
    pos = (positions.to(torch.int64) & _MASK).view(-1, 1)
    col = (col_indices.to(torch.int64) & _MASK).view(1, -1)
    h = torch.zeros_like(s_lo)
    h = _mix(h, s_lo)
    h = _mix(h, s_hi)
    h = _mix(h, pos)
    h = _mix(h, col)  # broadcasts to [n, m]
    h = _fmix(h ^ 16)
    return h.to(torch.uint32)


def _register_murmur_hash32_cpu() -> None:
    import torch

    if hasattr(torch.ops.sgl_kernel, "murmur_hash32_cpu"):
        return

    @torch.library.custom_op("sgl_kernel::murmur_hash32_cpu", mutates_args=(), device_types="cpu")
    def murmur_hash32_cpu(seed: torch.Tensor, positions: torch.Tensor, col_indices: torch.Tensor) -> torch.Tensor:
        return murmur_hash32_reference(seed, positions, col_indices)

    @murmur_hash32_cpu.register_fake
    def _(seed, positions, col_indices):
        return seed.new_empty((seed.shape[0], col_indices.shape[0]), dtype=torch.uint32)


_register_murmur_hash32_cpu()
