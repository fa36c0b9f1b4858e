"""What the rollout phase hands the rest of a step: `StepBatch`, defined here, below both the rollout sources
(rollout/async_rollouts.py) that fill it and the training loop (train/loop.py) that reads it."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class StepBatch:
    """One step's rollouts, identical on every rank (token ids and per-token log-probs: no V dimension), except
    `teacher`: a remote teacher's per-row top-k stays on rank 0 (`has_teacher_scores` says it exists) until
    the loop's `replica_rows` sends each replica's rows to its last stage.

    Size at examples/topd_70b.yaml (256 rows, responses <= 16k tokens): ids and log-probs of at most 256 x 16k tokens,
    as Python lists on every rank (issue 25 turns them into flat tensors)."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response_logprobs: list[list[float]]
    finish_reasons: list[str]
    weight_versions: list[str]
    dataset_state: dict  # the prompt dataset's position right after this step's draw (the checkpoint's resume point)
    teacher: list[dict] | None = None  # a remote teacher's scores per row (RemoteTeacher.score_rollouts); rank 0
    staleness: float = 0.0  # trainer step - oldest weight version of the samples (async rollouts: 1)
    has_teacher_scores: bool = False  # `teacher` exists (on rank 0)
    servers: list[str] | None = None  # the student server that generated each sample (its radix cache holds the row)
