"""The training pass's loss function: TOPD's objective split over microbatches.

Rollout microbatches carry the weighted OPD term, guidance microbatches the trajectory term (DESIGN section 2, step 8):
    L = sum_t w_t l_t / N_tokens + lambda * (1 / N_windows) * sum_n sum_p u_{n,p} KL(pi_T || pi_S)_{n,p}
with N_tokens and N_windows counted over the whole data-parallel batch. Megatron's schedule divides each microbatch's
loss by the number of microbatches and DDP averages gradients over DP ranks, so each microbatch's sum is scaled by
(num_microbatches * dp_size / N): the sum over all microbatches and ranks is then exactly L.
The metrics reported per microbatch are the unscaled parts, so their microbatch mean times the scale is the total.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ObjectiveScales:
    num_microbatches: int
    dp_size: int
    global_tokens: int  # response tokens over all DP ranks
    global_windows: int  # guidance rows over all DP ranks
    lambda_traj: float
    variant: str


def make_loss_fn(teachers: list[torch.Tensor] | None, scales: ObjectiveScales, *, vocab_size: int, chunk_size):
    """A loss function for `train_step`: consumes the teacher logit shards in microbatch order."""
    from megatron_topd import parallel
    from megatron_topd.losses import vocab_parallel_kl

    group = parallel.tensor_parallel_group()
    it = iter(teachers or [])
    per_rank = scales.num_microbatches * scales.dp_size

    def loss_fn(logits: torch.Tensor, batch: dict):
        t_logits = next(it)
        if batch["kind"] == "rollout":
            kl = vocab_parallel_kl(logits[:, :-1], t_logits[:, :-1], group=group, vocab_size=vocab_size,
                                   chunk_size=chunk_size)
            mask = batch["response_mask"][:, 1:]
            weights = torch.ones_like(kl) if scales.variant == "opd" else batch["token_weights"][:, 1:]
            weighted = torch.where(mask, kl * weights, torch.zeros_like(kl)).sum()
            loss = weighted * (per_rank / max(scales.global_tokens, 1))
            metrics = {
                "opd_loss": weighted.detach() * (per_rank / max(scales.global_tokens, 1)),
                "traj_loss": torch.zeros(()),
                "mean_token_kl": torch.where(mask, kl, torch.zeros_like(kl)).sum().detach()
                * (per_rank / max(scales.global_tokens, 1)),
            }
            return loss, metrics
        # guidance rows: forward KL along the teacher's continuation, weighted per position
        kl = vocab_parallel_kl(logits, t_logits, direction="forward", group=group, vocab_size=vocab_size,
                               chunk_size=chunk_size)
        weights = batch["logit_weights"]
        weighted = torch.where(weights > 0, kl * weights, torch.zeros_like(kl)).sum()
        scale = per_rank / max(scales.global_windows, 1)
        traj = weighted * scale
        metrics = {"opd_loss": torch.zeros(()), "traj_loss": traj.detach(), "mean_token_kl": torch.zeros(())}
        return scales.lambda_traj * traj, metrics

    return loss_fn
