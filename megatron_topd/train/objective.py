"""The training pass's loss function: TOPD's objective split over microbatches (DESIGN section 2, step 8).

    L = sum_t w_t l_t / N_tokens + lambda * (1 / N_windows) * sum_n sum_p u_{n,p} KL(pi_T || pi_S)_{n,p}

with N_tokens and N_windows (guidance rows) counted over the whole data-parallel batch. ``u`` are the guidance rows'
``loss_weights`` and carry `topd.traj_normalization` (built by `topd.windows.position_weights`): each row sums to 1
under ``window_mean`` (a weighted mean over the window) or to its window length K under ``sum`` (uniform: 1 per
position, a sum over the window); either way the term is divided by N_windows (`guidance_sum`). A schedule call over ``num_in_call``
microbatches divides each returned loss by ``num_in_call``, and DDP averages gradients over DP ranks, so each
microbatch's sum is scaled by (num_in_call * dp_size / N): the sum over all calls, microbatches and ranks is exactly L.

Rollout microbatches: the per-token term of `teacher.kl`'s estimator (train/estimators.py; `full`: one fused
vocabulary-parallel pass gives l_t, log pi_S(y_t), log pi_T(y_t) and the student's entropy; memory is one
``[chunk, V/TP]`` chunk beyond the logits). Guidance microbatches: the forward KL runs only at
the K weighted positions per row (``loss_index``): ``[rows x K, V/TP]`` instead of ``[rows, prefix + K, V/TP]``.
Rollout microbatches that carry their rows' guidance windows (``train.guidance_layout=shared_prefix``) add both
terms: the OPD term on the response tokens, the guidance KL at ``loss_index`` (`guidance_signal`).
Metrics are sums (and ``_max`` maxima) so they combine exactly over microbatches, groups and replicas.
Non-finite logits are not raised here (that would strand the other pipeline stages): they make a non-finite loss,
which the step's guard turns into one decision on every rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

METRIC_NAMES = ("opd_sum", "kl_sum", "entropy_sum", "tokens", "traj_sum", "windows", "logprob_diff_sum",
                "logprob_diff_count", "logprob_diff_max")


@dataclass
class ObjectiveScales:
    dp_size: int
    global_tokens: int  # response tokens over all DP ranks
    global_windows: int  # guidance rows over all DP ranks
    lambda_traj: float
    variant: str
    rollout_is_cap: float | None = None  # truncated importance sampling of the OPD term (None: off)


def make_loss_fn(teachers: list[torch.Tensor] | None, scales: ObjectiveScales, *, num_in_call: int, vocab_size: int,
                 chunk_size):
    """A loss function for one schedule call: consumes the teacher's per-microbatch signal in order."""
    from megatron_topd import parallel
    from megatron_topd.train.estimators import guidance_kl, rollout_terms

    group = parallel.tensor_parallel_group()
    it = iter(teachers or [])
    per_rank = num_in_call * scales.dp_size

    def rollout_part(logits: torch.Tensor, batch: dict, signal, metrics: dict) -> torch.Tensor:
        s = rollout_terms(logits, batch, signal, group=group, vocab_size=vocab_size, chunk_size=chunk_size)
        mask = batch["response_mask"][:, 1:]
        kl = s.token_loss
        weights = torch.ones_like(kl) if scales.variant == "opd" else batch["token_weights"][:, 1:]
        if scales.rollout_is_cap is not None:  # train.rollout_is_correction (off-policy rollouts, async mode)
            weights = weights * tis_ratio(s.student_logprobs, batch["rollout_logprobs"][:, 1:], mask,
                                          scales.rollout_is_cap)
        weighted = torch.where(mask, s.loss * weights, torch.zeros_like(kl)).sum()
        rollout_lp = batch["rollout_logprobs"][:, 1:]
        has_lp = mask & torch.isfinite(rollout_lp)
        diff = torch.where(has_lp, (s.student_logprobs - rollout_lp).abs(), torch.zeros_like(kl))
        metrics.update(
            opd_sum=weighted.detach(),  # every estimator's loss term has the value of l_t
            kl_sum=torch.where(mask, kl, torch.zeros_like(kl)).sum(),
            entropy_sum=torch.where(mask, s.entropy, torch.zeros_like(kl)).sum(),
            tokens=mask.sum().float(),
            logprob_diff_sum=diff.sum(),
            logprob_diff_count=has_lp.sum().float(),
            logprob_diff_max=diff.max() if diff.numel() else metrics["logprob_diff_max"],
        )
        return weighted * (per_rank / max(scales.global_tokens, 1))

    def guidance_part(logits: torch.Tensor, batch: dict, signal, metrics: dict) -> torch.Tensor:
        """Forward KL along the teacher's continuations, at the weighted positions only."""
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["loss_index"])
        kl = guidance_kl(flat, guidance_signal(signal, batch), group=group, vocab_size=vocab_size,
                         chunk_size=chunk_size)
        weighted = guidance_sum(kl, batch["loss_weights"])
        metrics.update(traj_sum=weighted.detach(), windows=batch["num_windows"].float())  # windows, not weight sums
        return scales.lambda_traj * weighted * (per_rank / max(scales.global_windows, 1))

    def loss_fn(logits: torch.Tensor, batch: dict):
        signal = next(it)
        zero = logits.new_zeros((), dtype=torch.float32)
        metrics = {name: zero for name in METRIC_NAMES}
        loss = zero
        if batch["kind"] == "rollout":
            loss = loss + rollout_part(logits, batch, signal, metrics)
        if "loss_index" in batch:  # guidance rows, or rollout rows carrying their windows (shared prefix)
            loss = loss + guidance_part(logits, batch, signal, metrics)
        return loss, metrics

    return loss_fn


def guidance_signal(signal, batch: dict):
    """The teacher's signal at a microbatch's guidance positions (``loss_index`` order).

    Guidance rows already get it there. Rollout rows carrying windows (shared prefix) get the co-located teacher's
    full-row logit shard, indexed like the student's, or a remote teacher's window scores from the batch."""
    if batch["kind"] == "guidance":
        return signal
    if torch.is_tensor(signal):
        return signal.reshape(-1, signal.shape[-1]).index_select(0, batch["loss_index"])
    return {"topk_ids": batch["guidance_topk_ids"], "topk_logprobs": batch["guidance_topk_logprobs"]}


def guidance_sum(kl: torch.Tensor, loss_weights: torch.Tensor) -> torch.Tensor:
    """sum_n sum_p u_{n,p} KL_{n,p} over a guidance microbatch's weighted positions (flat ``[positions]``); the
    weights already carry the normalisation (1 per window or 1 per position), so both modes share this sum."""
    return (kl * loss_weights).sum()


def total_loss(sums: dict[str, float], scales: ObjectiveScales) -> tuple[float, float, float]:
    """(L, L_OPD, L_traj) from the step's summed metrics."""
    opd = sums["opd_sum"] / max(scales.global_tokens, 1)
    traj = sums["traj_sum"] / max(scales.global_windows, 1)
    return opd + scales.lambda_traj * traj, opd, traj


def tis_ratio(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
              cap: float) -> torch.Tensor:
    """Truncated importance weight per token, min(exp(log pi_trainer - log pi_rollout), cap), as a constant (no
    gradient); 1 where the token has no rollout log-prob (or is not a response token)."""
    with torch.no_grad():
        has_lp = mask & torch.isfinite(rollout_logprobs)
        ratio = torch.exp(trainer_logprobs.detach().float() - rollout_logprobs.float()).clamp_(max=cap)
        return torch.where(has_lp, ratio, torch.ones_like(ratio))
