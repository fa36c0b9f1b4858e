"""The training pass's loss function: TOPD's objective split over microbatches (DESIGN section 2, step 8).

    L = sum_t w_t l_t / N_tokens + lambda * (1 / N_windows) * sum_n sum_p u_{n,p} KL(pi_T || pi_S)_{n,p}

with N_tokens and N_windows counted over the whole data-parallel batch. A schedule call over ``num_in_call``
microbatches divides each returned loss by ``num_in_call``, and DDP averages gradients over DP ranks, so each
microbatch's sum is scaled by (num_in_call * dp_size / N): the sum over all calls, microbatches and ranks is exactly L.

Rollout microbatches: one fused vocabulary-parallel pass gives l_t, log pi_S(y_t), log pi_T(y_t) and the student's
entropy; memory is one ``[chunk, V/TP]`` chunk beyond the logits. Guidance microbatches: the forward KL runs only at
the K weighted positions per row (``loss_index``): ``[rows x K, V/TP]`` instead of ``[rows, prefix + K, V/TP]``.
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


def make_loss_fn(teachers: list[torch.Tensor] | None, scales: ObjectiveScales, *, num_in_call: int, vocab_size: int,
                 chunk_size):
    """A loss function for one schedule call: consumes the teacher's per-microbatch signal in order."""
    from megatron_topd import parallel
    from megatron_topd.losses import vocab_parallel_kl, vocab_parallel_opd_scores

    group = parallel.tensor_parallel_group()
    it = iter(teachers or [])
    per_rank = num_in_call * scales.dp_size

    def loss_fn(logits: torch.Tensor, batch: dict):
        t_logits = next(it)
        zero = logits.new_zeros((), dtype=torch.float32)
        metrics = {name: zero for name in METRIC_NAMES}
        if batch["kind"] == "rollout":
            s = vocab_parallel_opd_scores(logits[:, :-1], t_logits[:, :-1], batch["tokens"][:, 1:], group=group,
                                          vocab_size=vocab_size, chunk_size=chunk_size, check_finite=False)
            mask = batch["response_mask"][:, 1:]
            kl = s.reverse_kl
            weights = torch.ones_like(kl) if scales.variant == "opd" else batch["token_weights"][:, 1:]
            weighted = torch.where(mask, kl * weights, torch.zeros_like(kl)).sum()
            loss = weighted * (per_rank / max(scales.global_tokens, 1))
            rollout_lp = batch["rollout_logprobs"][:, 1:]
            has_lp = mask & torch.isfinite(rollout_lp)
            diff = torch.where(has_lp, (s.student_log_probs.detach() - rollout_lp).abs(), torch.zeros_like(kl))
            metrics.update(
                opd_sum=weighted.detach(),
                kl_sum=torch.where(mask, kl, torch.zeros_like(kl)).sum().detach(),
                entropy_sum=torch.where(mask, s.student_entropy, torch.zeros_like(kl)).sum().detach(),
                tokens=mask.sum().float(),
                logprob_diff_sum=diff.sum(),
                logprob_diff_count=has_lp.sum().float(),
                logprob_diff_max=diff.max() if diff.numel() else zero,
            )
            return loss, metrics
        # guidance rows: forward KL along the teacher's continuation, at the weighted positions only
        flat = logits.reshape(-1, logits.shape[-1]).index_select(0, batch["loss_index"])
        kl = vocab_parallel_kl(flat, t_logits, direction="forward", group=group, vocab_size=vocab_size,
                               chunk_size=chunk_size, check_finite=False)
        weighted = (kl * batch["loss_weights"]).sum()
        metrics.update(traj_sum=weighted.detach(), windows=batch["loss_weights"].sum().detach())
        return scales.lambda_traj * weighted * (per_rank / max(scales.global_windows, 1)), metrics

    return loss_fn


def total_loss(sums: dict[str, float], scales: ObjectiveScales) -> tuple[float, float, float]:
    """(L, L_OPD, L_traj) from the step's summed metrics."""
    opd = sums["opd_sum"] / max(scales.global_tokens, 1)
    traj = sums["traj_sum"] / max(scales.global_windows, 1)
    return opd + scales.lambda_traj * traj, opd, traj
