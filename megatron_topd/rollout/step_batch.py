"""What the rollout phase hands the rest of a step: `StepBatch`, defined here, below both the rollout sources
(rollout/async_rollouts.py) that fill it and the training loop (train/loop.py) that reads it.

The batch is flat tensors, not lists of Python numbers, and travels from rank 0 to every rank as tensors
(`broadcast`), with only a small header pickled (finish reasons, versions, the dataset's position). Per rank at
examples/topd_70b.yaml (256 rows of up to 16k tokens, ~4.2M ids, ~4.1M response log-probs): 17 MB of int32 ids and
16 MB of float32 log-probs, instead of a ~55 MB pickle unpickled into ~290 MB of Python ints and floats on every rank.
Only a replica's own rows become Python lists (`replica_rows`, 1/DP of them).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist

TENSORS = ("tokens", "prompt_lengths", "response_lengths", "response_logprobs")


@dataclass
class StepBatch:
    """One step's rollouts, the same on every rank except `teacher`: a remote teacher's per-row top-k stays on rank 0
    (`has_teacher_scores` says it exists) until the loop's `replica_rows` sends each replica's rows to its last stage.

    Row i is ``tokens[offsets[i] : offsets[i] + prompt_lengths[i] + response_lengths[i]]`` (prompt, then response);
    its response log-probs are ``response_logprobs[response_offsets[i] : ... + response_lengths[i]]``."""

    tokens: torch.Tensor  # int32 [sum of row lengths]
    prompt_lengths: torch.Tensor  # int64 [rows]
    response_lengths: torch.Tensor  # int64 [rows]
    response_logprobs: torch.Tensor  # float32 [sum of response lengths]: the rollout policy's log-probs
    finish_reasons: list[str]
    weight_versions: list[str]
    dataset_state: dict  # the prompt dataset's position right after this step's draw (the checkpoint's resume point)
    teacher: list[dict] | None = None  # a remote teacher's scores per row (RemoteTeacher.score_rollouts); rank 0
    staleness: float = 0.0  # trainer step - oldest weight version of the samples (async rollouts: 1)
    has_teacher_scores: bool = False  # `teacher` exists (on rank 0)
    servers: list[str] | None = None  # the student server that generated each sample (its radix cache holds the row)

    @classmethod
    def from_rows(cls, prompt_ids: list[list[int]], response_ids: list[list[int]],
                  response_logprobs: list[list[float]], finish_reasons: list[str], weight_versions: list[str],
                  dataset_state: dict, **rest) -> "StepBatch":
        if not len(prompt_ids) == len(response_ids) == len(response_logprobs) == len(finish_reasons):
            raise ValueError(f"{len(prompt_ids)} prompts, {len(response_ids)} responses, {len(response_logprobs)} "
                             f"log-prob rows and {len(finish_reasons)} finish reasons: one of each per rollout")
        for i, (r, lp) in enumerate(zip(response_ids, response_logprobs)):
            if len(r) != len(lp):
                raise ValueError(f"rollout {i}: {len(r)} response tokens but {len(lp)} log-probs")
        flat = [t for p, r in zip(prompt_ids, response_ids) for t in (*p, *r)]
        return cls(torch.tensor(flat, dtype=torch.int32),
                   torch.tensor([len(p) for p in prompt_ids], dtype=torch.int64),
                   torch.tensor([len(r) for r in response_ids], dtype=torch.int64),
                   torch.tensor([x for lp in response_logprobs for x in lp], dtype=torch.float32),
                   list(finish_reasons), list(weight_versions), dataset_state, **rest)

    def __len__(self) -> int:
        return int(self.prompt_lengths.numel())

    def row_lengths(self) -> list[int]:
        return (self.prompt_lengths + self.response_lengths).tolist()

    def _offsets(self, lengths: torch.Tensor) -> list[int]:
        return [0] + torch.cumsum(lengths, 0).tolist()[:-1]

    def rows(self, idx: list[int]) -> tuple[list[list[int]], list[list[int]], list[list[float]]]:
        """Rows ``idx`` as Python lists: (prompts, responses, response log-probs)."""
        starts, lp_starts = self._offsets(self.prompt_lengths + self.response_lengths), self._offsets(
            self.response_lengths)
        prompts, responses, logprobs = [], [], []
        for i in idx:
            p, r, s = int(self.prompt_lengths[i]), int(self.response_lengths[i]), starts[i]
            prompts.append(self.tokens[s : s + p].tolist())
            responses.append(self.tokens[s + p : s + p + r].tolist())
            logprobs.append(self.response_logprobs[lp_starts[i] : lp_starts[i] + r].tolist())
        return prompts, responses, logprobs

    @property
    def nbytes(self) -> int:
        """Bytes of the batch's tensors (what every rank receives)."""
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in TENSORS)


def broadcast_step_batch(batch: StepBatch | None, src: int = 0) -> StepBatch:
    """``batch`` (given on ``src``, None elsewhere) on every rank: a small pickled header, then the four tensors.
    `teacher` stays on ``src`` (train/dealing.py sends a remote teacher's scores to the last stages only). A
    collective."""
    from megatron_topd.parallel import broadcast_object, device

    header = None
    if batch is not None:
        header = {f.name: getattr(batch, f.name) for f in fields(StepBatch)
                  if f.name not in TENSORS and f.name != "teacher"}
        header["shapes"] = {name: (getattr(batch, name).numel(), getattr(batch, name).dtype) for name in TENSORS}
        header["has_teacher_scores"] = batch.has_teacher_scores or batch.teacher is not None
    header = broadcast_object(header, src=src)
    shapes = header.pop("shapes")
    out = {}
    for name in TENSORS:
        numel, dtype = shapes[name]
        t = getattr(batch, name).contiguous().to(device()) if batch is not None else torch.empty(
            numel, dtype=dtype, device=device())
        dist.broadcast(t, src=src)
        out[name] = t.cpu()
    shared = StepBatch(**out, **header)
    return replace(shared, teacher=batch.teacher) if batch is not None else shared
