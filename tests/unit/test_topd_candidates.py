"""Candidate selection: spacing, response-only, ordering, ties, short sequences, fraction mode, errors."""
import itertools

import pytest
import torch

from megatron_topd.topd import select_candidates


def _batch(losses: list[list[float]], prompt: list[int], length: list[int]):
    """Token-aligned loss and mask: response tokens are [prompt, length) of each row."""
    seq = max(len(r) for r in losses)
    loss = torch.tensor([r + [0.0] * (seq - len(r)) for r in losses], dtype=torch.float32)
    mask = torch.zeros(len(losses), seq, dtype=torch.bool)
    for b, (p, n) in enumerate(zip(prompt, length)):
        mask[b, p:n] = True
    return loss, mask


def _reference_greedy(loss_row, mask_row, k, gap):
    """The rule written plainly over the whole row (no scan limit, no bisection), to check the fast path."""
    eligible = sorted((i for i in range(len(loss_row)) if mask_row[i]), key=lambda i: (-loss_row[i], i))
    chosen = []
    for i in eligible:
        if all(abs(i - j) >= gap for j in chosen):
            chosen.append(i)
        if len(chosen) == k:
            break
    return chosen


def test_random_batches_respect_spacing_mask_and_order():
    g = torch.Generator().manual_seed(0)
    loss = torch.rand(16, 200, generator=g)
    prompt = torch.randint(1, 40, (16,), generator=g)
    length = torch.randint(150, 201, (16,), generator=g)  # >= 110 response tokens: 5 always fit at gap 8
    mask = (torch.arange(200)[None] >= prompt[:, None]) & (torch.arange(200)[None] < length[:, None])
    loss[~mask] = 100.0  # prompt/padding hold larger values than any response token: they must still never win
    chosen = select_candidates(loss, mask, top_k=5, min_gap=8)
    for b, ts in enumerate(chosen):
        assert len(ts) == 5
        assert all(bool(mask[b, t]) for t in ts)
        assert all(abs(i - j) >= 8 for i, j in itertools.combinations(ts, 2))
        values = [float(loss[b, t]) for t in ts]
        assert values == sorted(values, reverse=True)
        assert float(loss[b, ts[0]]) == float(loss[b][mask[b]].max())  # the global maximum is always first
        assert ts == _reference_greedy(loss[b].tolist(), mask[b].tolist(), 5, 8)


def test_neighbour_of_the_peak_is_skipped_for_a_farther_lower_one():
    loss, mask = _batch([[0, 0, 9, 8.5, 8, 0, 0, 0, 0, 0, 0, 7, 0]], [1], [13])
    assert select_candidates(loss, mask, top_k=2, min_gap=3) == [[2, 11]]
    assert select_candidates(loss, mask, top_k=3, min_gap=1) == [[2, 3, 4]]
    # gap exactly min_gap is allowed, min_gap - 1 is not
    loss, mask = _batch([[0, 5, 0, 0, 4, 0, 3]], [1], [7])
    assert select_candidates(loss, mask, top_k=3, min_gap=3) == [[1, 4]]
    assert select_candidates(loss, mask, top_k=3, min_gap=4) == [[1, 6]]


def test_ties_are_broken_by_earliest_position():
    loss, mask = _batch([[0, 2, 2, 2, 2, 2, 2]], [1], [7])
    assert select_candidates(loss, mask, top_k=3, min_gap=2) == [[1, 3, 5]]
    assert select_candidates(loss, mask, top_k=2, min_gap=1) == [[1, 2]]


def test_short_sequences_and_fewer_eligible_than_top_k():
    loss, mask = _batch(
        [[0, 1.0, 3.0], [0, 0, 0, 0], [0, 0, 0, 1, 2, 3, 4, 5, 6]],
        prompt=[1, 4, 3],
        length=[3, 4, 9],
    )
    out = select_candidates(loss, mask, top_k=3, min_gap=4)
    assert out[0] == [2]  # two eligible, 1 apart: only one fits the spacing
    assert out[1] == []  # no response tokens at all
    assert out[2] == [8, 4]  # six eligible tokens, 4 apart: two fit


def test_fraction_mode_is_global_top_fraction_with_spacing():
    loss, mask = _batch([[0, 9, 8, 1, 1, 1, 0], [0, 0, 7, 6, 1, 5, 1]], [1, 2], [7, 7])
    n_response = int(mask.sum())  # 11
    out = select_candidates(loss, mask, top_k=None, min_gap=2, fraction=4 / n_response)
    # global order 9,8,7,6,5 then the 1s in (sequence, position) order; 8 and 6 are too close to 9 and 7
    assert out == [[1, 3], [2, 5]]
    # a per-sequence cap still applies when given
    assert select_candidates(loss, mask, top_k=1, min_gap=2, fraction=0.5) == [[1], [2]]


def test_bad_inputs_raise_clear_errors():
    loss, mask = _batch([[0, 1.0, 2.0]], [1], [3])
    with pytest.raises(ValueError, match="response_mask shape"):
        select_candidates(loss, mask[:, :2], top_k=1)
    with pytest.raises(ValueError, match=r"\[batch, seq\]"):
        select_candidates(loss[0], mask[0], top_k=1)
    nan = loss.clone()
    nan[0, 2] = float("nan")
    with pytest.raises(ValueError, match="not finite at response position \\(batch 0, token 2\\)"):
        select_candidates(nan, mask, top_k=1)
    padded = loss.clone()
    padded[0, 0] = float("nan")  # non-finite values outside the response are allowed
    assert select_candidates(padded, mask, top_k=1) == [[2]]
    with pytest.raises(ValueError, match="position 0"):
        select_candidates(loss, torch.ones_like(mask), top_k=1)
    with pytest.raises(ValueError, match="min_gap=0"):
        select_candidates(loss, mask, top_k=1, min_gap=0)
    with pytest.raises(ValueError, match="top_k=0"):
        select_candidates(loss, mask, top_k=0)
    with pytest.raises(ValueError, match="fraction=1.5"):
        select_candidates(loss, mask, fraction=1.5)
    with pytest.raises(ValueError, match="0/1"):
        select_candidates(loss, torch.tensor([[0, 2, 1]]), top_k=1)
