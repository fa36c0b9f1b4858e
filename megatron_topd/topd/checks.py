"""Input checks shared by the TOPD functions: fail early with the argument's name and the fix."""
from __future__ import annotations

import torch


def token_inputs(token_loss: torch.Tensor, response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check a token-aligned ``[batch, seq]`` loss and its response mask; return the mask as bool.

    The loss must be finite at response positions (a NaN there would silently poison the step); prompt and padding
    positions may hold anything. Position 0 cannot be a response token: nothing predicts it (see `positions`).
    """
    if not isinstance(token_loss, torch.Tensor) or not isinstance(response_mask, torch.Tensor):
        raise TypeError("token_loss and response_mask must be torch tensors")
    if token_loss.dim() != 2:
        raise ValueError(f"token_loss must be [batch, seq], got shape {tuple(token_loss.shape)}")
    if response_mask.shape != token_loss.shape:
        raise ValueError(
            f"response_mask shape {tuple(response_mask.shape)} != token_loss shape {tuple(token_loss.shape)}: "
            "both must be token-aligned [batch, seq]"
        )
    if not token_loss.is_floating_point():
        raise ValueError(f"token_loss must be a floating tensor, got {token_loss.dtype}")
    mask = response_mask.bool() if response_mask.dtype != torch.bool else response_mask
    if response_mask.dtype != torch.bool and not torch.equal(mask.to(response_mask.dtype), response_mask):
        raise ValueError("response_mask must hold only 0/1 (or be a bool tensor)")
    if mask.shape[1] and bool(mask[:, 0].any()):
        raise ValueError(
            "response_mask marks position 0 as a response token, but nothing predicts position 0; "
            "per-token tensors are token-aligned (see megatron_topd.topd.positions): shift logit-aligned ones with "
            "positions.logits_to_tokens"
        )
    bad = mask & ~torch.isfinite(token_loss.detach())
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"token_loss is not finite at response position (batch {b}, token {t}) "
            f"(value {float(token_loss[b, t])}); {int(bad.sum())} such positions - check the KL inputs"
        )
    return token_loss, mask
