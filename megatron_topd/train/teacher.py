"""Where the teacher's per-token signal comes from, behind one small interface the training step calls per group.

`ColocatedTeacher` is the frozen Megatron teacher in the trainer, at the student's TP/PP layout, so its logits shard
like the student's and the KL is exact over the full vocabulary. It runs forward-only over a *group* of G microbatches
(`train.teacher_group_microbatches`) right before the student consumes them (design (b) of docs/training_step.md), so
its logit shards live for at most G microbatches whatever the step's batch size.

Sizes on a last-stage rank at examples/topd_70b.yaml (V/TP = 152k/8 = 19k, bf16 logits, budget 16k tokens/microbatch):
one rollout microbatch's shard is [rows, S_mb, V/TP] with rows x S_mb <= 16k, i.e. <= 16k x 19k x 2 B = 0.6 GB; the
group holds G of them (G=2: 1.2 GB). A guidance microbatch keeps only its weighted positions: [rows x K, V/TP].
"""
from __future__ import annotations

from typing import Protocol

import torch

from megatron_topd.train.step import run_schedule


class TeacherSignal(Protocol):
    def for_microbatches(self, batches: list[dict]) -> list[torch.Tensor] | None:
        """Per microbatch, what the loss needs from the teacher (last pipeline stage), in order; None elsewhere."""


class ColocatedTeacher:
    """A frozen Megatron teacher (list of model chunks) sharing the student's layout."""

    def __init__(self, model_chunks):
        self.chunks = model_chunks
        for chunk in model_chunks:
            chunk.requires_grad_(False)
            chunk.eval()

    def for_microbatches(self, batches: list[dict]) -> list[torch.Tensor] | None:
        """Logit shards: rollout microbatches [rows, S_mb, V/TP]; guidance ones [weighted positions, V/TP]."""
        stash: list[torch.Tensor] = []

        def keep(logits, batch):
            if batch["kind"] == "guidance":
                stash.append(logits.detach().reshape(-1, logits.shape[-1]).index_select(0, batch["loss_index"]))
            else:
                stash.append(logits.detach())
            return logits.new_zeros(()), {}

        with torch.no_grad():
            run_schedule(self.chunks, batches, keep, forward_only=True)
        return stash or None


def groups_of(batches: list[dict], size: int) -> list[list[dict]]:
    return [batches[i : i + size] for i in range(0, len(batches), size)]
