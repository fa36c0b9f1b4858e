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

import math
from typing import Protocol

import torch

from megatron_topd.train.step import run_schedule


class TeacherSignal(Protocol):
    def for_microbatches(self, batches: list[dict]) -> list | None:
        """Per microbatch, what the loss needs from the teacher (last pipeline stage), in order; None elsewhere."""

    rollout_scorer: "RemoteTeacher | None"  # scores samples as the rollout source receives them (remote), or None

    def score_guidance(self, tokens: torch.Tensor, lengths: torch.Tensor, window_start: torch.Tensor) -> list[dict] | None:
        """The same for guidance rows (their window positions)."""


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

    rollout_scorer = None  # the logits come from the forward pass, inside the schedule

    def score_guidance(self, tokens, lengths, window_start) -> None:
        return None


def groups_of(batches: list[dict], size: int) -> list[list[dict]]:
    return [batches[i : i + size] for i in range(0, len(batches), size)]


class RemoteTeacher:
    """A teacher served by SGLang (`teacher.urls`): the trainer holds no teacher model at all.

    Each rollout is scored by prefill (`max_new_tokens=0`): per response token the log-prob of the sampled token and,
    for ``kl="topk"``, the teacher's top-k (ids, log-probs). Guidance rows (prefix + teacher window) are scored the
    same way at their window positions (a prefix-cache hit on the server that just generated the window).
    Sizes at topd_70b with k = 64: per replica [128 rows, 16k, 64] ids (int32) + log-probs (float32) = 1.07 GB of
    host memory, on the replica's last-stage ranks only (train/dealing.py), placed into each microbatch as
    [rows_mb, S_mb, k] (docs/remote_teacher.md).
    """

    def __init__(self, client, *, kl: str, top_k: int):
        self.client, self.kl, self.top_k = client, kl, top_k

    @property
    def rollout_top_k(self) -> int:
        """Top-k per rollout token: k for ``topk``; 0 for ``sampled`` (the sampled token's log-prob only)."""
        return self.top_k if self.kl == "topk" else 0

    @property
    def rollout_scorer(self) -> "RemoteTeacher":
        """The rollout source scores each prompt's samples through `ascore_samples` as they finish."""
        return self

    def for_microbatches(self, batches: list[dict]) -> list[dict] | None:
        from megatron.core import parallel_state as ps

        if not ps.is_pipeline_last_stage(ignore_virtual=True):
            return None  # the scores were delivered to the last stage only
        out = []
        for b in batches:
            signal = {"kind": self.kl, "topk_ids": b.get("teacher_topk_ids"), "topk_logprobs": b.get("teacher_topk_logprobs")}
            if b["kind"] == "rollout":
                signal["token_logprobs"] = b["teacher_token_logprobs"]
            out.append(signal)
        return out

    def score_rows(self, prompts: list[list[int]], completions: list[list[int]], *, top_k: int) -> list[dict]:
        """Per row, the teacher's data for each completion token: ``token_logprobs [R]`` and, with ``top_k``,
        ``topk_ids`` / ``topk_logprobs [R, k]`` (the distribution predicting that token, unscaled)."""
        scores = self.client.score([p + c for p, c in zip(prompts, completions)], start=[len(p) for p in prompts],
                                   top_logprobs=top_k)
        return _score_rows(scores, top_k)

    async def ascore_samples(self, prompt: list[int], completions: list[list[int]]) -> list[dict]:
        """`score_rollouts` for one prompt's samples, awaited as soon as they are generated (the rollout source
        calls it per prompt, so scoring overlaps the generation of the other prompts)."""
        scores = await self.client.ascore([prompt + c for c in completions], start=len(prompt),
                                          top_logprobs=self.rollout_top_k)
        return _score_rows(scores, self.rollout_top_k)

    def with_own_client(self) -> "RemoteTeacher":
        """The same teacher on a fresh connection pool (for a background thread's event loop)."""
        return RemoteTeacher(self.client.with_own_pool(), kl=self.kl, top_k=self.top_k)

    def score_rollouts(self, prompts, responses) -> list[dict]:
        return self.score_rows(prompts, responses, top_k=self.rollout_top_k)

    def score_guidance(self, tokens: torch.Tensor, lengths: torch.Tensor, window_start: torch.Tensor) -> list[dict]:
        """Top-k at every window position of each guidance row (L_traj uses them under topk and sampled alike)."""
        prefixes = [tokens[i, : int(window_start[i])].tolist() for i in range(tokens.shape[0])]
        windows = [tokens[i, int(window_start[i]) : int(lengths[i])].tolist() for i in range(tokens.shape[0])]
        return self.score_rows(prefixes, windows, top_k=self.top_k)


def _score_rows(scores, top_k: int) -> list[dict]:
    """Client `Score`s -> per-row tensors (see `RemoteTeacher.score_rows`)."""
    rows = []
    for s in scores:
        row = {"token_logprobs": torch.tensor(s.token_logprobs, dtype=torch.float32)}
        if top_k:
            row["topk_ids"] = torch.tensor([[i for i, _ in pos] for pos in s.top_logprobs], dtype=torch.int32)
            row["topk_logprobs"] = torch.tensor([[lp for _, lp in pos] for pos in s.top_logprobs], dtype=torch.float32)
        rows.append(row)
    return rows


def teacher_fields(teacher_rows: list[dict], idx: list[int], starts: list[int], width: int, k: int) -> dict:
    """Logit-aligned [n, width(, k)] batch fields from per-row remote scores (position p predicts token p + 1).

    Positions without teacher data get distinct filler ids and log(1/(k+1)) (valid, masked out of every loss)."""
    n = len(idx)
    out = {"teacher_token_logprobs": torch.zeros(n, width)}
    if k:
        out["teacher_topk_ids"] = torch.arange(k, dtype=torch.int32).repeat(n, width, 1)  # ids < 2^31: int32
        out["teacher_topk_logprobs"] = torch.full((n, width, k), -math.log(k + 1))
    for j, (i, start) in enumerate(zip(idx, starts)):
        row = teacher_rows[i]
        r = len(row["token_logprobs"])
        out["teacher_token_logprobs"][j, start - 1 : start - 1 + r] = row["token_logprobs"]
        if k:
            out["teacher_topk_ids"][j, start - 1 : start - 1 + r] = row["topk_ids"]
            out["teacher_topk_logprobs"][j, start - 1 : start - 1 + r] = row["topk_logprobs"]
    return out
