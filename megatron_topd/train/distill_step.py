"""The training pass of one TOPD step: teacher and student over groups of G microbatches, one optimizer step.

For each group the teacher runs forward-only, then the student runs forward-backward over the same microbatches
consuming the teacher's shards; gradients accumulate locally across groups and are reduced over data-parallel ranks
once, after the last group (docs/training_step.md says why this design and not teacher activations threaded through
the student's pipeline). Peak extra memory on the last stage: G microbatches of teacher logits + one of student logits
+ one loss chunk, independent of how many rollouts the step holds.
"""
from __future__ import annotations

from megatron_topd.train.objective import ObjectiveScales, make_loss_fn, total_loss
from megatron_topd.train.step import StepResult, guarded_optimizer_step, reduce_metrics, run_schedule
from megatron_topd.train.teacher import TeacherSignal, groups_of


def distill_step(student_chunks, optimizer, scheduler, teacher: TeacherSignal, batches: list[dict],
                 scales: ObjectiveScales, *, group_size: int, vocab_size: int, chunk_size,
                 on_nonfinite: str = "stop") -> StepResult:
    """Forward-backward over this replica's microbatches (rollout and guidance), then one guarded optimizer step.

    ``metrics`` holds the objective's sums over the whole data-parallel batch (objective.METRIC_NAMES) plus
    ``opd_loss`` and ``traj_loss``; ``loss`` is L as defined in objective.py.
    """
    for chunk in student_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    per_microbatch: list[dict] = []
    parts = groups_of(batches, group_size)
    for i, part in enumerate(parts):
        loss_fn = make_loss_fn(teacher.for_microbatches(part), scales, num_in_call=len(part), vocab_size=vocab_size,
                               chunk_size=chunk_size)
        per_microbatch += run_schedule(student_chunks, part, loss_fn, forward_only=False,
                                       finalize=i == len(parts) - 1)
        del loss_fn  # the group's teacher shards go with it
    stepped, grad_norm = guarded_optimizer_step(student_chunks, optimizer, scheduler, per_microbatch,
                                                on_nonfinite=on_nonfinite)
    sums = reduce_metrics(per_microbatch, mean=False)
    sums.pop("loss", None)  # the schedule's scaled per-microbatch losses; L is rebuilt from the sums below
    loss, opd, traj = total_loss(sums, scales)
    return StepResult(loss=loss, grad_norm=grad_norm, lr=optimizer.param_groups[0]["lr"], skipped=not stepped,
                      metrics={**sums, "opd_loss": opd, "traj_loss": traj})
