"""Step 4 and 7 plumbing: continuation requests for the candidates, and the guidance batch built from the teacher's
continuations, ready for the trainer's teacher and student forward.

Alignment (see `positions`): a candidate ``t`` is token-aligned; its prefix is ``tokens[b, :t]``. A guidance row is
``prefix + y`` with ``y`` the teacher's window; ``y_i`` sits at index ``t + i`` and is predicted by the **logits at
position** ``t - 1 + i`` (logits at ``p`` predict token ``p + 1``). `GuidanceBatch.logit_mask` marks exactly those
logit positions, so ``KL(pi_T || pi_S)`` taken there is ``KL(pi_T(.|c_{t+i}) || pi_S(.|c_{t+i}))`` with
``c_{t+i} = x_<t + y_<i``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from megatron_topd.topd.config import POSITION_WEIGHTINGS, TRAJ_NORMALIZATIONS


@dataclass
class ProbeRequests:
    """One prefix per candidate, flattened in (sequence, candidate) order; ``owners[i] = (sequence, t)``."""

    prefixes: list[list[int]]
    owners: list[tuple[int, int]]

    def __len__(self) -> int:
        return len(self.prefixes)


def build_requests(tokens: torch.Tensor, candidates: Sequence[Sequence[int]]) -> ProbeRequests:
    """Prefix ids ``tokens[b, :t]`` for every candidate ``t`` of every sequence ``b``."""
    if tokens.dim() != 2 or tokens.is_floating_point():
        raise ValueError(f"tokens must be integer ids [batch, seq], got {tokens.dtype} {tuple(tokens.shape)}")
    if len(candidates) != tokens.shape[0]:
        raise ValueError(
            f"candidates has {len(candidates)} lists for {tokens.shape[0]} sequences: give one per sequence"
        )
    rows = tokens.detach().cpu()
    prefixes: list[list[int]] = []
    owners: list[tuple[int, int]] = []
    for b, ts in enumerate(candidates):
        for t in ts:
            if not 1 <= int(t) < tokens.shape[1]:
                raise ValueError(f"candidate position {t} of sequence {b} is outside [1, {tokens.shape[1]})")
            prefixes.append(rows[b, : int(t)].tolist())
            owners.append((b, int(t)))
    return ProbeRequests(prefixes, owners)


def check_continuations(
    windows: object, n_prefixes: int, n: int, max_new_tokens: int, who: str, *, allow_missing: bool = False
) -> list[list[list[int]]]:
    """Check a `ContinuationSampler` answer against its contract; errors name the sampler and the broken entry.
    ``allow_missing``: an entry may be None (a cross-tokenizer sampler's candidate it could not continue)."""
    if not isinstance(windows, list) or len(windows) != n_prefixes:
        got = len(windows) if isinstance(windows, list) else type(windows).__name__
        raise ValueError(f"{who} sampler returned {got} entries for {n_prefixes} prefixes")
    for i, per_prefix in enumerate(windows):
        if per_prefix is None and allow_missing:
            continue
        if len(per_prefix) != n:
            raise ValueError(f"{who} sampler returned {len(per_prefix)} continuations for prefix {i}, expected n={n}")
        for j, w in enumerate(per_prefix):
            if not 1 <= len(w) <= max_new_tokens:
                raise ValueError(
                    f"{who} sampler: continuation {j} of prefix {i} has {len(w)} tokens, expected 1..{max_new_tokens} "
                    "(an empty window has no OT distance; a stop at EOS must include the EOS id)"
                )
    return windows


def position_weights(
    n: int, weighting: str, *, gamma: float = 0.9, transport: np.ndarray | None = None,
    normalization: str = "window_mean",
) -> np.ndarray:
    """Per-position weights of one window of ``n`` tokens, summing to 1 (``normalization="window_mean"``) or to ``n``
    (``"sum"``: uniform weighting gives 1 per position, so ``L_traj`` sums the window's KL instead of averaging it).

    ``uniform``: 1/n. ``geometric``: proportional to ``gamma**i``. ``ot_plan``: proportional to the transport cost
    leaving teacher position i in the OT plan (``sum_j P_ij C_ij``), i.e. where the two futures disagree; a window
    with zero total cost (the student's future matched it exactly) falls back to uniform.
    """
    if n < 1:
        raise ValueError(f"a guidance window needs at least one position, got {n}")
    if weighting == "uniform":
        w = np.ones(n)
    elif weighting == "geometric":
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma={gamma}: use a number in (0, 1]")
        w = gamma ** np.arange(n, dtype=np.float64)
    elif weighting == "ot_plan":
        if transport is None or np.shape(transport) != (n,):
            raise ValueError(f"ot_plan weighting needs the transport cost of each of the {n} window positions")
        w = np.asarray(transport, dtype=np.float64)
        if not np.all(np.isfinite(w)) or np.any(w < 0):
            raise ValueError("transport costs must be finite and non-negative")
        if w.sum() <= 0:
            w = np.ones(n)
    else:
        allowed = ", ".join(POSITION_WEIGHTINGS)
        raise ValueError(f"position weighting {weighting!r} is not supported: use one of {allowed}")
    if normalization not in TRAJ_NORMALIZATIONS:
        raise ValueError(f"traj_normalization={normalization!r} is not supported: use one of "
                         f"{', '.join(TRAJ_NORMALIZATIONS)}")
    return w / w.sum() * (n if normalization == "sum" else 1)


@dataclass
class GuidanceBatch:
    """Guidance sequences for the trajectory term: one row per (divergent candidate, teacher continuation).

    ``tokens [N, L]``: prefix + teacher window, right-padded with ``pad_id`` beyond ``lengths``.
    ``logit_mask [N, L]`` (bool) and ``logit_weights [N, L]`` (float32, each row sums to 1 - or to its window length
    under ``normalization="sum"``): logit-aligned - position
    ``p`` is set when the logits at ``p`` predict a window token ``tokens[n, p + 1]``.
    ``window_start [N]``: index in ``tokens`` of the window's first token (= the candidate ``t``);
    ``window_len [N]``; ``candidate [N]``: index into the flat candidate list; ``sample [N]``: teacher sample index.
    """

    tokens: torch.Tensor
    logit_mask: torch.Tensor
    logit_weights: torch.Tensor
    lengths: torch.Tensor
    window_start: torch.Tensor
    window_len: torch.Tensor
    candidate: torch.Tensor
    sample: torch.Tensor

    @property
    def num_windows(self) -> int:
        return int(self.tokens.shape[0])


def build_guidance(
    requests: ProbeRequests,
    teacher_windows: Sequence[Sequence[Sequence[int]]],
    divergent: torch.Tensor | Sequence[bool],
    *,
    weighting: str = "uniform",
    gamma: float = 0.9,
    transport: Sequence[Sequence[np.ndarray]] | None = None,
    pad_id: int = 0,
    normalization: str = "window_mean",
) -> GuidanceBatch:
    """Rows ``prefix + y^T`` for every teacher continuation of every divergent candidate.

    ``transport[c][a]`` (for ``weighting="ot_plan"``): per-position transport cost of teacher window ``a`` of
    candidate ``c`` (see `divergence.window_divergence`). ``normalization``: `position_weights`
    (``topd.traj_normalization``).
    """
    divergent = [bool(x) for x in (divergent.tolist() if isinstance(divergent, torch.Tensor) else divergent)]
    if len(divergent) != len(requests) or len(teacher_windows) != len(requests):
        raise ValueError(
            f"{len(requests)} requests, {len(teacher_windows)} teacher window sets and {len(divergent)} divergent "
            "flags: all three must be per candidate"
        )
    rows, meta, weights = [], [], []
    for c, is_div in enumerate(divergent):
        if not is_div:
            continue
        prefix = requests.prefixes[c]
        for a, window in enumerate(teacher_windows[c]):
            if len(window) == 0:
                raise ValueError(f"teacher window {a} of candidate {c} is empty: guidance needs at least one token")
            tc = None if transport is None else transport[c][a]
            weights.append(position_weights(len(window), weighting, gamma=gamma, transport=tc,
                                            normalization=normalization))
            rows.append(list(prefix) + list(window))
            meta.append((len(prefix), len(window), c, a))
    n = len(rows)
    width = max((len(r) for r in rows), default=1)
    tokens = torch.full((n, width), int(pad_id), dtype=torch.long)
    logit_weights = torch.zeros(n, width, dtype=torch.float32)
    for i, (row, (start, k, _, _), w) in enumerate(zip(rows, meta, weights)):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        logit_weights[i, start - 1 : start - 1 + k] = torch.from_numpy(w).float()
    logit_mask = torch.zeros(n, width, dtype=torch.bool)
    for i, (start, k, _, _) in enumerate(meta):
        logit_mask[i, start - 1 : start - 1 + k] = True

    def column(j: int) -> torch.Tensor:
        return torch.tensor([m[j] for m in meta], dtype=torch.long)

    return GuidanceBatch(
        tokens=tokens,
        logit_mask=logit_mask,
        logit_weights=logit_weights,
        lengths=torch.tensor([len(r) for r in rows], dtype=torch.long),
        window_start=column(0),
        window_len=column(1),
        candidate=column(2),
        sample=column(3),
    )
