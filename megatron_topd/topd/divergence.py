"""Step 5 on token windows: OT distance between each candidate's teacher and student continuations.

With ``s`` continuations per side, a candidate's distance is the mean EMD over its ``s x s`` (teacher, student)
window pairs (our interpretation; the paper uses one window per side). Embedding rows come from ``embed`` (a
vocabulary-parallel lookup, `embedding.embedding_lookup`), called once for all unique ids of the step; cosines are
float32 and the cost of two equal ids is exactly 0, so identical windows have distance exactly 0. A token whose
embedding row is zero (a padding row) costs 1 against every other token.

Batched (docs/throughput.md): all (teacher, student) window pairs of the step are padded to the longest window and
their cost matrices come from one batched product ``[pairs, K_T, H] x [pairs, H, K_S]`` on the embedding rows'
device (the GPU where there is one), in chunks of `PAIR_CHUNK` pairs so the gathered rows stay bounded
(``PAIR_CHUNK x K x hidden`` floats per side) and the cosines' normalisation is folded into the product (no
normalised copy of the rows). Pairs whose windows hold the same tokens are exactly 0 without any work. Each pair is then solved exactly on the CPU by `ot.solve_emd`
(assignment for equal lengths, POT's network simplex for unequal ones). With ``group`` (the TP group) the pairs are
dealt round-robin to the group's ranks and the results summed over the group (every slot is filled by exactly one
rank, the others add 0.0: the sum is exact), so each rank solves ``1/TP`` of them instead of all.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist

from megatron_topd.topd.ot import position_cost, solve_emd

Windows = Sequence[Sequence[Sequence[int]]]  # [candidate][sample] -> token ids

PAIR_CHUNK = 32  # window pairs per batched cost product: 32 x 50 x 4096 x 4 B = 26 MB of float32 rows per side


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
    group=None,
    position_weight: float = 0.0,
) -> WindowDivergence:
    """OT distances for every candidate; every rank of the lookup's TP group must call this (``embed`` all-reduces).

    ``group``: split the pairs' exact solves over this group's ranks (all must call with the same windows).
    ``position_weight``: the order-aware term of `ot.position_cost` (``topd.ot_position_weight``; 0: the paper's)."""
    if len(teacher_windows) != len(student_windows):
        raise ValueError(
            f"{len(teacher_windows)} teacher window sets but {len(student_windows)} student ones: "
            "one per candidate each"
        )
    _check_nonempty(teacher_windows, "teacher")
    _check_nonempty(student_windows, "student")
    # Every (candidate, teacher window a, student window b) pair, in the candidate's row-major [a, b] order.
    t_flat = [list(w) for ws in teacher_windows for w in ws]
    s_flat = [list(w) for ws in student_windows for w in ws]
    t_start = np.cumsum([0] + [len(ws) for ws in teacher_windows])
    s_start = np.cumsum([0] + [len(ws) for ws in student_windows])
    pair_t, pair_s = [], []
    for c, (tw, sw) in enumerate(zip(teacher_windows, student_windows)):
        for a in range(len(tw)):
            for b in range(len(sw)):
                pair_t.append(int(t_start[c] + a))
                pair_s.append(int(s_start[c] + b))
    n_pairs = len(pair_t)
    # Two windows holding the same tokens (in any order) are at distance exactly 0 (the identity matching costs 0,
    # and costs are >= 0): no cost matrix, no solve, and their ids need no embedding row.
    # With the order-aware term only the same tokens in the same order are free.
    t_sorted = [w if position_weight else sorted(w) for w in t_flat]
    s_sorted = [w if position_weight else sorted(w) for w in s_flat]
    todo = [p for p in range(n_pairs) if t_sorted[pair_t[p]] != s_sorted[pair_s[p]]]
    needed = sorted({i for p in todo for w in (t_flat[pair_t[p]], s_flat[pair_s[p]]) for i in w})
    vocab_ids = torch.tensor(needed, dtype=torch.long)  # sorted, unique; the same on every rank of the group
    rows = embed(vocab_ids).detach() if len(vocab_ids) else torch.zeros(0, 1)
    if rows.shape[0] != vocab_ids.shape[0] or rows.dim() != 2:
        raise ValueError(f"embed returned shape {tuple(rows.shape)} for {len(vocab_ids)} ids; expected [ids, hidden]")
    # A zero row (e.g. a padding token HF initialises to 0) has no direction: cost 1 to every other id (cosine 0),
    # and 0 to itself through the equal-id rule below. Rows stay in their dtype; each chunk is upcast to float32 and
    # its rows' norms come from that copy (no pass over all rows).
    device = rows.device
    t_idx, t_len = _padded_local(t_flat, vocab_ids)
    s_idx, s_len = _padded_local(s_flat, vocab_ids)
    k_t = t_idx.shape[1] if n_pairs else 0

    world = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    distances = torch.zeros(n_pairs, dtype=torch.float64)
    flows = torch.zeros(n_pairs, k_t, dtype=torch.float64) if with_transport else None
    mine = todo[rank::world]
    bad_local = torch.zeros(1, dtype=torch.float64)  # 1.0 when a chunk of this rank met a NaN/inf row
    for start in range(0, len(mine), PAIR_CHUNK):
        chunk = mine[start:start + PAIR_CHUNK]
        ti = t_idx[[pair_t[p] for p in chunk]]  # [p, K_T] local row indices (padding: row 0, cut before solving)
        si = s_idx[[pair_s[p] for p in chunk]]
        a, b = rows[ti.to(device)].float(), rows[si.to(device)].float()  # [p, K, H]
        inv_a, inv_b = _inverse_norms(a), _inverse_norms(b)
        if not bool(torch.isfinite(inv_a).all() and torch.isfinite(inv_b).all()):
            bad_local[0] = 1.0
            continue
        cos = torch.bmm(a, b.transpose(1, 2)) * inv_a[:, :, None] * inv_b[:, None, :]  # [p, K_T, K_S] float32
        cost = (1.0 - cos).double().clamp_(0.0, 2.0).cpu()
        cost[ti[:, :, None] == si[:, None, :]] = 0.0  # equal ids cost exactly 0 (zero rows included)
        costs = cost.numpy()
        for j, p in enumerate(chunk):
            n, m = int(t_len[pair_t[p]]), int(s_len[pair_s[p]])
            c_pm = costs[j, :n, :m] + position_cost(n, m, position_weight)
            distances[p], plan = solve_emd(c_pm, with_plan=with_transport, name=f"window pair {p}")
            if with_transport:
                flows[p, :n] = torch.from_numpy((plan * c_pm).sum(axis=1))
    if world > 1 and todo:
        # Each slot was filled on exactly one rank and is 0.0 elsewhere: the SUM is an exact all-gather (the flag rides
        # along, so every rank raises alike).
        for t in [torch.cat([distances, bad_local])] + ([flows] if with_transport else []):
            moved = t.to(device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
            if t.dim() == 1:
                distances.copy_(moved[:-1].cpu())
                bad_local.copy_(moved[-1:].cpu())
            else:
                flows.copy_(moved.cpu())
    if float(bad_local) > 0:
        norms = rows.float().norm(dim=1).cpu()  # only on the way to the error
        bad = ~torch.isfinite(norms)
        raise ValueError(f"embedding rows of token ids {vocab_ids[bad][:8].tolist()} are not finite: "
                         "the cosine cost is undefined (check the embedding table and vocab_size)")

    distance = torch.zeros(len(teacher_windows), dtype=torch.float64)
    pair_distance: list[np.ndarray] = []
    transport: list[list[np.ndarray]] | None = [] if with_transport else None
    d_np = distances.numpy()
    p = 0
    for c, (tw, sw) in enumerate(zip(teacher_windows, student_windows)):
        size = len(tw) * len(sw)
        pd = d_np[p:p + size].reshape(len(tw), len(sw)).copy()
        distance[c] = float(pd.mean())
        pair_distance.append(pd)
        if transport is not None:
            f = flows[p:p + size].numpy().reshape(len(tw), len(sw), k_t)
            transport.append([f[a, :, :len(tw[a])].sum(axis=0) / len(sw) for a in range(len(tw))])
        p += size
    return WindowDivergence(distance, pair_distance, transport)


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / |row| over the last dim (0 for a zero row: its cosines are 0); non-finite for a NaN/inf row."""
    n = x.norm(dim=-1)
    return torch.where(n > 0, 1.0 / n, torch.zeros_like(n)) if bool(torch.isfinite(n).all()) else n * float("nan")


def _padded_local(windows: Sequence[Sequence[int]], vocab_ids: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """Windows as rows of local (unique-id) indices, right-padded with index 0 (never read: costs are cut to the
    true lengths before solving) -> ([W, K_max] long, lengths [W])."""
    lengths = np.array([len(w) for w in windows], dtype=np.int64)
    width = int(lengths.max()) if len(windows) else 0
    ids = np.zeros((len(windows), width), dtype=np.int64)
    for i, w in enumerate(windows):
        ids[i, :len(w)] = w
    ids = torch.from_numpy(ids)
    local = torch.searchsorted(vocab_ids, ids) if len(vocab_ids) else ids
    return local.clamp_(max=max(len(vocab_ids) - 1, 0)), lengths


def _check_nonempty(windows: Windows, side: str) -> None:
    for c, ws in enumerate(windows):
        if len(ws) == 0:
            raise ValueError(f"candidate {c} has no {side} window: give at least one continuation per side")
        for a, w in enumerate(ws):
            if len(w) == 0:
                raise ValueError(
                    f"{side} window {a} of candidate {c} is empty: the OT distance needs at least one token per window"
                )
