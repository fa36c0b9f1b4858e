"""The probe end to end with real (tiny, random) torch language models as teacher and student: sampler contract,
guidance alignment, OT on windows, the variant identities and where gradients go."""
import numpy as np
import pytest
import torch
from torch import nn

from megatron_topd.topd import (
    TopdConfig,
    TorchModelSampler,
    build_guidance,
    build_requests,
    embedding_lookup,
    logits_to_tokens,
    ot_distance,
    position_weights,
    run_probe,
    topd_loss,
    window_divergence,
)
from megatron_topd.topd.sampler import ContinuationSampler

VOCAB, EOS, PAD = 24, 1, 0


class TinyLM(nn.Module):
    """Embedding + GRU + LM head: a real causal LM, small enough to sample from on one CPU core."""

    def __init__(self, seed: int, hidden: int = 16):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, hidden)
            self.rnn = nn.GRU(hidden, hidden, batch_first=True)
            self.head = nn.Linear(hidden, VOCAB)
            with torch.no_grad():
                self.head.weight.mul_(4.0)  # peakier distributions: windows differ between models, not just noise

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


@pytest.fixture(scope="module")
def models():
    student, teacher = TinyLM(0), TinyLM(1)
    for p in teacher.parameters():
        p.requires_grad_(True)  # deliberately trainable: the test checks that no gradient reaches it anyway
    return student, teacher


@pytest.fixture(scope="module")
def rollouts(models):
    """Student rollouts of 6 prompts, right-padded: (tokens [B, T], response_mask [B, T])."""
    student, _ = models
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(2, VOCAB, (int(n),), generator=g).tolist() for n in torch.randint(3, 7, (6,), generator=g)]
    responses = TorchModelSampler(student, eos_id=EOS).continue_prefixes(
        prompts, max_new_tokens=40, n=1, temperature=1.0, top_p=1.0, seed=11
    )
    rows = [p + r[0] for p, r in zip(prompts, responses)]
    tokens = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
    mask = torch.zeros(tokens.shape, dtype=torch.bool)
    for b, (p, row) in enumerate(zip(prompts, rows)):
        tokens[b, : len(row)] = torch.tensor(row)
        mask[b, len(p) : len(row)] = True
    return tokens, mask


def _reverse_kl(student, teacher, tokens):
    """Token-aligned KL(pi_S || pi_T) with the graph on the student only (as the trainer's frozen teacher)."""
    s = torch.log_softmax(student(tokens).float(), -1)
    with torch.no_grad():
        t = torch.log_softmax(teacher(tokens).float(), -1)
    return logits_to_tokens((s.exp() * (s - t)).sum(-1))


def _forward_kl(student, teacher, tokens):
    """Logit-aligned KL(pi_T || pi_S) on guidance rows."""
    s = torch.log_softmax(student(tokens).float(), -1)
    with torch.no_grad():
        t = torch.log_softmax(teacher(tokens).float(), -1)
    return (t.exp() * (t - s)).sum(-1)


def _step(models, rollouts, cfg, seed=5):
    """One objective evaluation; returns (loss, metrics, probe result, grads of the student)."""
    student, teacher = models
    tokens, mask = rollouts
    student.zero_grad(set_to_none=True)
    teacher.zero_grad(set_to_none=True)
    l_t = _reverse_kl(student, teacher, tokens)
    samplers = dict(teacher=TorchModelSampler(teacher, eos_id=EOS), student=TorchModelSampler(student, eos_id=EOS))
    probe = run_probe(tokens, l_t.detach(), mask, cfg, embed=embedding_lookup(student.embed.weight), pad_id=PAD,
                      seed=seed, **samplers)
    kw = {}
    if cfg.variant == "topd":
        kw = dict(traj_kl=_forward_kl(student, teacher, probe.guidance.tokens),
                  traj_weights=probe.guidance.logit_weights)
    loss, metrics = topd_loss(l_t, probe.token_weights, mask, variant=cfg.variant, lambda_traj=cfg.lambda_traj,
                              ot_distances=probe.ot_distances, divergent=probe.divergent, **kw)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    return loss, metrics, probe, grads


def test_torch_sampler_honours_the_protocol(models):
    student, _ = models
    sampler = TorchModelSampler(student, eos_id=EOS)
    assert isinstance(sampler, ContinuationSampler)
    prefixes = [[2, 3, 4], [5], [6, 7, 8, 9, 10]]
    out = sampler.continue_prefixes(prefixes, max_new_tokens=30, n=3, temperature=1.0, top_p=0.9, seed=3)
    assert len(out) == 3 and all(len(o) == 3 for o in out)
    lengths = [len(w) for o in out for w in o]
    assert min(lengths) >= 1 and max(lengths) <= 30
    for w in (w for o in out for w in o):
        assert EOS not in w[:-1]
        assert len(w) == 30 or w[-1] == EOS
    assert len(set(lengths)) > 1 or len(set(tuple(w) for o in out for w in o)) > 1  # real sampling, not one canned list
    assert out == sampler.continue_prefixes(prefixes, max_new_tokens=30, n=3, temperature=1.0, top_p=0.9, seed=3)
    greedy = sampler.continue_prefixes([[2, 3, 4]], max_new_tokens=6, n=2, temperature=0.0, top_p=1.0, seed=None)
    assert greedy[0][0] == greedy[0][1]
    ids = torch.tensor([[2, 3, 4]])
    for tok in greedy[0][0]:  # greedy = argmax of the model at every step
        assert int(student(ids)[0, -1].argmax()) == tok
        ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)


def test_guidance_rows_are_aligned_with_the_teachers_logits(models, rollouts):
    _, teacher = models
    tokens, mask = rollouts
    candidates = [[int(mask[b].nonzero()[k]) for k in (0, 3)] for b in range(tokens.shape[0])]
    requests = build_requests(tokens, candidates)
    assert requests.prefixes[1] == tokens[0, : candidates[0][1]].tolist()  # prefix = ids up to t - 1
    greedy = TorchModelSampler(teacher, eos_id=EOS).continue_prefixes(
        requests.prefixes, max_new_tokens=12, n=1, temperature=0.0, top_p=1.0, seed=None
    )
    divergent = [c % 3 != 1 for c in range(len(requests))]
    g = build_guidance(requests, greedy, divergent, weighting="geometric", gamma=0.5, pad_id=PAD)
    assert g.num_windows == sum(divergent)
    predicted = teacher(g.tokens).argmax(-1)
    for n in range(g.num_windows):
        c, t = int(g.candidate[n]), int(g.window_start[n])
        assert divergent[c] and t == requests.owners[c][1]
        window = greedy[c][0]
        positions = g.logit_mask[n].nonzero()[:, 0]
        assert positions.tolist() == list(range(t - 1, t - 1 + len(window)))
        # the logits at each masked position predict the next window token: the teacher's greedy choice there
        assert predicted[n, positions].tolist() == window
        assert g.tokens[n, positions + 1].tolist() == window
        w = g.logit_weights[n, positions]
        assert float(w.sum()) == pytest.approx(1.0) and torch.allclose(w[1:] / w[:-1], torch.tensor(0.5))
        assert (g.logit_weights[n][~g.logit_mask[n]] == 0).all()
        assert (g.tokens[n, int(g.lengths[n]) :] == PAD).all()


def test_position_weights_options():
    assert np.allclose(position_weights(4, "uniform"), 0.25)
    assert np.allclose(position_weights(3, "geometric", gamma=0.5), np.array([4, 2, 1]) / 7)
    assert np.allclose(position_weights(3, "ot_plan", transport=np.array([0.0, 0.3, 0.1])), [0.0, 0.75, 0.25])
    assert np.allclose(position_weights(2, "ot_plan", transport=np.zeros(2)), 0.5)  # matched futures: uniform
    with pytest.raises(ValueError, match="transport cost of each of the 3"):
        position_weights(3, "ot_plan", transport=np.ones(2))
    with pytest.raises(ValueError, match="'linear' is not supported"):
        position_weights(3, "linear")


def test_window_divergence_matches_the_vector_ot_and_is_zero_for_identical_windows(models):
    student, _ = models
    table = student.embed.weight
    teacher_w = [[[2, 3, 4, 5]], [[6, 7, 1]], [[9, 9, 10], [11, 12]]]
    student_w = [[[2, 3, 4, 5]], [[7, 8, 9, 10, 1]], [[9, 13], [10, 14, 15]]]
    div = window_divergence(teacher_w, student_w, embedding_lookup(table), with_transport=True)
    assert div.distance[0] == 0.0
    rows = table.detach()
    expected_1 = ot_distance(rows[[6, 7, 1]], rows[[7, 8, 9, 10, 1]])
    assert float(div.distance[1]) == pytest.approx(expected_1, abs=1e-6) and expected_1 > 0.1
    pairs = [ot_distance(rows[a], rows[b]) for a in teacher_w[2] for b in student_w[2]]
    assert float(div.distance[2]) == pytest.approx(np.mean(pairs), abs=1e-6)
    assert div.pair_distance[2].shape == (2, 2)
    assert div.transport[1][0].shape == (3,) and div.transport[1][0].sum() == pytest.approx(expected_1, abs=1e-6)
    assert np.all(div.transport[0][0] == 0)
    with pytest.raises(ValueError, match="student window 0 of candidate 1 is empty"):
        window_divergence(teacher_w, [[[2]], [[]], [[3]]], embedding_lookup(table))
    with pytest.raises(ValueError, match="token ids must lie in \\[0, 24\\)"):
        window_divergence([[[2, 99]]], [[[3]]], embedding_lookup(table))


def test_probe_runs_end_to_end_and_variant_identities_hold(models, rollouts):
    tokens, mask = rollouts
    base = dict(top_k=2, min_gap=4, window=8, samples_per_side=2)
    _, m_opd, _, g_opd = _step(models, rollouts, TopdConfig(variant="opd", **base))
    loss_opd, _ = topd_loss(_reverse_kl(*models, tokens), torch.ones(tokens.shape), mask, variant="opd")

    loss0, m0, probe0, g0 = _step(models, rollouts, TopdConfig(variant="opd_suppress", low_fraction=0.0, **base))
    n_cand = sum(len(c) for c in probe0.candidates)
    assert probe0.divergent.all() and len(probe0.divergent) == n_cand >= 10
    assert loss0.item() == pytest.approx(loss_opd.item(), rel=1e-7)
    assert all(torch.equal(g0[k], g_opd[k]) for k in g_opd)  # identical to plain OPD, gradients included

    loss_s, m_s, probe_s, g_s = _step(models, rollouts, TopdConfig(variant="opd_suppress", low_fraction=0.5, **base))
    low = ~probe_s.divergent
    assert (probe_s.ot_distances > 0).all() and int(low.sum()) == n_cand // 2  # distinct distances: floor(q * C)
    assert m_s["low_divergence_share"] == pytest.approx((n_cand // 2) / n_cand)
    assert probe_s.ot_distances[low].max() < probe_s.ot_distances[~low].min()
    assert (probe_s.candidate_weights[low] == 0).all() and loss_s.item() < loss0.item()
    for (b, t), is_low in zip(probe_s.requests.owners, low.tolist()):
        assert float(probe_s.token_weights[b, t]) == (0.0 if is_low else 1.0)

    loss_t0, _, probe_t0, g_t0 = _step(models, rollouts, TopdConfig(variant="topd", lambda_traj=0.0, low_fraction=0.5,
                                                                   **base))
    assert probe_t0.guidance.num_windows == 2 * int(probe_t0.divergent.sum())  # every teacher sample of each point
    assert loss_t0.item() == pytest.approx(loss_s.item(), rel=1e-7)
    assert all(torch.allclose(g_t0[k], g_s[k], atol=1e-7) for k in g_s)

    loss_t, m_t, _, g_t = _step(models, rollouts, TopdConfig(variant="topd", low_fraction=0.5, **base))
    assert m_t["traj_loss"] > 0 and loss_t.item() == pytest.approx(loss_s.item() + m_t["traj_loss"], rel=1e-6)
    assert not torch.allclose(g_t["rnn.weight_hh_l0"], g_s["rnn.weight_hh_l0"])  # the guidance term trains the student
    assert m_t["n_divergent"] == int(probe_t0.divergent.sum()) and m_t["n_candidates"] == n_cand


def test_gradients_reach_only_the_student(models, rollouts):
    student, teacher = models
    assert student.embed.weight.requires_grad  # the OT embedding source is a live trainable table
    cfg = TopdConfig(variant="topd", top_k=2, min_gap=4, window=8, position_weighting="ot_plan", low_fraction=0.3)
    _, _, probe, grads = _step(models, rollouts, cfg)
    assert not probe.token_weights.requires_grad and not probe.guidance.logit_weights.requires_grad
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())


def test_opd_variant_does_not_probe_and_bad_samplers_are_named(models, rollouts):
    tokens, mask = rollouts
    l_t = _reverse_kl(*models, tokens).detach()

    class Broken:
        def continue_prefixes(self, prefixes, **kw):
            return [[[]] * kw["n"] for _ in prefixes]

    opd = run_probe(tokens, l_t, mask, TopdConfig(variant="opd"), teacher=None, student=None, embed=None, pad_id=PAD)
    assert opd.requests.prefixes == [] and torch.equal(opd.token_weights, torch.ones(tokens.shape))
    good = TorchModelSampler(models[1], eos_id=EOS)
    with pytest.raises(ValueError, match="student sampler: continuation 0 of prefix 0 has 0 tokens"):
        run_probe(tokens, l_t, mask, TopdConfig(window=4), teacher=good, student=Broken(),
                  embed=embedding_lookup(models[0].embed.weight), pad_id=PAD)
    with pytest.raises(ValueError, match="topd.window=0"):
        run_probe(tokens, l_t, mask, TopdConfig(window=0), teacher=good, student=good, embed=None, pad_id=PAD)
    with pytest.raises(ValueError, match="outside \\[1, "):
        build_requests(tokens, [[0]] + [[]] * (tokens.shape[0] - 1))
