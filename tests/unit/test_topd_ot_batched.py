"""Batched window OT (one cost product for all pairs, assignment for equal lengths) against a per-pair POT solve."""
import numpy as np
import ot as pot
import pytest
import torch

from megatron_topd.topd import divergence
from megatron_topd.topd.divergence import window_divergence
from megatron_topd.topd.ot import solve_emd

VOCAB, HIDDEN = 300, 32


def _table(seed=0):
    t = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed))
    t[0] = 0.0  # a zero (padding) row
    return t


def _reference(teacher_w, student_w, table):
    """Today's per-candidate path: float32 cosines, equal ids cost 0, one POT network-simplex solve per pair."""
    unit = table / table.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    out, flows = [], []
    for tw, sw in zip(teacher_w, student_w):
        pd, fl = [], []
        for a in tw:
            f = np.zeros(len(a))
            for b in sw:
                ia, ib = torch.tensor(a), torch.tensor(b)
                cost = (1.0 - unit[ia] @ unit[ib].T).double().clamp_(0.0, 2.0)
                cost[ia[:, None] == ib[None, :]] = 0.0
                m = cost.numpy()
                plan = pot.emd(np.full(len(a), 1 / len(a)), np.full(len(b), 1 / len(b)), m)
                pd.append(max(0.0, float((plan * m).sum())))
                f += (plan * m).sum(axis=1) / len(sw)
            fl.append(f)
        out.append(float(np.mean(pd)))
        flows.append(fl)
    return np.array(out), flows


def _windows(seed, n_cand=40, samples=2, k=12):
    rng = np.random.default_rng(seed)
    teacher, student = [], []
    for c in range(n_cand):
        tw = [rng.integers(0, VOCAB, size=rng.integers(1, k + 1)).tolist() for _ in range(samples)]
        kind = c % 5
        if kind in (0, 1):  # greedy probes: every sample of a side is the same window
            tw = [tw[0]] * samples
        if kind == 0:  # identical windows (greedy probes): a tie at exactly 0
            sw = [list(w) for w in tw]
        elif kind == 1:  # same tokens, another order: also exactly 0
            sw = [list(reversed(w)) for w in tw]
        elif kind == 2:  # equal lengths, different tokens: the assignment path
            sw = [rng.integers(0, VOCAB, size=len(w)).tolist() for w in tw]
        elif kind == 3:  # shared prefix, early EOS on one side: unequal lengths, POT path
            sw = [w[: max(1, len(w) // 2)] + [int(rng.integers(0, VOCAB))] for w in tw]
        else:  # unequal random lengths, repeated ids, the zero row
            sw = [[0, 0] + rng.integers(0, 5, size=rng.integers(1, k + 1)).tolist() for _ in range(samples)]
        teacher.append(tw)
        student.append(sw)
    return teacher, student


@pytest.mark.parametrize("seed,samples", [(0, 1), (1, 2)])
def test_batched_equals_per_candidate_pot_with_unequal_lengths_and_ties(seed, samples):
    table = _table(seed)
    teacher, student = _windows(seed, samples=samples)
    got = window_divergence(teacher, student, lambda ids: table[ids], with_transport=True)
    want, want_flows = _reference(teacher, student, table)
    np.testing.assert_allclose(got.distance.numpy(), want, atol=1e-6, rtol=0)
    ties = [c for c in range(len(teacher)) if c % 5 in (0, 1)]
    assert all(float(got.distance[c]) == 0.0 for c in ties)  # exact zeros: suppression ties stay ties
    assert all(float(got.distance[c]) > 0.05 for c in range(len(teacher)) if c % 5 == 2)  # not vacuous
    assert sum(len(a) != len(b) for tw, sw in zip(teacher, student) for a in tw for b in sw) > 10  # POT path used
    for c in range(len(teacher)):
        for a in range(samples):
            # transport cost per teacher position: sums to the pair's distance (plans may differ among optima)
            assert got.transport[c][a].sum() == pytest.approx(want_flows[c][a].sum(), abs=1e-6)
            assert got.transport[c][a].shape == (len(teacher[c][a]),)


def test_chunking_does_not_change_results(monkeypatch):
    table = _table(3)
    teacher, student = _windows(3, n_cand=25, samples=2)
    whole = window_divergence(teacher, student, lambda ids: table[ids])
    monkeypatch.setattr(divergence, "PAIR_CHUNK", 7)
    chunked = window_divergence(teacher, student, lambda ids: table[ids])
    assert torch.equal(whole.distance, chunked.distance)


def test_assignment_solver_is_the_exact_emd():
    rng = np.random.default_rng(7)
    for n in (1, 2, 13, 50):
        cost = rng.random((n, n))
        d, plan = solve_emd(cost, with_plan=True)
        assert d == pytest.approx(pot.emd2(np.full(n, 1 / n), np.full(n, 1 / n), cost), abs=1e-12)
        np.testing.assert_allclose(plan.sum(axis=0), 1 / n)
        np.testing.assert_allclose(plan.sum(axis=1), 1 / n)
    assert solve_emd(np.zeros((4, 4)))[0] == 0.0
