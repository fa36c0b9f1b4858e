"""OT distance: checked against independent solvers (assignment, linear program), not against POT itself."""
import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment, linprog

from megatron_topd.topd import ot_distance, ot_distances, ot_plan


def _cosine_cost(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xu = x / np.linalg.norm(x, axis=1, keepdims=True)
    yu = y / np.linalg.norm(y, axis=1, keepdims=True)
    return 1.0 - xu @ yu.T


def _lp_emd(cost: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    n, m = cost.shape
    rows = np.zeros((n, n * m))
    cols = np.zeros((m, n * m))
    for i in range(n):
        rows[i, i * m : (i + 1) * m] = 1.0
    for j in range(m):
        cols[j, j::m] = 1.0
    res = linprog(cost.reshape(-1), A_eq=np.vstack([rows, cols]), b_eq=np.concatenate([a, b]), bounds=(0, None),
                  method="highs")
    assert res.status == 0
    return float(res.fun)


@pytest.mark.parametrize("n,seed", [(1, 0), (4, 1), (9, 2)])
def test_equal_sizes_match_assignment(n, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 16)), rng.normal(size=(n, 16))
    cost = _cosine_cost(x, y)
    r, c = linear_sum_assignment(cost)
    assert ot_distance(torch.tensor(x), torch.tensor(y)) == pytest.approx(cost[r, c].mean(), abs=1e-10)


@pytest.mark.parametrize("n,m,seed", [(3, 5, 0), (7, 2, 1), (1, 6, 2)])
def test_unequal_sizes_match_linear_program(n, m, seed):
    rng = np.random.default_rng(seed)
    x, y = rng.normal(size=(n, 8)), rng.normal(size=(m, 8))
    expected = _lp_emd(_cosine_cost(x, y), np.full(n, 1 / n), np.full(m, 1 / m))
    assert ot_distance(x, y) == pytest.approx(expected, abs=1e-9)
    assert ot_distance(x, y) > 0.05  # random directions are far apart: the check is not vacuous


def test_weights_match_linear_program():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(4, 6)), rng.normal(size=(3, 6))
    a, b = np.array([1.0, 2.0, 3.0, 4.0]), np.array([5.0, 1.0, 1.0])
    expected = _lp_emd(_cosine_cost(x, y), a / a.sum(), b / b.sum())
    assert ot_distance(x, y, x_weights=a, y_weights=b) == pytest.approx(expected, abs=1e-9)
    assert ot_distance(x, y, x_weights=a, y_weights=b) != pytest.approx(ot_distance(x, y), abs=1e-6)


def test_identical_sets_are_exactly_zero_and_distance_is_symmetric():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(50, 64)), rng.normal(size=(37, 64))
    assert ot_distance(x, x) == 0.0
    assert ot_distance(x, x[::-1].copy()) == 0.0  # a permutation is the same set
    assert ot_distance(x, y) == pytest.approx(ot_distance(y, x), abs=1e-12)
    assert ot_distance(x, 3.0 * x) == 0.0  # cosine cost ignores scale


def test_plan_has_the_marginals_and_its_cost_is_the_distance():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(5, 8)), rng.normal(size=(3, 8))
    d, plan, cost = ot_plan(x, y)
    np.testing.assert_allclose(plan.sum(axis=1), np.full(5, 1 / 5), atol=1e-12)
    np.testing.assert_allclose(plan.sum(axis=0), np.full(3, 1 / 3), atol=1e-12)
    assert (plan * cost).sum() == pytest.approx(d, abs=1e-12)


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(6)
    xs = [torch.tensor(rng.normal(size=(n, 12))) for n in (3, 50, 1, 8)]
    ys = [torch.tensor(rng.normal(size=(m, 12))) for m in (4, 49, 2, 8)]
    batched = ot_distances(xs, ys)
    assert batched.shape == (4,)
    np.testing.assert_allclose(batched, [ot_distance(x, y) for x, y in zip(xs, ys)], atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    x = np.ones((3, 4))
    with pytest.raises(ValueError, match="empty window"):
        ot_distance(np.zeros((0, 4)), x)
    with pytest.raises(ValueError, match="dimension 4 but ys rows have 5"):
        ot_distance(x, np.ones((2, 5)))
    with pytest.raises(ValueError, match="all-zero row"):
        ot_distance(x, np.zeros((2, 4)))
    with pytest.raises(ValueError, match="NaN or inf"):
        ot_distance(np.array([[1.0, np.nan, 0.0, 0.0]]), x)
    with pytest.raises(ValueError, match="cost='euclid' is not supported"):
        ot_distance(x, x, cost="euclid")
    with pytest.raises(ValueError, match="x_weights.*3 points"):
        ot_distance(x, x, x_weights=np.ones(2))
    with pytest.raises(ValueError, match="non-negative"):
        ot_distance(x, x, y_weights=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="\\[points, dim\\]"):
        ot_distance(np.ones(4), x)
    with pytest.raises(ValueError, match="one y set per x set"):
        ot_distances([x, x], [x])


def test_zero_embedding_row_costs_one_against_others_and_zero_against_itself():
    """A padding token's embedding row is zero in HF checkpoints; a window holding it must still get a distance."""
    import torch

    from megatron_topd.topd.divergence import window_divergence

    table = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    table[0] = 0.0
    embed = lambda ids: table[ids]  # noqa: E731
    same = window_divergence([[[0, 1]]], [[[0, 1]]], embed)
    assert same.distance.tolist() == [0.0]
    other = window_divergence([[[0]]], [[[2]]], embed)
    assert other.distance.tolist() == [1.0]
    table[3] = float("nan")
    with pytest.raises(ValueError, match=r"token ids \[3\] are not finite"):
        window_divergence([[[3]]], [[[2]]], embed)
