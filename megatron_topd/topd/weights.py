"""Step 6: which candidates are "surface-form" mismatches (low OT distance) and the per-token weights that follow.

Tie rule at the cut-off (never by index order): with ``low_fraction = q`` over ``C`` candidates, the cut-off is the
``floor(q*C)``-th smallest distance ``c``, and **every** candidate with distance ``<= c + TIE_TOLERANCE`` is
low-divergence - all candidates equal to the cut-off are treated alike, so the low share can exceed ``q`` when ties
straddle it (identical windows, distance exactly 0, are then all surface-form, as DESIGN step 6 requires).
With ``threshold``, a candidate is low-divergence iff its distance ``< threshold``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

# Distances are EMDs of float32 cosines: equal windows reached in a different order may differ by ~1e-7.
TIE_TOLERANCE = 1e-6


def divergence_weights(
    ot_distances: torch.Tensor | np.ndarray | Sequence[float],
    *,
    low_fraction: float = 0.3,
    threshold: float | None = None,
    w_low: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate ``(weight float32 [C], divergent bool [C])``: low-divergence ones get ``w_low``, others 1."""
    d = torch.as_tensor(np.asarray(ot_distances, dtype=np.float64) if not isinstance(ot_distances, torch.Tensor)
                        else ot_distances.detach().double().cpu())
    if d.dim() != 1:
        raise ValueError(f"ot_distances must be one distance per candidate [C], got shape {tuple(d.shape)}")
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("ot_distances must be finite and non-negative (an OT distance is >= 0)")
    if not math.isfinite(w_low) or w_low < 0:
        raise ValueError(f"w_low={w_low}: use a finite number >= 0")
    if threshold is not None:
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold={threshold}: use a finite number >= 0, or None for the low_fraction rule")
        low = d < threshold
    else:
        if not 0.0 <= low_fraction < 1.0:
            raise ValueError(f"low_fraction={low_fraction}: use a number in [0, 1)")
        n_low = int(math.floor(low_fraction * d.numel() + 1e-9))
        if n_low == 0:
            low = torch.zeros_like(d, dtype=torch.bool)
        else:
            cutoff = torch.kthvalue(d, n_low).values
            low = d <= cutoff + TIE_TOLERANCE
    weights = torch.where(low, torch.tensor(float(w_low)), torch.tensor(1.0)).float()
    return weights, ~low


def token_weights(
    response_mask: torch.Tensor,
    candidates: Sequence[Sequence[int]],
    candidate_weights: torch.Tensor,
) -> torch.Tensor:
    """Token-aligned float32 weights ``[B, T]``: 1 everywhere, each candidate's weight at its position."""
    n = sum(len(ts) for ts in candidates)
    if len(candidates) != response_mask.shape[0]:
        raise ValueError(f"candidates has {len(candidates)} lists for {response_mask.shape[0]} sequences")
    if candidate_weights.shape != (n,):
        raise ValueError(f"candidate_weights has shape {tuple(candidate_weights.shape)} for {n} candidates")
    w = torch.ones(response_mask.shape, dtype=torch.float32, device=response_mask.device)
    if n:
        rows = torch.tensor([b for b, ts in enumerate(candidates) for _ in ts], device=w.device)
        cols = torch.tensor([t for ts in candidates for t in ts], device=w.device)
        if not bool(response_mask[rows, cols].bool().all()):
            raise ValueError(
                "a candidate position is not a response token: candidates must come from select_candidates"
            )
        w[rows, cols] = candidate_weights.detach().float().to(w.device)
    return w
