"""What one phase of a step hands the next (train/loop.py), as dataclasses defined below every phase.

    StepBatch (rollout/step_batch.py) -> RolloutRows (this replica's share) -> token_loss [rows, S] (scoring)
    -> ProbeOutcome (weights, GuidanceRows, diagnostics) -> StepResult + PassStats (the training pass)

None of them has a vocabulary dimension: token ids, per-token scalars and per-window ids and weights only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RolloutRows:
    """This replica's rollouts, unpadded: ``prompt + response`` token lists and per-token side data."""

    prompts: list[list[int]]
    responses: list[list[int]]
    logprobs: list[list[float]] = field(default_factory=list)  # the rollout policy's log-probs of the responses
    teacher: list[dict] | None = None  # a remote teacher's per-response-token scores (train/teacher.RemoteTeacher)
    servers: list[str] | None = None  # the student server that generated each row (the probe routes its windows there)

    def __post_init__(self):
        if any(len(r) == 0 for r in self.responses):
            raise ValueError("empty response in the rollout batch: every response must hold at least one token")
        if self.logprobs and len(self.logprobs) != len(self.responses):
            raise ValueError(f"{len(self.logprobs)} logprob lists for {len(self.responses)} responses")

    def __len__(self) -> int:
        return len(self.prompts)

    def lengths(self) -> list[int]:
        return [len(p) + len(r) for p, r in zip(self.prompts, self.responses)]

    def padded(self, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens and token-aligned response mask, [rows, longest] (token ids and bools: no V dimension)."""
        return self.tokens_and_mask(range(len(self)), max(self.lengths()), pad_id)

    def tokens_and_mask(self, idx, width: int, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``idx`` right-padded to ``width``: token ids and the token-aligned response mask, [len(idx), width]."""
        idx = list(idx)
        tokens = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.bool)
        for j, i in enumerate(idx):
            p, r = self.prompts[i], self.responses[i]
            tokens[j, : len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
            mask[j, len(p) : len(p) + len(r)] = True
        return tokens, mask


@dataclass
class GuidanceRows:
    """The probe's guidance rows for L_traj, one per divergent candidate (prefix x<t + the teacher's window).

    Sizes at examples/topd_70b.yaml (128 rows per replica, 3 candidates each, S <= 16k, K = 50): at most 384 rows of
    [S] token ids and [S] logit-aligned weights (K non-zero each); no V dimension."""

    tokens: torch.Tensor  # [N, L] int64, right-padded
    lengths: torch.Tensor  # [N] real tokens per row (prefix + window)
    window_start: torch.Tensor  # [N] t: the window's first token index (the prefix is the rollout row's first t)
    row: torch.Tensor  # [N] the rollout row (in this replica's RolloutRows) whose prefix the window continues
    logit_weights: torch.Tensor  # [N, L] float32, logit-aligned (position p predicts token p + 1), rows sum to 1
    teacher: list[dict] | None = None  # a remote teacher's top-k at each window position (RemoteTeacher.score_guidance)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, keep: list[int]) -> "GuidanceRows":
        """The rows ``keep``, in that order."""
        idx = torch.tensor(keep, dtype=torch.long)
        return GuidanceRows(self.tokens[idx], self.lengths[idx], self.window_start[idx], self.row[idx],
                            self.logit_weights[idx], None if self.teacher is None else [self.teacher[w] for w in keep])


@dataclass
class ProbeOutcome:
    """What the probe hands the training pass and the metrics, the same on every rank of a replica's pipeline.

    ``token_weights`` is [rows, S] float32 (the replica's rows, token-aligned): 128 x 16k x 4 B = 8 MB at 70B."""

    token_weights: torch.Tensor
    guidance: GuidanceRows | None = None  # variant "topd" with divergent candidates only
    n_candidates: int = 0
    n_divergent: int = 0
    ot_sum: float = 0.0  # sum of the candidates' OT distances (this replica)
    ot_stats: dict[str, float] = field(default_factory=dict)  # quantiles and group means over the whole batch
    timings: dict[str, float] = field(default_factory=dict)  # window_s (generation), ot_s (divergence)
    # per candidate: (row, t token-aligned, OT distance, divergent), what train/candidate_log.py records
    candidates: list[tuple[int, int, float, bool]] = field(default_factory=list)

    @property
    def n_windows(self) -> int:
        return 0 if self.guidance is None else len(self.guidance)

    @classmethod
    def from_probe(cls, probe) -> "ProbeOutcome":
        """From topd's `ProbeResult` (topd/probe.py): CPU tensors, each guidance row tied to its rollout row."""
        g = probe.guidance
        guidance = None if g is None else GuidanceRows(
            tokens=g.tokens.cpu(), lengths=g.lengths.cpu(), window_start=g.window_start.cpu(),
            row=torch.tensor([probe.requests.owners[c][0] for c in g.candidate], dtype=torch.long),
            logit_weights=g.logit_weights.float().cpu())
        return cls(token_weights=probe.token_weights.float().cpu(), guidance=guidance,
                   n_candidates=int(probe.divergent.numel()), n_divergent=int(probe.divergent.sum()),
                   ot_sum=float(probe.ot_distances.double().sum()) if probe.ot_distances.numel() else 0.0,
                   ot_stats=dict(probe.ot_stats),  # over the whole batch already (the same on every rank)
                   timings=dict(probe.timings),
                   candidates=[(b, t, float(d), bool(k)) for (b, t), d, k in
                               zip(probe.requests.owners, probe.ot_distances.tolist(), probe.divergent.tolist())])


@dataclass
class PassStats:
    """The training pass's token counts, summed over data-parallel replicas (logged beside the objective)."""

    response_tokens: int
    guidance_windows: int
    train_tokens: int  # real tokens through the student (rollout + guidance microbatches)
    padding_fraction: float  # share of the microbatches' tokens that are padding
