"""Logit parity between an HF model and a converted Megatron model on the same tokens (for `--verify` and tests).

Megatron logits are computed through Megatron's own pipeline schedule (forward only), so the check covers every
layout: on the last stage the TP shards of the vocabulary-parallel logits are all-gathered and the padded vocabulary
columns dropped. This gathers full-vocabulary logits and is for verification only, never for training.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist


def random_tokens(vocab_size: int, batch: int = 2, seq: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def hf_logits(hf_dir: str | Path, tokens: torch.Tensor, *, round_to: torch.dtype | None = None) -> torch.Tensor:
    """fp32 logits [b, s, V] of the HF model in `hf_dir`; `round_to` first rounds its weights (e.g. to bf16) so it
    holds exactly the values a Megatron checkpoint of that dtype holds."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    if round_to is not None:
        for p in model.parameters():
            p.copy_(p.to(round_to).float())
    return model(input_ids=tokens).logits.float()


@torch.no_grad()
def megatron_logits(model, tokens: torch.Tensor, vocab_size: int) -> torch.Tensor | None:
    """Full-vocabulary logits [b, s, vocab_size] on last-stage ranks, None on other stages. Collective over the job."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    chunks = model if isinstance(model, list) else [model]
    captured: list[torch.Tensor] = []
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)

    def forward_step(data_iterator, chunk):
        batch = next(data_iterator)
        output = chunk(input_ids=batch, position_ids=positions, attention_mask=None)

        def loss_func(logits):
            captured.append(logits.detach().float())
            return logits.new_zeros(()), {}

        return output, loss_func

    for c in chunks:
        c.eval()
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter([tokens]),
        model=chunks,
        num_microbatches=1,
        seq_length=tokens.shape[1],
        micro_batch_size=tokens.shape[0],
        forward_only=True,
    )
    if not ps.is_pipeline_last_stage():
        return None
    shard = captured[0].contiguous()
    group = ps.get_tensor_model_parallel_group()
    parts = [torch.empty_like(shard) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, shard, group=group)
    return torch.cat(parts, dim=-1)[..., :vocab_size]
