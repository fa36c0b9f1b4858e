"""Step 6: which candidates are "surface-form" mismatches (low OT distance) and the per-token weights that follow.

Tie rule at the cut-off (never by index order): with ``low_fraction = q`` over ``C`` candidates, the cut-off is the
``floor(q*C)``-th smallest distance ``c``, and **every** candidate with distance ``<= c + TIE_TOLERANCE`` is
low-divergence - all candidates equal to the cut-off are treated alike, so the low share can exceed ``q`` when ties
straddle it (identical windows, distance exactly 0, are then all surface-form, as DESIGN step 6 requires).
With ``threshold``, a candidate is low-divergence iff its distance ``< threshold``.

``suppress`` picks which candidates are suppressed (weight ``w_low``); the others are **divergent** (they keep weight 1
and, under variant ``topd``, get guidance windows):

- ``low`` (default): the low-divergence ones above.
- ``high`` (the paper's control): the same number ``m`` (what ``low`` would suppress on these distances) of the
  highest-OT candidates. The count is exact - that is what makes the control matched - so candidates tied at the
  ``m``-th largest distance are all-in when they fit, and otherwise filled uniformly at random from ``seed`` (never by
  index order); every candidate strictly above the cut-off is suppressed.
- ``random``: ``m`` candidates chosen uniformly at random from ``seed``.

Call it on the whole batch's distances (all data-parallel replicas, `probe.gather_distances`) so that the cut-off,
the count and the random picks are one decision, the same on every rank.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from megatron_topd.topd.config import SUPPRESS_RULES

# Distances are EMDs of float32 cosines: equal windows reached in a different order may differ by ~1e-7.
TIE_TOLERANCE = 1e-6


def divergence_weights(
    ot_distances: torch.Tensor | np.ndarray | Sequence[float],
    *,
    low_fraction: float = 0.3,
    threshold: float | None = None,
    w_low: float = 0.0,
    suppress: str = "low",
    seed: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate ``(weight float32 [C], divergent bool [C])``: suppressed ones get ``w_low``, others 1.

    ``seed`` drives ``suppress="random"`` and the tie fill of ``"high"`` (None = 0): the same seed and distances give
    the same choice on every rank."""
    d = torch.as_tensor(np.asarray(ot_distances, dtype=np.float64) if not isinstance(ot_distances, torch.Tensor)
                        else ot_distances.detach().double().cpu())
    if d.dim() != 1:
        raise ValueError(f"ot_distances must be one distance per candidate [C], got shape {tuple(d.shape)}")
    if not bool(torch.isfinite(d).all()) or bool((d < 0).any()):
        raise ValueError("ot_distances must be finite and non-negative (an OT distance is >= 0)")
    if not math.isfinite(w_low) or w_low < 0:
        raise ValueError(f"w_low={w_low}: use a finite number >= 0")
    if suppress not in SUPPRESS_RULES:
        raise ValueError(f"suppress={suppress!r} is not supported: use one of {', '.join(SUPPRESS_RULES)}")
    low = low_divergence(d, low_fraction=low_fraction, threshold=threshold)
    if suppress == "low":
        suppressed = low
    else:
        suppressed = matched_suppression(d, int(low.sum()), rule=suppress, seed=seed)
    weights = torch.where(suppressed, torch.tensor(float(w_low)), torch.tensor(1.0)).float()
    return weights, ~suppressed


def low_divergence(d: torch.Tensor, *, low_fraction: float = 0.3, threshold: float | None = None) -> torch.Tensor:
    """The ``low`` rule on float64 distances ``[C]``: bool ``[C]``, True = low-divergence (see the module doc)."""
    if threshold is not None:
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"threshold={threshold}: use a finite number >= 0, or None for the low_fraction rule")
        return d < threshold
    if not 0.0 <= low_fraction < 1.0:
        raise ValueError(f"low_fraction={low_fraction}: use a number in [0, 1)")
    n_low = int(math.floor(low_fraction * d.numel() + 1e-9))
    if n_low == 0:
        return torch.zeros_like(d, dtype=torch.bool)
    cutoff = torch.kthvalue(d, n_low).values
    return d <= cutoff + TIE_TOLERANCE


def matched_suppression(d: torch.Tensor, count: int, *, rule: str, seed: int | None = None) -> torch.Tensor:
    """Exactly ``count`` suppressed candidates (bool ``[C]``): the highest-OT ones (``rule="high"``, ties at the
    cut-off filled at random) or uniformly random ones (``rule="random"``), reproducibly from ``seed``."""
    n = d.numel()
    if not 0 <= count <= n:
        raise ValueError(f"count={count} suppressed candidates out of {n}")
    out = torch.zeros(n, dtype=torch.bool)
    if count == 0:
        return out
    rng = np.random.default_rng([0 if seed is None else int(seed) % 2**63, 0x70D])
    if rule == "random":
        out[torch.from_numpy(rng.permutation(n)[:count])] = True
        return out
    if rule != "high":
        raise ValueError(f"rule={rule!r}: use high or random")
    cutoff = float(torch.sort(d, descending=True).values[count - 1])  # the count-th largest distance
    above = d > cutoff + TIE_TOLERANCE
    tied = torch.nonzero(~above & (d >= cutoff - TIE_TOLERANCE)).flatten().numpy()
    out |= above
    need = count - int(above.sum())  # 1 <= need <= len(tied)
    out[torch.from_numpy(np.sort(rng.permutation(tied)[:need]))] = True
    return out


OT_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
OT_STAT_KEYS = tuple(f"ot_q{round(q * 100)}" for q in OT_QUANTILES) + ("ot_mean_suppressed", "ot_mean_kept")


def ot_statistics(ot_distances: torch.Tensor | Sequence[float], divergent: torch.Tensor | Sequence[bool]) -> dict:
    """Calibration metrics of one step (pass the whole batch's vectors): the OT distances' quantiles ``ot_q10 ..
    ot_q90`` (linear interpolation, numpy's default) and the mean distance of the suppressed (not divergent) and of
    the kept (divergent) candidates; 0.0 for an empty set. Float64."""
    d = torch.as_tensor(ot_distances).detach().double().cpu().numpy()
    div = torch.as_tensor(divergent).detach().bool().cpu().numpy()
    if d.shape != div.shape or d.ndim != 1:
        raise ValueError(f"ot_distances {d.shape} and divergent {div.shape} must be the same [C]")
    out = {key: 0.0 for key in OT_STAT_KEYS}
    if d.size:
        for q, v in zip(OT_QUANTILES, np.quantile(d, OT_QUANTILES)):
            out[f"ot_q{round(q * 100)}"] = float(v)
    if (~div).any():
        out["ot_mean_suppressed"] = float(d[~div].mean())
    if div.any():
        out["ot_mean_kept"] = float(d[div].mean())
    return out


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
