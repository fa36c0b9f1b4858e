"""Steps 3-7 in one call: candidates -> near-future windows -> OT divergence -> weights -> guidance batch.

The trainer calls `run_probe` after scoring a rollout batch (``l_t`` known), then runs the teacher and student
forward on ``result.guidance`` (variant ``topd``) and hands everything to `loss.topd_loss`.
With ``group`` (the TP group), only the group's first rank talks to the samplers and broadcasts the windows, so
every TP rank holds identical windows; all ranks must call (the embedding lookup all-reduces). The teacher's and the
student's window requests go out at once (two threads; each client spreads its requests over all its servers), and
the OT solves are split over the group's ranks (`divergence.window_divergence`, docs/throughput.md).
With ``dp_group`` (the data-parallel group) the suppression is decided once over the whole batch: every replica's
candidate distances are all-gathered (`gather_distances`), `weights.divergence_weights` runs on the global vector
(same seed, same answer on every rank) and each replica keeps its own slice.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.distributed as dist

from megatron_topd.topd.candidates import select_candidates
from megatron_topd.topd.config import TopdConfig
from megatron_topd.topd.divergence import window_divergence
from megatron_topd.topd.sampler import ContinuationSampler
from megatron_topd.topd.weights import divergence_weights, ot_statistics, token_weights
from megatron_topd.topd.windows import GuidanceBatch, ProbeRequests, build_guidance, build_requests, check_continuations


@dataclass
class ProbeResult:
    """Everything the loss and the logs need; per-candidate tensors follow ``requests`` order."""

    candidates: list[list[int]]
    requests: ProbeRequests
    teacher_windows: list[list[list[int]]]
    student_windows: list[list[list[int]]]
    ot_distances: torch.Tensor  # [C] float64
    candidate_weights: torch.Tensor  # [C] float32
    divergent: torch.Tensor  # [C] bool: not suppressed (guidance windows under variant "topd")
    token_weights: torch.Tensor  # [B, T] float32, token-aligned
    guidance: GuidanceBatch | None  # variant "topd" only
    timings: dict[str, float] = field(default_factory=dict)  # window_s (generation), ot_s (divergence)
    # OT distance quantiles and group means over the whole batch (all replicas): `weights.ot_statistics`
    ot_stats: dict[str, float] = field(default_factory=dict)


def run_probe(
    tokens: torch.Tensor,
    token_loss: torch.Tensor,
    response_mask: torch.Tensor,
    cfg: TopdConfig,
    *,
    teacher: ContinuationSampler | None,
    student: ContinuationSampler | None,
    embed,
    pad_id: int,
    seed: int | None = None,
    group=None,
    dp_group=None,
    student_servers: Sequence[str] | None = None,
    place_candidates=None,
) -> ProbeResult:
    """Probe the candidates of a scored batch (token-aligned ``token_loss``/``response_mask``, see `positions`).

    The teacher sampler gets ``2 * seed``, the student's ``2 * seed + 1`` (no two steps' windows share a seed).
    Samplers may be None on ranks that are not the group's first rank. ``embed(ids) -> rows`` is the
    (vocabulary-parallel) lookup of the table ``cfg.embedding_table(teacher placement)`` names. ``seed`` also drives
    ``suppress: random`` (and the tie fill of ``high``): pass the same value on every rank. ``dp_group``: decide the
    suppression over all its ranks' candidates (every rank of it must call; None = this call's candidates only).
    ``student_servers[b]``: the student server that generated sequence b (`Generation.server`), handed to the student
    sampler as a routing hint, so each window's prefix is continued where its KV is cached.
    ``place_candidates(candidates) -> (candidates, span lengths)`` (a teacher of another tokenizer,
    train/cross_probe.py; the same on every rank): where each selected candidate is probed, and for a placed
    candidate ``(b, t)`` the number of tokens from t that share its weight (its span's student tokens: a suppressed
    span loses its whole signal); its samplers may answer None for a candidate they cannot continue in the
    student's tokens, which then drops out (no distance, weight, or guidance).
    """
    cfg.validate()
    if tokens.shape != token_loss.shape:
        raise ValueError(f"tokens shape {tuple(tokens.shape)} != token_loss shape {tuple(token_loss.shape)}")
    if cfg.variant == "opd":
        return _plain(tokens, response_mask)
    if cfg.candidate_mode == "top_k":
        candidates = select_candidates(token_loss, response_mask, top_k=cfg.top_k, min_gap=cfg.candidate_gap)
    else:
        candidates = select_candidates(
            token_loss, response_mask, top_k=None, min_gap=cfg.candidate_gap, fraction=cfg.candidate_fraction
        )
    spans: dict[tuple[int, int], int] = {}
    if place_candidates is not None:
        candidates, spans = place_candidates(candidates)
    requests = build_requests(tokens, candidates)
    t0 = time.perf_counter()
    hints = None if student_servers is None else [student_servers[b] for b, _ in requests.owners]
    teacher_w, student_w = _sample_windows(requests, cfg, teacher, student, seed, group, hints,
                                           allow_missing=place_candidates is not None)
    if any(w is None for w in teacher_w + student_w):
        candidates, requests, teacher_w, student_w = _without_missing(candidates, requests, teacher_w, student_w)
    t1 = time.perf_counter()
    div = window_divergence(
        teacher_w, student_w, embed, with_transport=cfg.variant == "topd" and cfg.position_weighting == "ot_plan",
        group=group, position_weight=cfg.ot_position_weight,
    )
    timings = {"window_s": t1 - t0, "ot_s": time.perf_counter() - t1}
    everyone, offset = gather_distances(div.distance, dp_group)
    all_weights, all_divergent = divergence_weights(
        everyone, low_fraction=cfg.low_fraction, threshold=cfg.threshold, w_low=cfg.w_low, suppress=cfg.suppress,
        seed=seed,
    )
    mine = slice(offset, offset + len(div.distance))
    weights, divergent = all_weights[mine].clone(), all_divergent[mine].clone()
    guidance = None
    if cfg.variant == "topd":
        guidance = build_guidance(
            requests, teacher_w, divergent, weighting=cfg.position_weighting, gamma=cfg.gamma,
            transport=div.transport, pad_id=pad_id, normalization=cfg.traj_normalization,
        )
    return ProbeResult(
        candidates=candidates,
        requests=requests,
        teacher_windows=teacher_w,
        student_windows=student_w,
        ot_distances=div.distance,
        candidate_weights=weights,
        divergent=divergent,
        token_weights=spread_over_spans(token_weights(response_mask, candidates, weights), spans),
        guidance=guidance,
        timings=timings,
        ot_stats=ot_statistics(everyone, all_divergent),
    )


def spread_over_spans(weights: torch.Tensor, spans: dict[tuple[int, int], int]) -> torch.Tensor:
    """Each candidate's weight ``weights[b, t]`` on the ``n`` tokens ``t .. t + n - 1`` of ``spans[(b, t)]``
    (in place; a dropped candidate's position holds 1, so spreading it changes nothing)."""
    for (b, t), n in spans.items():
        if n > 1:
            weights[b, t + 1 : t + n] = weights[b, t]
    return weights


def gather_distances(local: torch.Tensor, group=None) -> tuple[torch.Tensor, int]:
    """All ranks' candidate distances, concatenated in group-rank order (float64 CPU ``[C_total]``), and the offset
    of this rank's slice. Counts may differ per rank (0 included); every rank of ``group`` must call."""
    local = local.detach().double().cpu().reshape(-1)
    if group is None or dist.get_world_size(group) == 1:
        return local, 0
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else None
    count = torch.tensor([local.numel()], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count, group=group)
    counts = [int(c) for c in counts]
    width = max(max(counts), 1)
    padded = torch.zeros(width, dtype=torch.float64, device=device)
    padded[: local.numel()] = local.to(padded.device)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    everyone = torch.cat([p[:n].cpu() for p, n in zip(parts, counts)])
    return everyone, sum(counts[:rank])


def _without_missing(candidates, requests: ProbeRequests, teacher_w, student_w):
    """The candidates whose windows both samplers gave (a None: not writable in the student's tokens)."""
    keep = [c for c in range(len(requests)) if teacher_w[c] is not None and student_w[c] is not None]
    owners = [requests.owners[c] for c in keep]
    kept = set(owners)
    return ([[t for t in ts if (b, t) in kept] for b, ts in enumerate(candidates)],
            ProbeRequests([requests.prefixes[c] for c in keep], owners),
            [teacher_w[c] for c in keep], [student_w[c] for c in keep])


def _sample_windows(requests, cfg: TopdConfig, teacher, student, seed, group, student_hints=None,
                    allow_missing: bool = False):
    if len(requests) == 0:
        return [], []
    src_rank = 0 if group is None else dist.get_global_rank(group, 0)
    is_src = group is None or dist.get_rank() == src_rank
    payload: list = [None, None]
    if is_src:
        if teacher is None or student is None:
            raise ValueError("run_probe needs teacher and student samplers on the group's first rank")
        kwargs = dict(max_new_tokens=cfg.window, n=cfg.samples_per_side, temperature=cfg.sampling_temperature,
                      top_p=cfg.probe_top_p)
        # Both sides at once: the teacher's and the student's servers generate concurrently (each call runs its own
        # event loop in its own thread; the two clients share no state).
        # One sampler object on both sides (a client's pool is per event loop) is called one side at a time.
        with ThreadPoolExecutor(max_workers=1 if teacher is student else 2, thread_name_prefix="probe-windows") as pool:
            t_job = pool.submit(teacher.continue_prefixes, requests.prefixes,
                                seed=None if seed is None else 2 * seed, **kwargs)
            s_job = pool.submit(student.continue_prefixes, requests.prefixes,
                                seed=None if seed is None else 2 * seed + 1, **kwargs,
                                **({} if student_hints is None else {"servers": student_hints}))
            payload = [t_job.result(), s_job.result()]
        for who, w in zip(("teacher", "student"), payload):
            check_continuations(w, len(requests), cfg.samples_per_side, cfg.window, who, allow_missing=allow_missing)
    if group is not None and dist.get_world_size(group) > 1:
        dist.broadcast_object_list(payload, src=src_rank, group=group)
    return payload[0], payload[1]


def _plain(tokens: torch.Tensor, response_mask: torch.Tensor) -> ProbeResult:
    empty = torch.zeros(0)
    return ProbeResult(
        candidates=[[] for _ in range(tokens.shape[0])],
        requests=ProbeRequests([], []),
        teacher_windows=[],
        student_windows=[],
        ot_distances=empty.double(),
        candidate_weights=empty.float(),
        divergent=empty.bool(),
        token_weights=torch.ones(response_mask.shape, dtype=torch.float32, device=response_mask.device),
        guidance=None,
        ot_stats=ot_statistics(empty.double(), empty.bool()),
    )
