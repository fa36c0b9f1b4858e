"""The objective: formula, gradients, variants, metrics and input errors (the pipeline identities live in
test_topd_pipeline.py)."""
import pytest
import torch

from megatron_topd.topd import logits_to_tokens, topd_loss


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(3, 10, generator=g, dtype=torch.float64).float().requires_grad_()
    mask = torch.zeros(3, 10, dtype=torch.bool)
    mask[0, 2:9], mask[1, 4:10], mask[2, 1:3] = True, True, True
    weights = torch.ones(3, 10)
    weights[0, 5], weights[1, 7] = 0.0, 0.5
    traj_kl = torch.rand(2, 12, generator=g).requires_grad_()
    traj_w = torch.zeros(2, 12)
    traj_w[0, 3:7] = 0.25
    traj_w[1, 0:2] = torch.tensor([0.75, 0.25])
    return loss, mask, weights, traj_kl, traj_w


def test_topd_matches_the_formula_and_its_gradient():
    loss, mask, w, kl, u = _inputs()
    out, metrics = topd_loss(loss, w, mask, variant="topd", lambda_traj=0.7, traj_kl=kl, traj_weights=u)
    n = int(mask.sum())
    opd = (loss * w * mask).sum() / n
    traj = (kl * u).sum() / 2
    assert out.item() == pytest.approx((opd + 0.7 * traj).item(), rel=1e-6)
    assert metrics["opd_loss"] == pytest.approx(opd.item(), rel=1e-6)
    assert metrics["traj_loss"] == pytest.approx(traj.item(), rel=1e-6)
    assert metrics["n_tokens"] == n and metrics["n_windows"] == 2
    assert metrics["mean_token_loss"] == pytest.approx((loss * mask).sum().item() / n, rel=1e-6)
    out.backward()
    assert torch.allclose(loss.grad, (w * mask) / n)  # suppressed tokens get exactly zero gradient
    assert loss.grad[0, 5] == 0 and loss.grad[0, 4] > 0
    assert torch.allclose(kl.grad, 0.7 * u / 2)


def test_variants_and_normaliser_overrides():
    loss, mask, w, kl, u = _inputs(1)
    opd, _ = topd_loss(loss, w, mask, variant="opd")
    assert opd.item() == pytest.approx((loss * mask).sum().item() / int(mask.sum()), rel=1e-6)  # weights ignored
    sup, _ = topd_loss(loss, w, mask, variant="opd_suppress")
    assert sup.item() == pytest.approx((loss * w * mask).sum().item() / int(mask.sum()), rel=1e-6)
    assert sup.item() < opd.item()
    topd0, _ = topd_loss(loss, w, mask, variant="topd", lambda_traj=0.0, traj_kl=kl, traj_weights=u)
    assert topd0.item() == pytest.approx(sup.item(), rel=1e-7)
    glob, m = topd_loss(loss, w, mask, variant="topd", traj_kl=kl, traj_weights=u, num_tokens=100, num_windows=8)
    assert glob.item() == pytest.approx(((loss * w * mask).sum() / 100 + (kl * u).sum() / 8).item(), rel=1e-6)
    empty, m = topd_loss(loss, w, mask, variant="topd", traj_kl=torch.zeros(0, 5), traj_weights=torch.zeros(0, 5))
    assert empty.item() == pytest.approx(sup.item(), rel=1e-7) and m["traj_loss"] == 0.0


def test_nan_outside_the_used_positions_is_ignored_and_does_not_reach_gradients():
    loss, mask, w, kl, u = _inputs(2)
    with torch.no_grad():
        loss[~mask] = float("nan")
        kl[u == 0] = float("inf")
        w[~mask] = float("nan")
    out, _ = topd_loss(loss, w, mask, variant="topd", traj_kl=kl, traj_weights=u)
    out.backward()
    assert torch.isfinite(out) and torch.isfinite(loss.grad).all() and torch.isfinite(kl.grad).all()


def test_candidate_metrics():
    loss, mask, w, _, _ = _inputs(3)
    _, m = topd_loss(loss, w, mask, variant="opd_suppress", ot_distances=torch.tensor([0.1, 0.5, 0.3, 0.0]),
                     divergent=torch.tensor([False, True, True, False]))
    assert m["low_divergence_share"] == 0.5 and m["n_divergent"] == 2 and m["n_candidates"] == 4
    assert m["mean_ot_distance"] == pytest.approx(0.225)


def test_bad_inputs_raise_clear_errors():
    loss, mask, w, kl, u = _inputs(4)
    with pytest.raises(ValueError, match="token_weights shape"):
        topd_loss(loss, w[:, :5], mask, variant="opd_suppress")
    with pytest.raises(ValueError, match="response_mask shape"):
        topd_loss(loss, w, mask[:2], variant="opd")
    nan = loss.detach().clone()
    nan[1, 6] = float("nan")
    with pytest.raises(ValueError, match=r"not finite at response position \(batch 1, token 6\)"):
        topd_loss(nan, w, mask, variant="opd")
    with pytest.raises(ValueError, match="needs traj_kl and traj_weights"):
        topd_loss(loss, w, mask, variant="topd")
    with pytest.raises(ValueError, match="must be the same"):
        topd_loss(loss, w, mask, variant="topd", traj_kl=kl, traj_weights=u[:, :4])
    bad_kl = kl.detach().clone()
    bad_kl[0, 4] = float("nan")
    with pytest.raises(ValueError, match="traj_kl is not finite at window 0, logit position 4"):
        topd_loss(loss, w, mask, variant="topd", traj_kl=bad_kl, traj_weights=u)
    with pytest.raises(ValueError, match="row 1 sums to 2.0"):
        topd_loss(loss, w, mask, variant="topd", traj_kl=kl, traj_weights=u * torch.tensor([[1.0], [2.0]]))
    with pytest.raises(ValueError, match="token_weights requires grad"):
        topd_loss(loss, w.clone().requires_grad_(), mask, variant="opd_suppress")
    with pytest.raises(ValueError, match="traj_weights requires grad"):
        topd_loss(loss, w, mask, variant="topd", traj_kl=kl, traj_weights=u.clone().requires_grad_())
    with pytest.raises(ValueError, match="variant='kd'"):
        topd_loss(loss, w, mask, variant="kd")
    with pytest.raises(ValueError, match="response_mask is empty"):
        topd_loss(loss, w, torch.zeros_like(mask), variant="opd")


def test_logits_to_tokens_shifts_by_one():
    per_logit = torch.arange(8.0).reshape(2, 4).requires_grad_()
    out = logits_to_tokens(per_logit, fill=-1.0)
    assert out.tolist() == [[-1.0, 0.0, 1.0, 2.0], [-1.0, 4.0, 5.0, 6.0]]
    out.sum().backward()
    assert per_logit.grad.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
