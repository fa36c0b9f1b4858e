"""Step 5's distance: exact optimal transport (earth mover's distance) between two sets of embedding rows.

Solvers (`solve_emd`): for two windows of equal length with uniform weights the exact EMD is the optimal assignment's
cost / n (the uniform transport polytope's vertices are permutation matrices, Birkhoff), solved by scipy's
`linear_sum_assignment` (about 4x faster than the simplex at 50 x 50); everything else goes to POT's network simplex
(`ot.emd`). This module only builds the cost ``1 - cos`` and the marginals.
Here costs are computed in float64 and entries within rounding of zero are set to exactly 0, so two identical sets
have distance exactly 0 - suppression ties at 0 then stay ties (see `weights`). Windows of token ids take the faster
path in `divergence` (float32 cosines, exact 0 for equal ids) and share `emd`.

Order (`position_cost`, ``topd.ot_position_weight``): the paper's cost sees a window as a bag of tokens, so "=13;"
and "=31;" are at distance 0. A weight ``w > 0`` adds ``w * |i/n - j/m|`` (how far apart two tokens sit, each as a
share of its window) to the cost of moving token i of one window onto token j of the other: a reordered window then
costs at least the cheaper of moving tokens in place and mismatching them. 0 (the default) is the paper's cost.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import ot as pot
import torch
from scipy.optimize import linear_sum_assignment

COSTS = ("cosine",)
_ZERO_SNAP = 1e-12

ArrayLike = torch.Tensor | np.ndarray


def ot_distance(
    x: ArrayLike,
    y: ArrayLike,
    *,
    x_weights: ArrayLike | None = None,
    y_weights: ArrayLike | None = None,
    cost: str = "cosine",
    position_weight: float = 0.0,
) -> float:
    """EMD between point sets ``x [n, d]`` and ``y [m, d]`` (n != m allowed); uniform marginals unless weights given.
    ``position_weight``: `position_cost` (0: the paper's order-free cost)."""
    return float(ot_distances([x], [y], x_weights=[x_weights], y_weights=[y_weights], cost=cost,
                              position_weight=position_weight)[0])


def ot_plan(
    x: ArrayLike,
    y: ArrayLike,
    *,
    x_weights: ArrayLike | None = None,
    y_weights: ArrayLike | None = None,
    cost: str = "cosine",
) -> tuple[float, np.ndarray, np.ndarray]:
    """Like `ot_distance`, also returning the optimal plan ``[n, m]`` and the cost matrix ``[n, m]``."""
    d, plans, costs = ot_distances([x], [y], x_weights=[x_weights], y_weights=[y_weights], cost=cost, with_plans=True)
    return float(d[0]), plans[0], costs[0]


def ot_distances(
    xs: Sequence[ArrayLike],
    ys: Sequence[ArrayLike],
    *,
    x_weights: Sequence[ArrayLike | None] | None = None,
    y_weights: Sequence[ArrayLike | None] | None = None,
    cost: str = "cosine",
    with_plans: bool = False,
    position_weight: float = 0.0,
):
    """Batched `ot_distance` over pairs ``(xs[i], ys[i])``: float64 array ``[P]``.

    Each set is unit-normalised once; each pair's cost is one matmul and its EMD is solved exactly.
    With ``with_plans=True`` returns ``(distances, plans, costs)``, plans and costs as lists of ``[n_i, m_i]`` arrays.
    """
    if cost not in COSTS:
        raise ValueError(f"cost={cost!r} is not supported: use one of {', '.join(COSTS)}")
    if len(xs) != len(ys):
        raise ValueError(f"xs has {len(xs)} point sets but ys has {len(ys)}: pass one y set per x set")
    n_pairs = len(xs)
    x_weights = _per_pair("x_weights", x_weights, n_pairs)
    y_weights = _per_pair("y_weights", y_weights, n_pairs)
    xs = [_points(f"xs[{i}]", x) for i, x in enumerate(xs)]
    ys = [_points(f"ys[{i}]", y) for i, y in enumerate(ys)]
    for i, (x, y) in enumerate(zip(xs, ys)):
        if x.shape[1] != y.shape[1]:
            raise ValueError(f"pair {i}: xs rows have dimension {x.shape[1]} but ys rows have {y.shape[1]}")
    distances = np.zeros(n_pairs, dtype=np.float64)
    plans: list[np.ndarray] = []
    costs: list[np.ndarray] = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        m = _cosine_cost(x, y) + position_cost(x.shape[0], y.shape[0], position_weight)
        a = _marginal(f"x_weights[{i}]", x_weights[i], m.shape[0])
        b = _marginal(f"y_weights[{i}]", y_weights[i], m.shape[1])
        if x_weights[i] is None and y_weights[i] is None:
            distances[i], plan = solve_emd(m, with_plan=with_plans, name=f"pair {i}")
        else:
            distances[i], plan = emd(m, a, b, name=f"pair {i}")
        if with_plans:
            plans.append(plan)
            costs.append(m)
    return (distances, plans, costs) if with_plans else distances


def emd(cost: np.ndarray, a: np.ndarray | None = None, b: np.ndarray | None = None, *, name: str = "pair"):
    """Exact EMD for a float64 cost matrix ``[n, m]`` (uniform marginals by default): ``(distance, plan)``."""
    n, m = cost.shape
    a = np.full(n, 1.0 / n) if a is None else a
    b = np.full(m, 1.0 / m) if b is None else b
    plan, log = pot.emd(a, b, np.ascontiguousarray(cost, dtype=np.float64), log=True)
    if log["result_code"] != 1:
        raise RuntimeError(f"{name}: the EMD solver did not reach the optimum ({log['warning']})")
    return max(0.0, float(log["cost"])), plan


def solve_emd(cost: np.ndarray, *, with_plan: bool = False, name: str = "pair") -> tuple[float, np.ndarray | None]:
    """Exact EMD with uniform marginals for a float64 cost ``[n, m]``: ``(distance, plan or None)``.

    ``n == m``: assignment cost / n (plan: the permutation / n); else POT's `emd`. An all-zero-cost optimum (identical
    windows) gives exactly 0.0 on both paths."""
    n, m = cost.shape
    if n != m:
        d, plan = emd(cost, name=name)
        return d, plan if with_plan else None
    r, c = linear_sum_assignment(cost)
    d = max(0.0, float(cost[r, c].sum()) / n)
    if not with_plan:
        return d, None
    plan = np.zeros((n, n))
    plan[r, c] = 1.0 / n
    return d, plan


def position_cost(n: int, m: int, weight: float) -> np.ndarray:
    """``weight * |i/n - j/m|`` for token i of an n-token window and token j of an m-token one ([n, m] float64):
    the order-aware term added to the embedding cost (all zeros at weight 0, the paper's cost)."""
    if not np.isfinite(weight) or weight < 0:
        raise ValueError(f"position weight {weight}: use a finite number >= 0 (topd.ot_position_weight)")
    return weight * np.abs(np.arange(n)[:, None] / n - np.arange(m)[None, :] / m)


def _cosine_cost(x_unit: torch.Tensor, y_unit: torch.Tensor) -> np.ndarray:
    """``1 - cos`` of unit rows in float64, clamped to [0, 2], entries within rounding of 0 set to exactly 0."""
    c = (1.0 - x_unit @ y_unit.T).clamp_(0.0, 2.0)
    c[c < _ZERO_SNAP] = 0.0
    return c.numpy()


def _points(name: str, x: ArrayLike) -> torch.Tensor:
    """Validate a point set and return its rows scaled to unit length, float64 on the CPU."""
    t = torch.as_tensor(x).detach().to(device="cpu", dtype=torch.float64)
    if t.dim() != 2:
        raise ValueError(f"{name} must be [points, dim] (rows are embedding vectors), got shape {tuple(t.shape)}")
    if t.shape[0] == 0:
        raise ValueError(f"{name} is an empty window (0 points): the OT distance needs at least one point per side")
    norm = t.norm(dim=1, keepdim=True)  # NaN/inf anywhere in a row makes its norm non-finite
    if not bool(torch.isfinite(norm).all()):
        raise ValueError(f"{name} holds NaN or inf")
    if bool((norm == 0).any()):
        raise ValueError(f"{name} has an all-zero row: the cosine cost is undefined for it")
    return t / norm


def _per_pair(name: str, w, n_pairs: int) -> list:
    if w is None:
        return [None] * n_pairs
    if len(w) != n_pairs:
        raise ValueError(f"{name} has {len(w)} entries for {n_pairs} pairs: give one (or None) per pair")
    return list(w)


def _marginal(name: str, w: ArrayLike | None, n: int) -> np.ndarray:
    if w is None:
        return np.full(n, 1.0 / n)
    a = torch.as_tensor(w).detach().to(device="cpu", dtype=torch.float64).numpy()
    if a.shape != (n,):
        raise ValueError(f"{name} has shape {a.shape} but its point set has {n} points")
    if not np.all(np.isfinite(a)) or np.any(a < 0) or a.sum() <= 0:
        raise ValueError(f"{name} must be finite, non-negative and not all zero")
    return a / a.sum()
