"""Step 8: the OPD / OPD+suppression / TOPD objective from per-token statistics.

``L = sum_t w_t l_t / N_tokens + lambda * L_traj`` with ``L_traj = (1 / N_windows) * sum_n sum_p u_{n,p} KL_{n,p}``:
``l_t`` the token-aligned reverse KL, ``w_t`` the suppression weights, ``N_tokens`` the number of response tokens
(not the sum of weights: suppression removes a token's signal, it does not re-scale the others), ``KL_{n,p}`` the
forward KL ``KL(pi_T || pi_S)`` of guidance row ``n`` at logit position ``p`` and ``u`` its position weights.
``traj_normalization``: ``window_mean`` (each row sums to 1, so ``L_traj`` is a mean over divergent windows of a
weighted mean over each window) or ``sum`` (each row sums to its window length ``K_n``: a mean over windows of a
weighted sum over each window; uniform weights are 1 per position). The normalisation lives in the weights
(`windows.position_weights`); this function checks that the rows follow it.
Weights are constants of the step: they must not require grad.
"""
from __future__ import annotations

import torch

from megatron_topd.topd import checks
from megatron_topd.topd.config import TRAJ_NORMALIZATIONS, VARIANTS


def topd_loss(
    token_loss: torch.Tensor,
    token_weights: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    variant: str = "topd",
    lambda_traj: float = 1.0,
    traj_kl: torch.Tensor | None = None,
    traj_weights: torch.Tensor | None = None,
    ot_distances: torch.Tensor | None = None,
    divergent: torch.Tensor | None = None,
    num_tokens: int | None = None,
    num_windows: int | None = None,
    traj_normalization: str = "window_mean",
    traj_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar loss and the step's diagnostics.

    ``variant="opd"`` ignores ``token_weights`` and the trajectory terms; ``"opd_suppress"`` applies the weights;
    ``"topd"`` also needs ``traj_kl``/``traj_weights`` ``[N, L]`` (``N = 0`` when no candidate is divergent).
    ``num_tokens``/``num_windows`` override the local normalisers (e.g. with counts summed over data-parallel ranks
    or micro-batches). ``ot_distances``/``divergent`` (per candidate) only feed the metrics.
    ``traj_normalization`` (``topd.traj_normalization``) is the contract of ``traj_weights``' rows: sum 1
    (``window_mean``) or the window length (``sum``), counted from ``traj_mask`` (``GuidanceBatch.logit_mask``) when
    given, else from the positions with a non-zero weight.
    """
    if traj_normalization not in TRAJ_NORMALIZATIONS:
        raise ValueError(f"traj_normalization={traj_normalization!r} is not supported: use one of "
                         f"{', '.join(TRAJ_NORMALIZATIONS)}")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported: use one of {', '.join(VARIANTS)}")
    token_loss, mask = checks.token_inputs(token_loss, response_mask)
    if token_weights.shape != token_loss.shape:
        raise ValueError(
            f"token_weights shape {tuple(token_weights.shape)} != token_loss shape {tuple(token_loss.shape)}"
        )
    _constant("token_weights", token_weights)
    n_tokens = int(mask.sum()) if num_tokens is None else int(num_tokens)
    if n_tokens <= 0:
        raise ValueError("no response tokens to average over: the batch's response_mask is empty (or num_tokens <= 0)")
    loss_f = token_loss.float()
    zero = torch.zeros((), dtype=loss_f.dtype, device=loss_f.device)
    per_token = torch.where(mask, loss_f, zero)
    if variant == "opd":
        opd = per_token.sum() / n_tokens
    else:
        if not bool(torch.isfinite(token_weights[mask]).all()) or bool((token_weights[mask] < 0).any()):
            raise ValueError("token_weights must be finite and non-negative at response positions")
        w = torch.where(mask, token_weights.to(loss_f.dtype), zero)  # padding weights are never read
        opd = (per_token * w).sum() / n_tokens
    traj = zero
    n_windows = 0
    if variant == "topd":
        traj, n_windows = _trajectory(traj_kl, traj_weights, num_windows, loss_f, traj_normalization, traj_mask)
        loss = opd + float(lambda_traj) * traj
    else:
        loss = opd
    metrics = {
        "loss": float(loss.detach()),
        "opd_loss": float(opd.detach()),
        "traj_loss": float(traj.detach()),
        "mean_token_loss": float(per_token.detach().sum()) / max(int(mask.sum()), 1),
        "n_tokens": float(n_tokens),
        "n_windows": float(n_windows),
    }
    metrics.update(_candidate_metrics(ot_distances, divergent))
    return loss, metrics


def _trajectory(traj_kl, traj_weights, num_windows, like: torch.Tensor, normalization: str = "window_mean",
                traj_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    if traj_kl is None or traj_weights is None:
        raise ValueError(
            "variant='topd' needs traj_kl and traj_weights (forward KL on the guidance batch and its logit_weights); "
            "pass empty [0, L] tensors when no candidate is divergent, or use variant='opd_suppress'"
        )
    if traj_kl.dim() != 2 or traj_kl.shape != traj_weights.shape:
        raise ValueError(
            f"traj_kl shape {tuple(traj_kl.shape)} and traj_weights shape {tuple(traj_weights.shape)} must be the "
            "same [windows, seq] (logit-aligned, as GuidanceBatch.logit_weights)"
        )
    _constant("traj_weights", traj_weights)
    n = int(traj_kl.shape[0]) if num_windows is None else int(num_windows)
    if traj_kl.shape[0] == 0:
        return torch.zeros((), dtype=like.dtype, device=like.device), n
    if n <= 0:
        raise ValueError(f"num_windows={num_windows} but traj_kl has {traj_kl.shape[0]} windows")
    w = traj_weights.detach().to(like.dtype)
    used = w != 0
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("traj_weights must be finite and non-negative")
    sums = w.sum(dim=1)
    if normalization == "window_mean":
        target, rule = torch.ones_like(sums), "1 (traj_normalization=window_mean)"
    else:
        if traj_mask is not None and traj_mask.shape != w.shape:
            raise ValueError(f"traj_mask shape {tuple(traj_mask.shape)} != traj_weights shape {tuple(w.shape)}")
        target = (used if traj_mask is None else traj_mask.bool()).sum(dim=1).to(w.dtype)
        rule = "its number of window positions (traj_normalization=sum)"
    if not bool(torch.allclose(sums, target, rtol=1e-5, atol=1e-4)):
        bad = int((sums - target).abs().argmax())
        raise ValueError(f"traj_weights row {bad} sums to {float(sums[bad]):.6f}, expected {float(target[bad]):g}: "
                         f"each window's weights must sum to {rule}; build them with the same normalisation "
                         "(windows.position_weights / build_guidance)")
    bad = used & ~torch.isfinite(traj_kl.detach())
    if bool(bad.any()):
        r, p = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"traj_kl is not finite at window {r}, logit position {p}: check the guidance forward")
    kl = torch.where(used, traj_kl.to(like.dtype), torch.zeros((), dtype=like.dtype, device=like.device))
    return (kl * w).sum() / n, n


def _candidate_metrics(ot_distances, divergent) -> dict[str, float]:
    if ot_distances is None and divergent is None:
        return {}
    out: dict[str, float] = {}
    if divergent is not None:
        div = torch.as_tensor(divergent).bool()
        n = div.numel()
        out["n_candidates"] = float(n)
        out["n_divergent"] = float(div.sum())
        out["low_divergence_share"] = float((~div).sum()) / n if n else 0.0
    if ot_distances is not None:
        d = torch.as_tensor(ot_distances).double()
        out["mean_ot_distance"] = float(d.mean()) if d.numel() else 0.0
    return out


def _constant(name: str, t: torch.Tensor) -> None:
    if t.requires_grad:
        raise ValueError(
            f"{name} requires grad: weights are constants of the step (computed from windows, not trained); "
            "pass them detached"
        )
