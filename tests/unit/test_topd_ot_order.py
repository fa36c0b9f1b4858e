"""The order-aware OT cost (topd.ot_position_weight): the paper's cost (weight 0) cannot tell "=13;" from "=31;",
a positive weight can, against an independent float64 assignment; the same tokens in the same order stay at 0."""
import itertools

import numpy as np
import pytest
import torch

from megatron_topd.topd import ot_distance
from megatron_topd.topd.config import TopdConfig
from megatron_topd.topd.divergence import window_divergence

IDS = {ch: i for i, ch in enumerate("0123456789+=;>", start=3)}


def _table(seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(20, 8)))


def _window(text: str) -> list[int]:
    return [IDS[ch] for ch in text]


def _brute_force(x: np.ndarray, y: np.ndarray, weight: float) -> float:
    """Mean cost of the best permutation (equal lengths: the EMD's optimum is a permutation), built from scratch."""
    n = len(x)
    cos = (x @ y.T) / np.linalg.norm(x, axis=1)[:, None] / np.linalg.norm(y, axis=1)[None, :]
    cost = (1 - cos) + weight * np.abs(np.arange(n)[:, None] - np.arange(n)[None, :]) / n
    return min(sum(cost[i, p[i]] for i in range(n)) / n for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_reordered_window_costs_only_with_a_position_weight(weight):
    table = _table()
    a, b = _window("=13;"), _window("=31;")

    def embed(ids):
        return table[ids]

    paper = window_divergence([[a]], [[b]], embed).distance
    assert paper.tolist() == [0.0]  # a bag of tokens: the swapped carry is invisible
    ordered = window_divergence([[a]], [[b]], embed, position_weight=weight).distance
    ref = _brute_force(table[a].numpy(), table[b].numpy(), weight)
    assert float(ordered[0]) == pytest.approx(ref, abs=1e-6) and ref > 0
    # the float64 path (ot.ot_distance) agrees with the windows' batched float32 path
    assert ot_distance(table[a], table[b], position_weight=weight) == pytest.approx(ref, abs=1e-10)
    # the same tokens in the same order are still exactly 0, and a heavier weight never lowers the distance
    assert window_divergence([[a]], [[list(a)]], embed, position_weight=weight).distance.tolist() == [0.0]
    heavier = window_divergence([[a]], [[b]], embed, position_weight=2 * weight).distance
    assert float(heavier[0]) >= float(ordered[0]) - 1e-9


def test_position_weight_is_checked():
    with pytest.raises(ValueError, match="topd.ot_position_weight"):
        TopdConfig(ot_position_weight=-1.0).validate()
    with pytest.raises(ValueError, match="ot_position_weight"):
        ot_distance(_table()[:3], _table()[:3], position_weight=float("nan"))
