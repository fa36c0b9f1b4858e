"""The scoring pass: per-token scalars of every rollout, with no gradient, before the probe picks candidates.

Only per-token scalars survive it: l_t (the `teacher.kl` estimator's, train/estimators.py), log pi_S(y_t), log pi_T(y_t) and the student's
entropy, each [rows, S] float32 (at topd_70b: 128 rows x 16k x 4 B = 8 MB per tensor per replica). The teacher's logit
shards of a group of G microbatches are consumed by the student's forward over the same group and dropped.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from megatron_topd.train.step import run_schedule
from megatron_topd.train.teacher import TeacherSignal, groups_of



@dataclass
class RolloutScores:
    """Token-aligned [rows, width] float32 scalars of a replica's rollouts (0 at prompt and padding positions)."""

    token_loss: torch.Tensor  # l_t: the per-token KL estimate the probe ranks candidates by
    student_logprobs: torch.Tensor
    teacher_logprobs: torch.Tensor
    entropy: torch.Tensor  # the student's


SCORES = tuple(f.name for f in fields(RolloutScores))


def score_rollouts(student_chunks, teacher: TeacherSignal, batches: list[dict], *, rows: int, width: int,
                   group_size: int, vocab_size: int, chunk_size) -> RolloutScores | None:
    """The rollouts' `RolloutScores` on the last stage; None on other stages. Row order follows each microbatch's
    ``row_index``."""
    from megatron_topd import parallel
    from megatron_topd.train.estimators import rollout_terms

    group = parallel.tensor_parallel_group()
    out = {name: torch.zeros(rows, width, dtype=torch.float32) for name in SCORES}
    seen = False

    for chunk in student_chunks:
        chunk.eval()
    try:
        for part in groups_of(batches, group_size):
            it = iter(teacher.for_microbatches(part) or [])

            def score(logits, batch):
                nonlocal seen
                seen = True
                t = rollout_terms(logits, batch, next(it), group=group, vocab_size=vocab_size, chunk_size=chunk_size)
                mask = batch["response_mask"][:, 1:]
                idx = batch["row_index"].cpu()
                for name, value in zip(SCORES, (t.token_loss, t.student_logprobs, t.teacher_logprobs, t.entropy)):
                    v = torch.where(mask, value.detach().float(), torch.zeros_like(value)).cpu()
                    n = min(v.shape[1], width - 1)
                    out[name][idx, 1 : 1 + n] = v[:, :n]
                return logits.new_zeros(()), {}

            with torch.no_grad():
                run_schedule(student_chunks, part, score, forward_only=True)
    finally:
        for chunk in student_chunks:
            chunk.train()
    return RolloutScores(**out) if seen else None
