"""Supervised fine-tuning through the project's own Megatron training step (`train.step.train_step`).

Used to build the demo's models offline: the teacher is trained on the task, the student gets a short stage-1 warm
start (the paper runs an off-policy KD stage before on-policy distillation). The loss is next-token cross entropy on
the response tokens only (the prompt is context), over the real vocabulary (`step.cross_entropy_loss`).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from megatron_topd.train.step import cross_entropy_loss, make_lm_batches, train_step


@dataclass
class SftExamples:
    """Token rows [N, S] (prompt + response + EOS, right-padded) and where each row's response starts."""

    tokens: torch.Tensor
    response_start: torch.Tensor  # [N] index of the first response token
    lengths: torch.Tensor  # [N] real tokens per row
    untrained: torch.Tensor | None = None  # [N, S] bool: tokens that are context only, never a target

    @classmethod
    def from_pairs(cls, prompts: list[list[int]], responses: list[list[int]], pad_id: int,
                   untrained: list[list[int]] | None = None) -> "SftExamples":
        """`untrained[i]`: positions in response i that are seen as input but never trained as targets (e.g. a
        deliberately corrupted step the model must learn to continue from, not to produce)."""
        if len(prompts) != len(responses) or not prompts:
            raise ValueError(f"{len(prompts)} prompts and {len(responses)} responses: give one response per prompt")
        rows = [p + r for p, r in zip(prompts, responses)]
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
        for i, row in enumerate(rows):
            tokens[i, : len(row)] = torch.tensor(row)
        skip = None
        if untrained is not None:
            skip = torch.zeros(tokens.shape, dtype=torch.bool)
            for i, positions in enumerate(untrained):
                for t in positions:
                    skip[i, len(prompts[i]) + t] = True
        return cls(tokens, torch.tensor([len(p) for p in prompts]), torch.tensor([len(r) for r in rows]), skip)

    def batches(self, index: list[int], micro_batch_size: int, vocab_size: int) -> list[dict]:
        """Microbatches of rows `index`; the loss mask keeps the labels that are response tokens."""
        tokens = self.tokens[index]
        out = make_lm_batches(tokens, micro_batch_size, vocab_size)
        label_pos = torch.arange(1, tokens.shape[1]).unsqueeze(0)
        start, length = self.response_start[index].unsqueeze(1), self.lengths[index].unsqueeze(1)
        mask = (label_pos >= start) & (label_pos < length)
        if self.untrained is not None:
            mask &= ~self.untrained[index][:, 1:]
        mask = mask.float()
        row = 0
        for b in out:
            n = b["tokens"].shape[0]
            b["loss_mask"] = mask[row : row + n]
            row += n
        return out


def sft(model_chunks, optimizer, scheduler, examples: SftExamples, *, steps: int, batch_size: int,
        micro_batch_size: int, vocab_size: int, seed: int = 0, progress: str | None = None,
        callback=None) -> list[float]:
    """`steps` optimizer steps of response-only cross entropy over shuffled batches; returns the loss per step.

    `callback(step, loss)` runs after each step (e.g. a held-out check); a truthy return value stops early.
    """
    from tqdm import tqdm

    rng = random.Random(seed)
    order: list[int] = []
    losses = []
    bar = tqdm(range(steps), desc=progress, disable=progress is None, mininterval=2.0)
    for step in bar:
        if len(order) < batch_size:
            fresh = list(range(examples.tokens.shape[0]))
            rng.shuffle(fresh)
            order += fresh
        index, order = order[:batch_size], order[batch_size:]
        result = train_step(model_chunks, optimizer, scheduler, examples.batches(index, micro_batch_size, vocab_size),
                            cross_entropy_loss)
        losses.append(result.loss)
        bar.set_postfix(loss=f"{result.loss:.3f}", refresh=False)
        if callback is not None and callback(step + 1, result.loss):
            break
    return losses
