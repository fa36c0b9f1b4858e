"""The token-position convention of `megatron_topd.topd`, in one place.

Per-token tensors handed to this package (`token_loss`, `response_mask`, `token_weights`) are **token-aligned**:
index ``t`` concerns the token ``tokens[b, t]`` itself, so ``token_loss[b, t]`` is the KL of the distributions that
predict ``tokens[b, t]`` from the context ``tokens[b, :t]`` (the logits at position ``t - 1``). A candidate is such a
``t``; its near-future window continues the prefix ``tokens[b, :t]`` (ids up to ``t - 1``), i.e. from the very state
where the high loss was measured.

Logits are **logit-aligned** (Megatron's labels convention): the logits at position ``p`` predict token ``p + 1``.
The guidance batch (`windows.GuidanceBatch`) is consumed by a forward pass, so its masks and weights are
logit-aligned. `logits_to_tokens` converts a per-logit statistic (e.g. the output of
`losses.vocab_parallel_kl`) to the token-aligned form.
"""
from __future__ import annotations

import torch


def logits_to_tokens(per_logit: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Shift a logit-aligned ``[B, T]`` statistic right by one: ``out[:, t] = per_logit[:, t - 1]``,
    ``out[:, 0] = fill``.

    Position 0 is never a response token (nothing predicts it), so ``fill`` is never read by the loss.
    """
    if per_logit.dim() != 2:
        raise ValueError(f"per_logit must be [batch, seq], got shape {tuple(per_logit.shape)}")
    first = torch.full_like(per_logit[:, :1], fill)
    return torch.cat([first, per_logit[:, :-1]], dim=1)
