"""The method options a TOPD-vs-OPD comparison needs (docs/method.md): topd.suppress (low | high | random, matched
count), threshold mode, OT calibration metrics, embedding_source auto, traj_normalization (window_mean | sum) in
topd_loss and in the training objective's guidance branch, and min_gap null."""
import numpy as np
import pytest
import torch

from megatron_topd.config import Config, TeacherConfig
from megatron_topd.topd import (
    TopdConfig,
    build_guidance,
    build_requests,
    divergence_weights,
    ot_statistics,
    position_weights,
    resolve_embedding_source,
    run_probe,
    select_candidates,
    topd_loss,
)
from megatron_topd.topd.weights import OT_STAT_KEYS


def _suppressed(d, **kw):
    w, div = divergence_weights(torch.as_tensor(d, dtype=torch.float64), **kw)
    assert torch.equal(w == 1.0, div)  # w_low = 0: weight 1 exactly for the divergent ones
    return set(torch.nonzero(~div).flatten().tolist())


# ---- suppress: low | high | random --------------------------------------------------------------------------------
def test_high_suppresses_the_matched_number_of_highest_ot_candidates():
    d = [0.0, 0.0, 0.0, 0.5, 0.7, 0.9, 0.2, 0.4, 0.1, 0.6]
    # low: floor(0.3 * 10) = 3 -> cut-off 0.0 -> the three zeros
    assert _suppressed(d, low_fraction=0.3) == {0, 1, 2}
    assert _suppressed(d, low_fraction=0.3, suppress="high") == {5, 4, 9}  # 0.9, 0.7, 0.6
    # ties at the low cut-off inflate the matched count: floor(0.2 * 6) = 1 but all three 0.3 are low -> m = 3
    d2 = [0.3, 0.3, 0.3, 0.8, 0.9, 1.0]
    assert _suppressed(d2, low_fraction=0.2) == {0, 1, 2}
    assert _suppressed(d2, low_fraction=0.2, suppress="high") == {3, 4, 5}
    # nothing suppressed by low -> nothing by high
    assert _suppressed(d2, low_fraction=0.1, suppress="high") == set()
    w, div = divergence_weights(torch.tensor(d), low_fraction=0.3, suppress="high", w_low=0.25)
    assert w.tolist() == [1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 1.0, 1.0, 1.0, 0.25]


def test_high_fills_ties_at_its_cut_off_at_random_from_the_seed_with_an_exact_count():
    d = [0.9, 0.5, 0.5, 0.5, 0.1, 0.0, 0.0, 0.2]
    assert _suppressed(d, low_fraction=0.25) == {5, 6}  # m = 2
    seen = set()
    for seed in range(30):
        s = _suppressed(d, low_fraction=0.25, suppress="high", seed=seed)
        assert len(s) == 2 and 0 in s and len(s & {1, 2, 3}) == 1  # 0.9 always, exactly one of the tied 0.5s
        assert s == _suppressed(d, low_fraction=0.25, suppress="high", seed=seed)  # reproducible
        seen |= s & {1, 2, 3}
    assert seen == {1, 2, 3}  # the tie is not settled by index order
    # ties that fit entirely are all in: m = 4 takes 0.9 and all three 0.5s
    assert _suppressed(d, low_fraction=0.5, suppress="high", seed=3) == {0, 1, 2, 3}  # low: {0.0, 0.0, 0.1, 0.2}


def test_random_suppresses_the_matched_count_reproducibly():
    g = torch.Generator().manual_seed(0)
    d = torch.rand(200, generator=g, dtype=torch.float64)
    m = len(_suppressed(d, low_fraction=0.3))
    assert m == 60
    picks = [_suppressed(d, low_fraction=0.3, suppress="random", seed=s) for s in (7, 7, 8)]
    assert all(len(p) == 60 for p in picks)
    assert picks[0] == picks[1] and picks[0] != picks[2]
    low = _suppressed(d, low_fraction=0.3)
    assert picks[0] != low and len(picks[0] & low) < 40  # not the low set (expected overlap 18)
    # roughly uniform: over many seeds every candidate is picked about 30% of the time
    counts = np.zeros(200)
    for s in range(200):
        counts[list(_suppressed(d, low_fraction=0.3, suppress="random", seed=s))] += 1
    assert counts.min() > 30 and counts.max() < 95  # mean 60, sd ~6.5


def test_threshold_mode_and_its_matched_controls():
    d = [0.05, 0.2, 0.1, 0.5, 1.2, 0.15]
    assert _suppressed(d, threshold=0.15) == {0, 2}  # strictly below the threshold
    assert _suppressed(d, threshold=0.15, low_fraction=0.9) == {0, 2}  # threshold wins over low_fraction
    assert _suppressed(d, threshold=0.15, suppress="high") == {4, 3}
    assert len(_suppressed(d, threshold=0.15, suppress="random", seed=1)) == 2
    assert _suppressed(d, threshold=0.0) == set()


def test_config_fields_defaults_and_errors():
    cfg = TopdConfig().validate()
    assert (cfg.suppress, cfg.embedding_source, cfg.traj_normalization, cfg.min_gap) == ("low", "auto",
                                                                                        "window_mean", 8)
    assert TopdConfig(min_gap=None).validate().candidate_gap == 1 and cfg.candidate_gap == 8
    for kwargs, message in [
        (dict(suppress="mid"), "topd.suppress='mid' is not supported: use one of low, high, random"),
        (dict(traj_normalization="mean"), "topd.traj_normalization='mean' is not supported: use one of window_mean, sum"),
        (dict(min_gap=0), "topd.min_gap=0: use an integer >= 1 \\(1 or null"),
        (dict(embedding_source="both"), "topd.embedding_source='both' is not supported: use one of auto, student"),
    ]:
        with pytest.raises(ValueError, match=message):
            TopdConfig(**kwargs).validate()
    with pytest.raises(ValueError, match="suppress='mid'"):
        divergence_weights([0.1, 0.2], suppress="mid")


# ---- OT calibration metrics ---------------------------------------------------------------------------------------
def test_ot_statistics_on_a_known_vector():
    d = torch.arange(10, dtype=torch.float64) / 10  # 0.0 .. 0.9
    divergent = torch.tensor([False] * 3 + [True] * 7)
    s = ot_statistics(d, divergent)
    assert set(s) == set(OT_STAT_KEYS)
    # linear interpolation at q * (n - 1): q10 -> 0.9 * 0.1 ...
    expected = {"ot_q10": 0.09, "ot_q25": 0.225, "ot_q50": 0.45, "ot_q75": 0.675, "ot_q90": 0.81,
                "ot_mean_suppressed": 0.1, "ot_mean_kept": 4.2 / 7}
    for k, v in expected.items():
        assert s[k] == pytest.approx(v, abs=1e-12), k
    assert ot_statistics(torch.zeros(0), torch.zeros(0, dtype=torch.bool)) == {k: 0.0 for k in OT_STAT_KEYS}
    only_kept = ot_statistics(torch.tensor([0.2, 0.4]), torch.tensor([True, True]))
    assert only_kept["ot_mean_suppressed"] == 0.0 and only_kept["ot_mean_kept"] == pytest.approx(0.3)


# ---- embedding_source auto ----------------------------------------------------------------------------------------
def test_embedding_source_auto_resolution_and_the_remote_teacher_error():
    assert resolve_embedding_source("auto", "colocated") == "teacher"
    assert resolve_embedding_source("auto", "remote") == "student"
    assert resolve_embedding_source("student", "colocated") == "student"
    assert resolve_embedding_source("student", "remote") == "student"
    assert resolve_embedding_source("teacher", "colocated") == "teacher"
    assert TopdConfig().embedding_table("colocated") == "teacher"
    with pytest.raises(ValueError, match="topd.embedding_source=teacher.*teacher.placement=remote.*auto or student"):
        resolve_embedding_source("teacher", "remote")
    remote = dict(placement="remote", kl="topk", urls=["http://t:1"])
    with pytest.raises(ValueError, match="topd.embedding_source=teacher needs the teacher's input-embedding table"):
        Config(teacher=TeacherConfig(**remote), topd=TopdConfig(embedding_source="teacher")).validate()
    cfg = Config(teacher=TeacherConfig(**remote)).validate()  # auto + remote is fine: the student's table
    assert cfg.topd.embedding_table(cfg.teacher.placement) == "student"


# ---- traj_normalization -------------------------------------------------------------------------------------------
def test_position_weights_under_each_normalisation():
    np.testing.assert_allclose(position_weights(4, "uniform"), [0.25] * 4)
    np.testing.assert_allclose(position_weights(4, "uniform", normalization="sum"), [1.0] * 4)
    np.testing.assert_allclose(position_weights(3, "geometric", gamma=0.5, normalization="sum"),
                               np.array([1.0, 0.5, 0.25]) / 1.75 * 3)
    np.testing.assert_allclose(position_weights(3, "ot_plan", transport=np.array([0.0, 1.0, 3.0]),
                                                normalization="sum"), [0.0, 0.75, 2.25])
    with pytest.raises(ValueError, match="traj_normalization='mean'"):
        position_weights(3, "uniform", normalization="mean")


def _two_windows(normalization):
    """Windows of K = 2 and 3 positions at logit positions [1, 2] and [2, 3, 4]; uniform weights."""
    requests = build_requests(torch.arange(20).reshape(2, 10), [[2], [3]])
    g = build_guidance(requests, [[[5, 6]], [[7, 8, 9]]], torch.tensor([True, True]), pad_id=0,
                       normalization=normalization)
    return g


def test_topd_loss_window_mean_and_sum_against_hand_values():
    kl = torch.zeros(2, 6, dtype=torch.float64)
    kl[0, 1:3] = torch.tensor([0.2, 0.6], dtype=torch.float64)
    kl[1, 2:5] = torch.tensor([0.3, 0.9, 1.5], dtype=torch.float64)
    token_loss = torch.tensor([[0.0, 1.0, 2.0, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[False, True, True, True]])
    tw = torch.ones(1, 4, dtype=torch.float64)
    lam = 0.5
    hand = {"window_mean": (0.4 + 0.9) / 2, "sum": (0.8 + 2.7) / 2}  # mean over windows of the window mean / sum
    for norm, traj_ref in hand.items():
        g = _two_windows(norm)
        assert g.logit_weights.shape == (2, 6)
        w = g.logit_weights.double()
        loss, m = topd_loss(token_loss, tw, mask, lambda_traj=lam, traj_kl=kl, traj_weights=w,
                            traj_normalization=norm, traj_mask=g.logit_mask)
        assert m["traj_loss"] == pytest.approx(traj_ref, abs=1e-6)  # topd_loss computes in float32
        assert float(loss) == pytest.approx(2.0 + lam * traj_ref, abs=1e-6)
        # without traj_mask the window length is the number of non-zero weights (all of them here)
        assert topd_loss(token_loss, tw, mask, lambda_traj=lam, traj_kl=kl, traj_weights=w,
                         traj_normalization=norm)[1]["traj_loss"] == pytest.approx(traj_ref, abs=1e-6)
    # rows built for one normalisation are refused under the other
    with pytest.raises(ValueError, match="row 1 sums to 1.000000, expected 3: .*traj_normalization=sum"):
        topd_loss(token_loss, tw, mask, traj_kl=kl, traj_weights=_two_windows("window_mean").logit_weights.double(),
                  traj_normalization="sum")
    with pytest.raises(ValueError, match="row 1 sums to 3.000000, expected 1: .*window_mean"):
        topd_loss(token_loss, tw, mask, traj_kl=kl, traj_weights=_two_windows("sum").logit_weights.double())
    with pytest.raises(ValueError, match="traj_normalization='mean'"):
        topd_loss(token_loss, tw, mask, traj_kl=kl, traj_weights=kl, traj_normalization="mean")


def test_effective_weight_of_a_guidance_token_against_a_rollout_token():
    """docs/method.md: window_mean gives a guidance token lambda / (K * N_windows), sum gives lambda / N_windows,
    a rollout token 1 / N_tokens (d L / d KL)."""
    lam = 0.7
    token_loss = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[False, True, True, True, True]])
    for norm, k_factor in (("window_mean", 1 / 3), ("sum", 1.0)):
        g = _two_windows(norm)
        kl = torch.rand(2, 6, dtype=torch.float64).requires_grad_()
        loss, _ = topd_loss(token_loss, torch.ones(1, 5, dtype=torch.float64), mask, lambda_traj=lam, traj_kl=kl,
                            traj_weights=g.logit_weights.double(), traj_normalization=norm, traj_mask=g.logit_mask)
        g_tok, g_kl = torch.autograd.grad(loss, [token_loss, kl])
        assert float(g_tok[0, 1]) == pytest.approx(1 / 4)
        assert float(g_kl[1, 3]) == pytest.approx(lam * k_factor / 2)  # window 1 has K = 3 positions, N = 2 windows
        assert float(g_kl[1, 0]) == 0.0  # outside the window


def test_objective_guidance_branch_honours_both_normalisations():
    from megatron_topd.train import batches as mb
    from megatron_topd.train.objective import ObjectiveScales, make_loss_fn, total_loss

    V, lam = 11, 0.7
    gen = torch.Generator().manual_seed(5)
    for norm in ("window_mean", "sum"):
        g = _two_windows(norm)
        N, L = g.tokens.shape
        s_logits = torch.randn(N, L, V, generator=gen, dtype=torch.float64, requires_grad=True)
        t_logits = torch.randn(N, L, V, generator=gen, dtype=torch.float64)
        # hand: forward KL(pi_T || pi_S) at each window position, summed (sum) or averaged (window_mean) per window
        lt, ls = torch.log_softmax(t_logits, -1), torch.log_softmax(s_logits, -1)
        kl = (lt.exp() * (lt - ls)).sum(-1)
        per_window = [kl[0, 1:3], kl[1, 2:5]]
        reduce = torch.sum if norm == "sum" else torch.mean
        ref = lam * sum(reduce(x) for x in per_window) / N

        micro = mb.guidance_microbatches(g.tokens, g.lengths, g.logit_weights, max_tokens=8, pad_id=0, multiple=1)
        assert len(micro) == 2  # one row per microbatch: rows of 4 and 6 tokens
        order = sorted(range(N), key=lambda i: (-int(g.lengths[i]), i))
        student, teacher = [], []
        for b, i in zip(micro, order):
            w = b["tokens"].shape[1]
            student.append(s_logits[i : i + 1, :w])
            teacher.append(t_logits[i : i + 1, :w].reshape(-1, V).index_select(0, b["loss_index"]))
        scales = ObjectiveScales(dp_size=1, global_tokens=1, global_windows=N, lambda_traj=lam, variant="topd")
        loss_fn = make_loss_fn(teacher, scales, num_in_call=len(micro), vocab_size=V, chunk_size=None)
        outs = [loss_fn(s, b) for s, b in zip(student, micro)]
        total = sum(o[0] for o in outs) / len(outs)
        sums = {k: float(sum(o[1][k] for o in outs)) for k in ("traj_sum", "windows", "opd_sum")}
        assert float(total.detach()) == pytest.approx(float(ref.detach()), rel=1e-6)  # loss_weights are float32
        assert sums["windows"] == N  # rows, whatever the weights sum to
        assert total_loss(sums, scales)[2] * lam == pytest.approx(float(ref), rel=1e-6)
        torch.testing.assert_close(torch.autograd.grad(total, s_logits)[0], torch.autograd.grad(ref, s_logits)[0])


# ---- min_gap null -------------------------------------------------------------------------------------------------
def test_min_gap_null_means_no_spacing_also_in_fraction_mode():
    loss = torch.tensor([[0.0, 5.0, 4.0, 3.0, 1.0, 2.0, 0.5]])
    mask = torch.tensor([[False] + [True] * 6])
    assert select_candidates(loss, mask, top_k=None, min_gap=None, fraction=0.5) == [[1, 2, 3]]
    assert select_candidates(loss, mask, top_k=None, min_gap=2, fraction=0.5) == [[1, 3, 5]]
    assert select_candidates(loss, mask, top_k=2, min_gap=None) == [[1, 2]]

    class Fixed:  # teacher: [2, 2]; student: [2, 2] after an odd prefix, [3, 3] after an even one
        def __init__(self, teacher):
            self.teacher = teacher

        def continue_prefixes(self, prefixes, *, max_new_tokens, n, temperature, top_p, seed):
            return [[[2, 2] if self.teacher or len(p) % 2 else [3, 3]] * n for p in prefixes]

    cfg = TopdConfig(variant="topd", candidate_mode="fraction", candidate_fraction=0.5, min_gap=None, window=2,
                     low_fraction=0.5)
    tokens = torch.arange(7).reshape(1, 7) % 5
    r = run_probe(tokens, loss, mask, cfg, teacher=Fixed(True), student=Fixed(False), embed=lambda ids:
                  torch.eye(8, dtype=torch.float64)[ids], pad_id=0, seed=0)
    assert r.candidates == [[1, 2, 3]]
    assert r.ot_distances.tolist() == [0.0, 1.0, 0.0]  # prefix lengths 1, 2, 3
    assert r.divergent.tolist() == [False, True, False]  # floor(0.5 * 3) = 1: cut-off 0.0, both zeros suppressed
    assert r.guidance.num_windows == 1 and r.token_weights[0, 1:4].tolist() == [0.0, 1.0, 0.0]
    assert r.ot_stats["ot_q50"] == 0.0 and r.ot_stats["ot_q90"] == pytest.approx(0.8)
    assert (r.ot_stats["ot_mean_suppressed"], r.ot_stats["ot_mean_kept"]) == (0.0, 1.0)
