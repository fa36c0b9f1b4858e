"""How many tokens one chunk holds: the loss's extra memory is a few fp32 buffers of [chunk, V_local]."""
from __future__ import annotations

import torch

# Bytes of one fp32 [chunk, V_local] work buffer when chunk_size=None. On CPU a chunk that stays in cache is
# faster than a big one (measured: 6 rows at V_local=75968); on GPU big chunks amortise kernel launches.
CPU_BUFFER_BYTES = 2 << 20
GPU_BUFFER_BYTES = 256 << 20


def chunk_rows(fn: str, chunk_size: int | None, v_local: int, device: torch.device) -> int:
    """Rows per chunk. Depends only on V_local and the device, which every rank shares, so all ranks chunk alike."""
    if chunk_size is None:
        budget = GPU_BUFFER_BYTES if device.type == "cuda" else CPU_BUFFER_BYTES
        return max(1, budget // (4 * v_local))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int (tokens per chunk) or None (automatic), got {chunk_size!r}")
    return chunk_size
