"""Rows -> variable-length microbatches under a token budget (DESIGN section 3, "memory per microbatch").

A step's rows (rollouts: prompt + response; guidance: prefix + teacher window) differ wildly in length, so padding
them to the step's longest row wastes most of the compute at 16k context. Rows are sorted by length and packed
greedily into microbatches of at most ``max_tokens`` padded tokens whose padding stays under 10%; each microbatch is
padded only to its own longest row (rounded up to ``multiple``: sequence parallelism needs a multiple of TP). Stages of a pipeline exchange the
shapes first (Megatron's ``variable_seq_lengths``), so microbatches may differ in rows and length.

Sizes at ``examples/topd_70b.yaml`` (128 rows per DP replica, S <= 16k, budget 16k tokens): a microbatch is one 16k row
or several short ones; the student's logits on the last stage are [tokens_in_mb, V/TP] = 16k x 19k x 4 B = 1.2 GB.

Alignment inside a microbatch: ``response_mask``, ``token_weights``, ``rollout_logprobs`` are token-aligned (index t
refers to ``tokens[t]``); logits at position p predict ``tokens[p + 1]``. Guidance microbatches carry the flat logit
positions that have a weight (``loss_index`` into ``[rows * L]``) and their weights, so the trajectory KL is computed
at those K positions per row only.
"""
from __future__ import annotations

import math
import torch

from megatron_topd.train.handoffs import GuidanceRows, RolloutRows


FP8_TOKEN_MULTIPLE = 16  # Transformer Engine's FP8 GEMMs want every dimension, the tokens included, a multiple of 16


def pad_multiple(tensor_parallel: int, *, sequence_parallel: bool, fp8: bool, context_parallel: int = 1) -> int:
    """What every microbatch's width rounds up to, so each rank's shard of it is valid (the one place that says so).

    - 8 always (aligned shapes);
    - sequence parallelism splits the width over the TP ranks: a multiple of TP;
    - context parallelism splits it into 2 x CP chunks (Megatron's load-balanced split): a multiple of 2 x CP;
    - FP8: each rank's share (width / (TP under SP) / CP) a multiple of 16.

    At examples/topd_70b.yaml (TP8, SP, FP8): 128, so a 16376-token row pads to 16384 (2048 per TP rank), never to
    16376 (2047 per rank, which TE's FP8 GEMM refuses)."""
    shards = (tensor_parallel if sequence_parallel else 1) * context_parallel
    multiple = math.lcm(8, shards * (FP8_TOKEN_MULTIPLE if fp8 else 1))
    return math.lcm(multiple, 2 * context_parallel) if context_parallel > 1 else multiple


def round_up(n: int, multiple: int = 8) -> int:
    return max(multiple, math.ceil(n / multiple) * multiple)


def pack_rows(lengths: list[int], max_tokens: int, multiple: int = 8, max_padding: float = 0.1) -> list[list[int]]:
    """Row indices per microbatch: longest first; a row joins the current microbatch while the microbatch stays
    within ``max_tokens`` once padded to its longest row and its padding stays within ``max_padding`` of it."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    width = real = 0
    for i in order:
        n = lengths[i]
        if groups:
            rows = len(groups[-1]) + 1
            if rows * width <= max_tokens and (real + n) >= (1 - max_padding) * rows * width:
                groups[-1].append(i)
                real += n
                continue
        width = round_up(n, multiple)
        if width > max_tokens:
            raise ValueError(f"a row of {n} tokens (padded to {width}) exceeds train.max_tokens_per_microbatch="
                             f"{max_tokens}: raise the budget to at least {width}")
        groups.append([i])
        real = n
    return groups


def rollout_microbatches(rows: RolloutRows, max_tokens: int, pad_id: int, *, multiple: int = 8,
                         token_weights: torch.Tensor | None = None, guidance: GuidanceRows | None = None,
                         windows: list[list[int]] | None = None) -> list[dict]:
    """Microbatches of rollout rows; ``token_weights`` ([rows, >= longest], token-aligned) defaults to ones.

    Each carries ``row_index`` (the rows' indices in ``rows``) so per-token results can be put back in row order.
    ``windows[i]`` (from `windows_per_row`) lists the guidance windows (rows of the ``guidance`` payload) that ride in
    rollout row i after its last token (models/shared_prefix.py); such microbatches also carry the guidance fields
    (``loss_index``, ``loss_weights``, ``num_windows``, a remote teacher's ``guidance_topk_*``) and the attention
    layout (``attention_segment``, ``attention_visible``, per-token ``position_ids``).
    """
    lengths = rows.lengths()
    packed = lengths if windows is None else [n + sum(_window_len(guidance, w) for w in ws)
                                              for n, ws in zip(lengths, windows)]
    out = []
    for idx in pack_rows(packed, max_tokens, multiple):
        width = round_up(max(packed[i] for i in idx), multiple)
        n = len(idx)
        tokens, mask = rows.tokens_and_mask(idx, width, pad_id)
        weights = torch.zeros((n, width), dtype=torch.float32)
        logprobs = torch.full((n, width), float("nan"), dtype=torch.float32)
        for j, i in enumerate(idx):
            p, r = rows.prompts[i], rows.responses[i]
            w = token_weights[i, : len(p) + len(r)] if token_weights is not None else torch.ones(len(p) + len(r))
            weights[j, : len(p) + len(r)] = w.float()
            if rows.logprobs:
                logprobs[j, len(p) : len(p) + len(r)] = torch.tensor(rows.logprobs[i], dtype=torch.float32)
        extra = {}
        if rows.teacher is not None:
            from megatron_topd.train.teacher import teacher_fields

            k = rows.teacher[0]["topk_ids"].shape[-1] if "topk_ids" in rows.teacher[0] else 0
            extra = teacher_fields(rows.teacher, idx, [len(rows.prompts[i]) for i in idx], width, k)
        mb = _microbatch("rollout", tokens, response_mask=mask, token_weights=weights, rollout_logprobs=logprobs,
                         row_index=torch.tensor(idx, dtype=torch.long), real_tokens=sum(packed[i] for i in idx),
                         **extra)
        if windows is not None and any(windows[i] for i in idx):
            _add_windows(mb, [lengths[i] for i in idx], [windows[i] for i in idx], guidance)
        out.append(mb)
    return out


def _window_len(guidance: GuidanceRows, w: int) -> int:
    return int(guidance.lengths[w]) - int(guidance.window_start[w])


def windows_per_row(guidance: GuidanceRows, rows: RolloutRows, max_tokens: int, multiple: int = 8
                    ) -> tuple[list[list[int]], list[int]]:
    """The shared-prefix layout's plan: per rollout row, the guidance windows appended to it (payload order), and
    the windows left over because their row would outgrow ``max_tokens`` (those train as rows of their own).

    ``guidance.row[w]`` is the rollout row whose first ``window_start[w]`` tokens are window w's prefix; that is
    checked, since a window attending to another row's tokens would train on a wrong context without any error."""
    lengths = rows.lengths()
    per_row: list[list[int]] = [[] for _ in lengths]
    rest: list[int] = []
    for w in range(guidance.tokens.shape[0]):
        i, t = int(guidance.row[w]), int(guidance.window_start[w])
        full = rows.prompts[i] + rows.responses[i]
        if t > len(full) or guidance.tokens[w, :t].tolist() != full[:t]:
            raise ValueError(f"guidance window {w}: its prefix is not the first {t} tokens of rollout row {i}; the "
                             "probe's payload and the replica's rows disagree")
        grown = lengths[i] + sum(_window_len(guidance, v) for v in per_row[i]) + _window_len(guidance, w)
        (per_row[i] if round_up(grown, multiple) <= max_tokens else rest).append(w)
    return per_row, rest


def _add_windows(mb: dict, lengths: list[int], windows: list[list[int]], guidance: GuidanceRows) -> None:
    """Write each row's windows after its rollout tokens, and their loss positions, weights and attention layout.

    Window token i of a window starting at t is predicted by the logits at the rollout's token t - 1 (i = 0) or at
    the window's token i - 1, exactly the positions `build_guidance` marks as t - 1 + i in the window's own row."""
    from megatron_topd.models.shared_prefix import PADDING, ROLLOUT

    tokens, width = mb["tokens"], mb["tokens"].shape[1]
    segment = torch.full(tokens.shape, PADDING, dtype=torch.long)
    visible = torch.zeros(tokens.shape, dtype=torch.long)
    positions = mb["position_ids"].clone()
    index, weights, top_ids, top_lps = [], [], [], []
    teacher = guidance.teacher
    for j, (n, ws) in enumerate(zip(lengths, windows)):
        segment[j, :n] = ROLLOUT
        offset = n
        for local, w in enumerate(ws):
            t, end = int(guidance.window_start[w]), int(guidance.lengths[w])
            k = end - t
            tokens[j, offset : offset + k] = guidance.tokens[w, t:end]
            segment[j, offset : offset + k] = local
            visible[j, offset : offset + k] = t
            positions[j, offset : offset + k] = torch.arange(t, end)
            pos = torch.nonzero(guidance.logit_weights[w, :end] > 0).flatten()  # t - 1 + i in the window's row
            i = pos - (t - 1)
            index.append(torch.where(i == 0, t - 1, offset + i - 1) + j * width)
            weights.append(guidance.logit_weights[w, pos].float())
            if teacher is not None:
                top_ids.append(teacher[w]["topk_ids"][i])
                top_lps.append(teacher[w]["topk_logprobs"][i])
            offset += k
    mb.update(attention_segment=segment, attention_visible=visible, position_ids=positions,
              loss_index=torch.cat(index), loss_weights=torch.cat(weights),
              num_windows=torch.tensor(float(sum(len(ws) for ws in windows))))
    if teacher is not None:
        mb.update(guidance_topk_ids=torch.cat(top_ids), guidance_topk_logprobs=torch.cat(top_lps))


def guidance_microbatches(tokens: torch.Tensor, lengths: torch.Tensor, logit_weights: torch.Tensor, max_tokens: int,
                          pad_id: int, *, multiple: int = 8, teacher: list[dict] | None = None,
                          window_start: torch.Tensor | None = None) -> list[dict]:
    """Microbatches of guidance rows (prefix + teacher window, ``lengths`` real tokens each).

    ``logit_weights [N, L]`` (logit-aligned, each row sums to 1) becomes ``loss_index`` (flat positions with a weight,
    into the microbatch's ``[rows * width]`` logits) and ``loss_weights``: the KL runs on K positions per row.
    ``teacher`` (a remote teacher's top-k at every window position, per row) with ``window_start`` adds
    ``teacher_topk_ids`` / ``teacher_topk_logprobs`` [weighted positions, k] in ``loss_index`` order.
    """
    lens = [int(x) for x in lengths]
    out = []
    for idx in pack_rows(lens, max_tokens, multiple):
        width = round_up(max(lens[i] for i in idx), multiple)
        mb_tokens = torch.full((len(idx), width), pad_id, dtype=torch.long)
        flat_index, flat_weights, top_ids, top_lps = [], [], [], []
        for j, i in enumerate(idx):
            mb_tokens[j, : lens[i]] = tokens[i, : lens[i]]
            pos = torch.nonzero(logit_weights[i, : lens[i]] > 0).flatten()
            flat_index.append(pos + j * width)
            flat_weights.append(logit_weights[i, pos].float())
            if teacher is not None:
                at = pos - (int(window_start[i]) - 1)  # logit position -> index into the window's scores
                top_ids.append(teacher[i]["topk_ids"][at])
                top_lps.append(teacher[i]["topk_logprobs"][at])
        extra = {} if teacher is None else {"teacher_topk_ids": torch.cat(top_ids),
                                            "teacher_topk_logprobs": torch.cat(top_lps)}
        out.append(_microbatch("guidance", mb_tokens, loss_index=torch.cat(flat_index),
                               loss_weights=torch.cat(flat_weights), num_windows=torch.tensor(float(len(idx))),
                               real_tokens=sum(lens[i] for i in idx), **extra))
    return out


def _microbatch(kind: str, tokens: torch.Tensor, **fields) -> dict:
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand(tokens.shape[0], -1)
    return {"kind": kind, "tokens": tokens, "position_ids": positions, **fields}


def padding_fraction(batches: list[dict]) -> tuple[int, int]:
    """(real tokens, padded tokens) over microbatches: the padding-fraction metric's parts."""
    return sum(b["real_tokens"] for b in batches), sum(b["tokens"].numel() for b in batches)
