"""Memory outside the model, the activations and the logits: communication buffers and the runtime's own share.

Estimates, not derived from Megatron's code (stated so in the plan's output):
- sequence-parallel all-gather buffer: Megatron's GlobalMemoryBuffer holds one gathered [T, h] input per GEMM at a
  time (T x h x e); pipeline receive buffers: two [T, h/(t if SP)] tensors (forward activation, backward gradient);
- runtime reserve: CUDA context (~0.5 GB), NCCL communicators of the TP/PP/DP/CP groups and their buffers (~1-2 GB),
  the caching allocator's fragmentation: 3 GB, a round figure from common experience on H100s.
"""
from __future__ import annotations

RUNTIME_RESERVE_BYTES = 3e9


def comm_buffers(tokens: int, hidden: int, *, tp: int, sp: bool, pp: int, act_bytes: int = 2) -> float:
    gathered = tokens * hidden * act_bytes if sp and tp > 1 else 0
    p2p = 2 * tokens * hidden * act_bytes / (tp if sp else 1) if pp > 1 else 0
    return gathered + p2p
