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

import asyncio
import math
from collections import OrderedDict
from typing import Protocol

import torch
import torch.distributed as dist

from megatron_topd.train.step import run_schedule


class TeacherSignal(Protocol):
    def for_microbatches(self, batches: list[dict]) -> list | None:
        """Per microbatch, what the loss needs from the teacher (last pipeline stage), in order; None elsewhere."""

    rollout_scorer: "RemoteTeacher | None"  # scores samples as the rollout source receives them (remote), or None

    def score_guidance(self, tokens: torch.Tensor, lengths: torch.Tensor, window_start: torch.Tensor) -> list[dict] | None:
        """The same for guidance rows (their window positions)."""

    def step_metrics(self, batch) -> dict:
        """Metrics of the teacher's signal over a step's `StepBatch` (a collective where not empty)."""


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

    def step_metrics(self, batch) -> dict:
        return {}

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

    ``client``: an `SGLangClient`, or an `OpenAICompletionsClient` (`teacher.api=openai`; scores only). Scores are
    renormalised to ``temperature`` (`at_temperature`); with ``deadline_s`` a row not scored in time is dropped
    (masked, ``late``) and counted instead of stalling the step.
    """

    def __init__(self, client, *, kl: str, top_k: int, temperature: float = 1.0, deadline_s: float = 0.0):
        self.client, self.kl, self.top_k = client, kl, top_k
        self.temperature, self.deadline_s = float(temperature), float(deadline_s)

    @property
    def rollout_top_k(self) -> int:
        """Top-k per rollout token: k for ``topk``; for ``sampled`` 0 (the sampled token's log-prob only), or k at a
        temperature other than 1 (to renormalise, `at_temperature`)."""
        return self.top_k if self.kl == "topk" or self.temperature != 1.0 else 0

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
                signal["mask"] = b.get("teacher_signal_mask")  # cross-tokenizer: positions with a teacher signal
            out.append(signal)
        return out

    def step_metrics(self, batch) -> dict:
        """`row_counts` over the step's batch (held by rank 0; the same on every rank): with a deadline
        ``teacher_late_rows``, responses whose score came too late (dropped from the loss). A collective when
        there are counts: every rank calls it."""
        if not (self.deadline_s or self.counts_rows):
            return {}
        from megatron_topd import parallel

        counts = self.row_counts(batch.teacher) if batch.teacher is not None else None
        return parallel.broadcast_object(counts)

    counts_rows = False  # metrics only with a deadline

    def row_counts(self, rows: list[dict]) -> dict:
        return {"teacher_late_rows": float(sum(bool(r.get("late")) for r in rows))}

    async def ascores(self, sequences: list[list[int]], starts: list[int], top_k: int) -> list:
        """The client's `Score` per sequence, or None for one not scored within ``deadline_s`` (its attempts and
        their backoff included; its request is cancelled, and SGLang aborts a request whose client went away)."""
        if not self.deadline_s:
            return await self.client.ascore(sequences, start=starts, top_logprobs=top_k)

        async def one(seq, start):
            try:
                (score,) = await asyncio.wait_for(self.client.ascore([seq], start=start, top_logprobs=top_k),
                                                  self.deadline_s)
                return score
            except TimeoutError:
                return None

        return list(await asyncio.gather(*(one(q, s) for q, s in zip(sequences, starts))))

    def rows(self, scores: list, completions: list[list[int]], top_k: int, keep_top_k: bool) -> list[dict]:
        """Per completion: ``token_logprobs [R]`` at this teacher's temperature and, with ``keep_top_k``,
        ``topk_ids`` / ``topk_logprobs [R, k]``; a row scored too late (None) gets zeros, ``signal_mask`` all
        False (loss weight 0) and ``late``."""
        rows = []
        for score, ids in zip(scores, completions):
            if score is None:
                row = {"token_logprobs": torch.zeros(len(ids)), "signal_mask": torch.zeros(len(ids), dtype=torch.bool),
                       "late": True}
                if keep_top_k:
                    row["topk_ids"] = torch.arange(top_k, dtype=torch.int32).repeat(len(ids), 1)
                    row["topk_logprobs"] = torch.full((len(ids), top_k), -math.log(top_k + 1))
            else:
                token_lp, top_ids, top_lp = self.scaled(score, ids)
                row = {"token_logprobs": token_lp.float()}
                if keep_top_k:
                    row["topk_ids"], row["topk_logprobs"] = top_ids.to(torch.int32), top_lp.float()
            rows.append(row)
        return rows

    def scaled(self, score, ids: list[int]):
        """A `Score` of tokens ``ids`` as float64 (token log-probs [R], top-k ids [R, k], top-k log-probs [R, k])
        at this teacher's temperature (`at_temperature`; the top-k is None when none was asked for)."""
        token_lp = torch.tensor(score.token_logprobs, dtype=torch.float64)
        if not score.top_logprobs:
            if self.temperature != 1.0:
                raise ValueError(f"scores at temperature {self.temperature} need the teacher's top-k: ask for k > 0")
            return token_lp, None, None
        pairs = torch.tensor(score.top_logprobs, dtype=torch.float64)  # [R, k, (id, log-prob)]: one C-level pass
        top_ids, top_lp = pairs[..., 0].long(), pairs[..., 1].contiguous()  # ids < 2**53 are exact in float64
        if self.temperature != 1.0:
            vocab = self.client.vocab_size
            token_lp, top_lp = at_temperature(token_lp, top_ids, top_lp, torch.tensor(ids), self.temperature,
                                              complete=vocab is not None and top_ids.shape[-1] >= vocab)
        return token_lp, top_ids, top_lp

    def score_rows(self, prompts: list[list[int]], completions: list[list[int]], *, top_k: int,
                   keep_top_k: bool = True) -> list[dict]:
        """Per row, the teacher's data for each completion token (`rows`)."""
        scores = asyncio.run(self.ascores([p + c for p, c in zip(prompts, completions)], [len(p) for p in prompts],
                                          top_k))
        return self.rows(scores, completions, top_k, keep_top_k=keep_top_k and bool(top_k))

    async def ascore_samples(self, prompt: list[int], completions: list[list[int]]) -> list[dict]:
        """`score_rollouts` for one prompt's samples, awaited as soon as they are generated (the rollout source
        calls it per prompt, so scoring overlaps the generation of the other prompts)."""
        k = self.rollout_top_k
        scores = await self.ascores([prompt + c for c in completions], [len(prompt)] * len(completions), k)
        return self.rows(scores, completions, k, keep_top_k=self.kl == "topk")

    def with_own_client(self) -> "RemoteTeacher":
        """The same teacher on a fresh connection pool (for a background thread's event loop)."""
        return RemoteTeacher(self.client.with_own_pool(), kl=self.kl, top_k=self.top_k, temperature=self.temperature,
                             deadline_s=self.deadline_s)

    def score_rollouts(self, prompts, responses) -> list[dict]:
        return self.score_rows(prompts, responses, top_k=self.rollout_top_k, keep_top_k=self.kl == "topk")

    def score_guidance(self, tokens: torch.Tensor, lengths: torch.Tensor, window_start: torch.Tensor) -> list[dict]:
        """Top-k at every window position of each guidance row (L_traj uses them under topk and sampled alike)."""
        prefixes = [tokens[i, : int(window_start[i])].tolist() for i in range(tokens.shape[0])]
        windows = [tokens[i, int(window_start[i]) : int(lengths[i])].tolist() for i in range(tokens.shape[0])]
        return self.score_rows(prefixes, windows, top_k=self.top_k)


def at_temperature(token_lp: torch.Tensor, top_ids: torch.Tensor, top_lp: torch.Tensor, token_ids: torch.Tensor,
                   temperature: float, *, complete: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs at temperature T from the server's T = 1 ones (SGLang ignores the temperature for input log-probs):
    log softmax(z / T) = log p / T - log Z_T, Z_T = sum_v p_v^(1/T), summed over the top-k, the scored token when
    it is not among them, and the rest of the vocabulary as one bucket of mass r (as the top-k estimator's tail
    bucket): r^(1/T). Exact when the top-k is the whole vocabulary (``complete``) or the rest is one token; else
    r^(1/T) bounds the rest's true sum from above for T < 1 and from below for T > 1. ``top_ids`` < 0 (ids not
    known: an OpenAI-compatible server) counts the token among the top-k when its log-prob reaches the k-th's.
    Returns (token log-probs [R], top-k log-probs [R, k]) at T, float64."""
    a = 1.0 / temperature
    token_lp, top_lp = token_lp.double(), top_lp.double()
    if bool((top_ids >= 0).all()):
        in_top = (top_ids == token_ids[:, None]).any(-1)
    else:
        in_top = token_lp >= top_lp.min(-1).values - 1e-6
    own = torch.where(in_top, torch.zeros_like(token_lp), token_lp.exp())
    rest = torch.zeros_like(token_lp) if complete else (1.0 - top_lp.exp().sum(-1) - own).clamp_min(0.0)
    terms = torch.cat([a * top_lp, torch.where(in_top, -math.inf, a * token_lp)[:, None],
                       (a * rest.log())[:, None]], dim=-1)
    log_z = torch.logsumexp(terms, -1)
    return a * token_lp - log_z, a * top_lp - log_z[:, None]


class CrossTokenizerTeacher(RemoteTeacher):
    """A remote teacher whose tokenizer differs from the student's (`teacher.tokenizer: cross`, `teacher.kl:
    sampled`; docs/remote_teacher.md "Teachers with another tokenizer", docs/method.md "Cross-tokenizer signal").

    Per prompt, as its samples come back: each response is aligned with the teacher's tokenization of its text
    (`align_responses(errors="mask")`), the teacher scores ``its prompt + Alignment.teacher_ids`` by prefill (its own
    per-token log-probs, no top-k), and the span-level log-ratio becomes a per-student-token "teacher log-prob"
    (`teacher_logprobs_on_student_tokens`) that the unchanged `sampled` estimator turns into the span-level signal.
    Rows are shaped like `RemoteTeacher`'s (``token_logprobs [R]`` on the student's tokens) plus ``signal_mask [R]``
    (False: no teacher signal - unaligned span, unaligned row, or a row longer than the teacher's context in its
    tokens - loss weight 0) and ``aligned`` (the row could be aligned at all).

    The teacher's prompt is the dataset row rendered by the teacher's tokenizer: its messages in the teacher's chat
    template (with the generation prompt) when it has one, else their text joined by newlines, as
    `rollout.prompts.PromptDataset` renders it for the student. Without the row (a caller that only has ids), the
    student's prompt ids are decoded (special tokens skipped) and that text is the one user message. The rendering
    of each scored prompt is remembered (the last ``remember`` prompts, shared with `with_own_client` copies) for
    TOPD's probe, whose prefixes start with the student's prompt ids (train/cross_probe.py `teacher_prompts` hands
    them to each data-parallel replica's asking rank); its guidance rows get hard targets (`score_guidance`).
    """

    wants_sample_context = True  # the rollout source passes each sample's log-probs and the prompt's dataset row

    def __init__(self, client, *, student_tokenizer, teacher_tokenizer, top_k: int = 1, special_map=None,
                 temperature: float = 1.0, deadline_s: float = 0.0, prompts: "OrderedDict | None" = None,
                 remember: int = 8192):
        from megatron_topd.topd.cross_tokenizer import default_special_map

        super().__init__(client, kl="sampled", top_k=top_k, temperature=temperature, deadline_s=deadline_s)
        self.student_tokenizer, self.teacher_tokenizer = student_tokenizer, teacher_tokenizer
        if special_map is None:  # without the teacher's tokenizer (ranks of an OPD run other than 0) it never scores
            special_map = default_special_map(student_tokenizer, teacher_tokenizer) if teacher_tokenizer else {}
        self.special_map = dict(special_map)
        # student prompt ids -> the teacher's prompt ids, as scored (the probe's prefixes start with the former)
        self.prompts = OrderedDict() if prompts is None else prompts
        self.remember = remember
        self.dropped_candidates = 0  # the probe's candidates without windows in both tokenizers, since the last metrics

    def with_own_client(self) -> "CrossTokenizerTeacher":
        return CrossTokenizerTeacher(self.client.with_own_pool(), student_tokenizer=self.student_tokenizer,
                                     teacher_tokenizer=self.teacher_tokenizer, top_k=self.top_k,
                                     special_map=self.special_map, temperature=self.temperature,
                                     deadline_s=self.deadline_s, prompts=self.prompts, remember=self.remember)

    def prompt_for(self, prompt: list[int]) -> list[int]:
        """The teacher's prompt ids of a student prompt scored lately (else `teacher_prompt` without its row)."""
        found = self.prompts.get(tuple(prompt))
        return list(found) if found is not None else self.teacher_prompt(prompt)

    def teacher_prompt(self, prompt: list[int], prompt_row: dict | None = None) -> list[int]:
        """The prompt in the teacher's tokens (class docstring)."""
        if prompt_row and isinstance(prompt_row.get("messages"), list):
            messages = prompt_row["messages"]
        elif prompt_row and isinstance(prompt_row.get("prompt"), str):
            messages = [{"role": "user", "content": prompt_row["prompt"]}]
        else:
            text = self.student_tokenizer.decode(prompt, skip_special_tokens=True)
            messages = [{"role": "user", "content": text}]
        tok = self.teacher_tokenizer
        if getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = tok("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
        ids = [int(i) for i in ids]
        if not ids:
            raise ValueError("the prompt renders to no teacher tokens: the teacher cannot score its responses")
        return ids

    async def ascore_samples(self, prompt: list[int], completions: list[list[int]],
                             student_logprobs: list[list[float]] | None = None,
                             prompt_row: dict | None = None) -> list[dict]:
        from megatron_topd.rollout.validation import longest_input
        from megatron_topd.topd.cross_tokenizer import (Alignment, align_responses, span_log_ratio,
                                                        teacher_logprobs_on_student_tokens)

        if student_logprobs is None or len(student_logprobs) != len(completions):
            raise ValueError("a cross-tokenizer teacher needs the student's log-prob of every sampled token (the "
                             "span-level signal is log pi_S - log pi_T over a span): pass student_logprobs")
        t_prompt = self.teacher_prompt(prompt, prompt_row)
        self.prompts[tuple(prompt)] = t_prompt
        while len(self.prompts) > self.remember:
            self.prompts.popitem(last=False)
        # a row that cannot be aligned comes back as its AlignmentError: dropped from the loss, counted (step_metrics)
        alignments = align_responses(completions, self.student_tokenizer, self.teacher_tokenizer,
                                     special_map=self.special_map, errors="mask")
        room = longest_input(self.client.context_length)  # a row the teacher cannot take gets no signal (counted)
        scored = [k for k, al in enumerate(alignments) if isinstance(al, Alignment) and al.teacher_ids
                  and (room is None or len(t_prompt) + len(al.teacher_ids) <= room)]
        scores = await self.ascores([t_prompt + alignments[k].teacher_ids for k in scored], [len(t_prompt)] * len(scored),
                                    self.rollout_top_k) if scored else []
        by_row = {k: self.scaled(sc, alignments[k].teacher_ids)[0] for k, sc in zip(scored, scores) if sc is not None}
        late = {k for k, sc in zip(scored, scores) if sc is None}
        rows = []
        for k, ids in enumerate(completions):
            s_lp = torch.tensor([float("nan") if x is None else float(x) for x in student_logprobs[k]],
                                dtype=torch.float64)
            if len(s_lp) != len(ids):
                raise ValueError(f"sample {k}: {len(ids)} tokens but {len(s_lp)} log-probs")
            if k in by_row:
                sig = span_log_ratio(alignments[k], s_lp, by_row[k])
                token_lp = teacher_logprobs_on_student_tokens(sig, s_lp)
                mask = sig.mask & torch.isfinite(token_lp)
                token_lp = torch.where(mask, token_lp, torch.zeros_like(token_lp))
            else:
                mask = torch.zeros(len(ids), dtype=torch.bool)
                token_lp = torch.zeros(len(ids), dtype=torch.float64)
            rows.append({"token_logprobs": token_lp.float(), "signal_mask": mask,
                         "aligned": isinstance(alignments[k], Alignment), "late": k in late})
        return rows

    def score_rollouts(self, prompts, responses) -> list[dict]:
        raise NotImplementedError("a cross-tokenizer teacher scores samples as they are generated (ascore_samples), "
                                  "with the student's log-probs")

    def score_guidance(self, tokens, lengths, window_start) -> list[dict]:
        """Hard targets along the teacher's windows, which the probe wrote in the student's tokens
        (train/cross_probe.py): at each window position the target is the window's own token with probability 1
        (``topk_ids [K, 1]``, ``topk_logprobs`` 0), so the trajectory term's top-k forward KL is
        ``-log pi_S(y_i | c_i)`` exactly (the teacher's tail is empty). The teacher's distribution is over another
        vocabulary; its sampled window is a draw from it, so the expected gradient is that of the forward KL of
        the window's text (docs/method.md "Cross-tokenizer TOPD"). No server call."""
        rows = []
        for i in range(tokens.shape[0]):
            ids = tokens[i, int(window_start[i]) : int(lengths[i])]
            rows.append({"token_logprobs": torch.zeros(len(ids)), "topk_ids": ids.to(torch.int32)[:, None],
                         "topk_logprobs": torch.zeros(len(ids), 1)})
        return rows

    counts_rows = True  # metrics every step, deadline or not

    def step_metrics(self, batch) -> dict:
        """`row_counts` (rank 0's, over the whole batch) and ``cross_tokenizer_dropped_candidates``: the probe's
        candidates without windows in both tokenizers since the last call (which resets it), summed over every
        rank, since each data-parallel replica's asking rank counts its own. A collective: every rank calls it."""
        from megatron_topd import parallel

        dropped, self.dropped_candidates = self.dropped_candidates, 0
        total = torch.tensor([float(dropped)], dtype=torch.float64, device=parallel.device())
        if dist.is_initialized():
            dist.all_reduce(total)
        return {**super().step_metrics(batch), "cross_tokenizer_dropped_candidates": float(total)}

    def row_counts(self, rows: list[dict]) -> dict:
        """``cross_tokenizer_masked_tokens`` (response tokens without a teacher signal, weight 0),
        ``cross_tokenizer_unaligned_rows`` (responses that could not be aligned at all, all their tokens masked),
        ``cross_tokenizer_response_tokens`` and ``teacher_late_rows``."""
        return {"cross_tokenizer_masked_tokens": float(sum(int((~r["signal_mask"]).sum()) for r in rows)),
                "cross_tokenizer_unaligned_rows": float(sum(not r["aligned"] for r in rows)),
                "cross_tokenizer_response_tokens": float(sum(len(r["signal_mask"]) for r in rows)),
                **super().row_counts(rows)}


def teacher_fields(teacher_rows: list[dict], idx: list[int], starts: list[int], width: int, k: int) -> dict:
    """Logit-aligned [n, width(, k)] batch fields from per-row remote scores (position p predicts token p + 1).

    Positions without teacher data get distinct filler ids and log(1/(k+1)) (valid, masked out of every loss).
    Rows with a ``signal_mask`` (a cross-tokenizer teacher) add ``teacher_signal_mask [n, width]`` (bool, False at
    response tokens without a teacher signal: the estimator gives them loss weight 0)."""
    n = len(idx)
    out = {"teacher_token_logprobs": torch.zeros(n, width)}
    masked = any("signal_mask" in teacher_rows[i] for i in idx)
    if masked:
        out["teacher_signal_mask"] = torch.ones(n, width, dtype=torch.bool)
    if k:
        out["teacher_topk_ids"] = torch.arange(k, dtype=torch.int32).repeat(n, width, 1)  # ids < 2^31: int32
        out["teacher_topk_logprobs"] = torch.full((n, width, k), -math.log(k + 1))
    for j, (i, start) in enumerate(zip(idx, starts)):
        row = teacher_rows[i]
        r = len(row["token_logprobs"])
        out["teacher_token_logprobs"][j, start - 1 : start - 1 + r] = row["token_logprobs"]
        if masked and "signal_mask" in row:
            out["teacher_signal_mask"][j, start - 1 : start - 1 + r] = row["signal_mask"]
        if k:
            out["teacher_topk_ids"][j, start - 1 : start - 1 + r] = row["topk_ids"]
            out["teacher_topk_logprobs"][j, start - 1 : start - 1 + r] = row["topk_logprobs"]
    return out
