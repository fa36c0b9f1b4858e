"""Step 3: pick the high-loss response positions worth probing.

Greedy by loss so that the strongest position of a cluster is kept and its neighbours (which share the same
near future) are skipped: any two candidates of one sequence are at least ``min_gap`` tokens apart.
Ties in loss are broken by position, earliest first (in fraction mode by sequence index, then position), so the
choice is deterministic.
"""
from __future__ import annotations

import bisect
import math

import torch

from megatron_topd.topd import checks


def select_candidates(
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    top_k: int | None = 3,
    min_gap: int | None = 8,
    fraction: float | None = None,
) -> list[list[int]]:
    """Per sequence, the chosen response positions (token-aligned), highest loss first.

    ``fraction=None``: up to ``top_k`` per sequence (fewer when fewer eligible positions fit the spacing).
    ``fraction=f``: the top ``floor(f * n_response_tokens)`` positions of the whole batch, same spacing rule;
    ``top_k`` is then a per-sequence cap (``None`` = no cap). ``min_gap=None`` (or 1): no spacing.
    """
    token_loss, mask = checks.token_inputs(token_loss, response_mask)
    if min_gap is None:  # no spacing
        min_gap = 1
    if isinstance(min_gap, bool) or not isinstance(min_gap, int) or min_gap < 1:
        raise ValueError(f"min_gap={min_gap!r}: use an integer >= 1 (1 means adjacent candidates are allowed)")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: use an integer >= 1" + (" or None" if fraction is not None else ""))
    batch, _ = token_loss.shape
    keyed = torch.where(mask, token_loss.detach().double(), torch.tensor(-math.inf, dtype=torch.float64))
    keyed = keyed.cpu()
    if fraction is None:
        if top_k is None:
            raise ValueError("top_k=None needs fraction=...; give top_k (per-sequence count) or fraction")
        # Each accepted position blocks at most 2*min_gap-1 positions, so this many sorted entries always suffice.
        scan = top_k * (2 * min_gap - 1)
        order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
        eligible = mask.sum(dim=1).tolist()
        return [
            _greedy(order[b, : min(scan, eligible[b])].tolist(), min_gap, top_k) for b in range(batch)
        ]
    if not isinstance(fraction, (int, float)) or isinstance(fraction, bool) or not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction!r}: use a number in (0, 1], or fraction=None for top_k per sequence")
    n_response = int(mask.sum())
    budget = int(math.floor(fraction * n_response + 1e-9))
    seq = keyed.shape[1]
    order = torch.sort(keyed.reshape(-1), descending=True, stable=True).indices[:n_response].tolist()
    chosen: list[list[int]] = [[] for _ in range(batch)]
    placed: list[list[int]] = [[] for _ in range(batch)]  # sorted positions, for the spacing test
    taken = 0
    for flat in order:
        if taken == budget:
            break
        b, t = divmod(flat, seq)
        if top_k is not None and len(chosen[b]) == top_k:
            continue
        if _fits(placed[b], t, min_gap):
            chosen[b].append(t)
            bisect.insort(placed[b], t)
            taken += 1
    return chosen


def _greedy(sorted_positions: list[int], min_gap: int, k: int) -> list[int]:
    chosen: list[int] = []
    placed: list[int] = []
    for t in sorted_positions:
        if _fits(placed, t, min_gap):
            chosen.append(t)
            bisect.insort(placed, t)
            if len(chosen) == k:
                break
    return chosen


def _fits(placed: list[int], t: int, min_gap: int) -> bool:
    i = bisect.bisect_left(placed, t)
    if i < len(placed) and placed[i] - t < min_gap:
        return False
    return not (i > 0 and t - placed[i - 1] < min_gap)
