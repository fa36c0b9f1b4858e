"""Forward-only passes through Megatron's schedule: the frozen teacher's logit shards, the student's per-token scores.

Both run on the same microbatches as the training pass, so teacher logits line up with student logits microbatch by
microbatch on the last pipeline stage. Logits stay vocabulary-parallel ([mb, S, V/TP]); nothing is gathered.
"""
from __future__ import annotations

import torch

from megatron_topd.train.step import _run_schedule


def teacher_logits(teacher_chunks, batches: list[dict]) -> list[torch.Tensor] | None:
    """This rank's teacher logit shard per microbatch (last stage), or None on other stages."""
    stash: list[torch.Tensor] = []

    def keep(logits, batch):
        stash.append(logits.detach())
        return logits.new_zeros(()), {}

    with torch.no_grad():
        _run_schedule(teacher_chunks, batches, keep, forward_only=True)
    return stash or None


def student_token_loss(student_chunks, batches: list[dict], teachers: list[torch.Tensor] | None, *, vocab_size, chunk_size):
    """Per-token reverse KL l_t, token-aligned ([mb, S], 0 at position 0 and padding), per microbatch (last stage)."""
    from megatron_topd import parallel
    from megatron_topd.losses import vocab_parallel_kl

    group = parallel.tensor_parallel_group()
    stash: list[torch.Tensor] = []
    it = iter(teachers or [])

    def score(logits, batch):
        t_logits = next(it)
        kl = vocab_parallel_kl(logits[:, :-1], t_logits[:, :-1], group=group, vocab_size=vocab_size, chunk_size=chunk_size)
        stash.append(torch.nn.functional.pad(kl.detach(), (1, 0)))
        return logits.new_zeros(()), {}

    for chunk in student_chunks:
        chunk.eval()
    try:
        with torch.no_grad():
            _run_schedule(student_chunks, batches, score, forward_only=True)
    finally:
        for chunk in student_chunks:
            chunk.train()
    return stash or None
