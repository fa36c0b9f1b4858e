"""Step 5 on token windows: OT distance between each candidate's teacher and student continuations.

With ``s`` continuations per side, a candidate's distance is the mean EMD over its ``s x s`` (teacher, student)
window pairs (our interpretation; the paper uses one window per side). Embedding rows come from ``embed`` (a
vocabulary-parallel lookup, `embedding.embedding_lookup`), called once for all unique ids of the step; cosines are
float32 and the cost of two equal ids is exactly 0, so identical windows have distance exactly 0. A token whose
embedding row is zero (a padding row) costs 1 against every other token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from megatron_topd.topd.ot import emd

Windows = Sequence[Sequence[Sequence[int]]]  # [candidate][sample] -> token ids


@dataclass
class WindowDivergence:
    """``distance [C]`` float64; ``pair_distance[c]`` is ``[s_T, s_S]``; ``transport[c][a]`` (when asked) is the
    per-position transport cost of teacher window ``a`` (``sum_j P_ij C_ij``, averaged over student windows)."""

    distance: torch.Tensor
    pair_distance: list[np.ndarray]
    transport: list[list[np.ndarray]] | None


def window_divergence(
    teacher_windows: Windows,
    student_windows: Windows,
    embed: Callable[[torch.Tensor], torch.Tensor],
    *,
    with_transport: bool = False,
) -> WindowDivergence:
    """OT distances for every candidate; every rank of the lookup's TP group must call this (``embed`` all-reduces)."""
    if len(teacher_windows) != len(student_windows):
        raise ValueError(
            f"{len(teacher_windows)} teacher window sets but {len(student_windows)} student ones: "
            "one per candidate each"
        )
    _check_nonempty(teacher_windows, "teacher")
    _check_nonempty(student_windows, "student")
    all_ids = [i for side in (teacher_windows, student_windows) for ws in side for w in ws for i in w]
    vocab_ids = torch.unique(torch.tensor(all_ids, dtype=torch.long))  # sorted
    rows = embed(vocab_ids).detach().float().cpu() if len(vocab_ids) else torch.zeros(0, 1)
    if rows.shape[0] != vocab_ids.shape[0] or rows.dim() != 2:
        raise ValueError(f"embed returned shape {tuple(rows.shape)} for {len(vocab_ids)} ids; expected [ids, hidden]")
    norms = rows.norm(dim=1, keepdim=True)
    bad = ~torch.isfinite(norms[:, 0])
    if bool(bad.any()):
        raise ValueError(f"embedding rows of token ids {vocab_ids[bad][:8].tolist()} are not finite: "
                         "the cosine cost is undefined (check the embedding table and vocab_size)")
    # A zero row (e.g. a padding token HF initialises to 0) has no direction: cost 1 to every other id (cosine 0),
    # and 0 to itself through the equal-id rule below.
    unit = rows / norms.clamp_min(torch.finfo(rows.dtype).tiny)

    def local(w: Sequence[int]) -> torch.Tensor:
        return torch.searchsorted(vocab_ids, torch.tensor(list(w), dtype=torch.long))

    distance = torch.zeros(len(teacher_windows), dtype=torch.float64)
    pair_distance: list[np.ndarray] = []
    transport: list[list[np.ndarray]] | None = [] if with_transport else None
    for c, (tw, sw) in enumerate(zip(teacher_windows, student_windows)):
        t_idx = [local(w) for w in tw]
        s_idx = [local(w) for w in sw]
        pd = np.zeros((len(t_idx), len(s_idx)))
        flows = [np.zeros(len(i)) for i in t_idx]
        for a, ia in enumerate(t_idx):
            for b, ib in enumerate(s_idx):
                cost = (1.0 - unit[ia] @ unit[ib].T).double().clamp_(0.0, 2.0)
                cost[ia[:, None] == ib[None, :]] = 0.0
                m = cost.numpy()
                pd[a, b], plan = emd(m, name=f"candidate {c} (teacher window {a}, student window {b})")
                if with_transport:
                    flows[a] += (plan * m).sum(axis=1) / len(s_idx)
        distance[c] = float(pd.mean())
        pair_distance.append(pd)
        if transport is not None:
            transport.append(flows)
    return WindowDivergence(distance, pair_distance, transport)


def _check_nonempty(windows: Windows, side: str) -> None:
    for c, ws in enumerate(windows):
        if len(ws) == 0:
            raise ValueError(f"candidate {c} has no {side} window: give at least one continuation per side")
        for a, w in enumerate(ws):
            if len(w) == 0:
                raise ValueError(
                    f"{side} window {a} of candidate {c} is empty: the OT distance needs at least one token per window"
                )
