"""TOPD's probe with a teacher of another tokenizer (issue 27; docs/method.md "Cross-tokenizer TOPD",
docs/remote_teacher.md "Teachers with another tokenizer"): where a candidate is probed, and both sides' windows
written in the student's tokens.

    teacher_side, student_side, place = probe_samplers(run.teacher, run.teacher_client, run.student_client, rows,
                                                       asks=asks)
    run_probe(..., teacher=teacher_side, student=student_side, place_candidates=place)

- **Where**: a candidate moves to the first student token of its span (`probe_span`), so the probe's prefix ends
  where both tokenizations have a boundary; a candidate in a span without a teacher signal is not probed.
- **Teacher side** (`TeacherWindows`, a `ContinuationSampler` over the student's ids): the prefix's prompt becomes
  the teacher's rendering of the same dataset row (`CrossTokenizerTeacher.prompt_for`, remembered by rank 0 when it
  scored the samples; `teacher_prompts` hands each data-parallel replica's asking rank those of its rows), its
  response part is re-tokenized with the teacher's tokenizer (`retokenize`), the teacher's
  server continues that in its own ids (`topd.window` of its tokens), and each window is decoded and re-tokenized
  with the student's tokenizer, cut to `topd.window` student tokens.
- **Student side** (`StudentWindows`): the student's window re-tokenized canonically with its own tokenizer, so
  both windows are the student tokenizer's ids of their texts - one space for OT (the student's input embeddings),
  where two identical texts are at distance exactly 0 however they were sampled - and the teacher's window is a
  guidance target in the student's tokens (hard targets: `CrossTokenizerTeacher.score_guidance`).

A candidate whose prefix or any of its windows cannot be written in the other tokenizer (`AlignmentError`), whose
teacher prefix does not fit the teacher's context, or whose window re-tokenizes to nothing comes back as None:
`run_probe` drops it (no OT distance, no suppression, no guidance) and the teacher counts it
(`cross_tokenizer_dropped_candidates`). Everything here is per candidate, Python lists of ids: no vocabulary
dimension.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch.distributed as dist

from megatron_topd import parallel
from megatron_topd.rollout.validation import longest_input
from megatron_topd.topd.cross_tokenizer import AlignmentError, align_response, probe_span, retokenize
from megatron_topd.train.teacher import CrossTokenizerTeacher


def probe_samplers(teacher, teacher_client, student_client, rows, *, asks: bool = True):
    """(teacher sampler, student sampler, candidate placement or None) for `run_probe`: the clients themselves
    for a teacher that shares the student's tokenizer, the cross-tokenizer samplers otherwise. ``asks``: this rank
    asks the servers for its replica's windows (the loop's first TP rank of each replica's first stage); across
    tokenizers every asking rank must call (`teacher_prompts` is a collective over them), the others get no
    samplers, only the placement."""
    if not isinstance(teacher, CrossTokenizerTeacher):
        return teacher_client, student_client, None
    place = functools.partial(place_candidates, teacher, rows)
    if not asks:
        return None, None, place
    renderings = teacher_prompts(teacher, rows.prompts, asking_ranks())
    return TeacherWindows(teacher, renderings), StudentWindows(student_client, teacher.student_tokenizer), place


def asking_ranks():
    """The group of the ranks that ask for windows, one per data-parallel replica (and context-parallel rank):
    the data-parallel group of a first-stage TP rank 0, which holds global rank 0. None in a single process."""
    if not dist.is_initialized():
        return None
    from megatron.core import parallel_state as ps

    return ps.get_data_parallel_group(with_context_parallel=True)


def teacher_prompts(teacher: CrossTokenizerTeacher, prompts: Sequence[Sequence[int]],
                    group=None) -> dict[tuple[int, ...], list[int]]:
    """Student prompt ids -> the teacher's rendering of that prompt, for ``prompts`` (this replica's rows).

    Only rank 0 saw the dataset rows (it scored the samples, `CrossTokenizerTeacher.ascore_samples`), so with a
    ``group`` of several asking ranks (`asking_ranks`) every member's prompts are all-gathered and rank 0 broadcasts
    its renderings of all of them (`prompt_for`): the windows of a row are asked for from the same teacher prefix
    whatever replica holds it. Object collectives of int lists: per step the unique prompts, (prompts_per_step,
    prompt length) ids in each tokenizer - at examples/topd_70b.yaml (64 prompts of at most 384 tokens, DP 2) under
    0.1M ints, beside the (256 rows, 16k) ids of the step's batch every rank already receives."""
    mine = list(dict.fromkeys(tuple(int(t) for t in p) for p in prompts))
    if group is None or dist.get_world_size(group) == 1:
        return {key: teacher.prompt_for(list(key)) for key in mine}
    if dist.get_global_rank(group, 0) != 0:
        raise ValueError("teacher_prompts: the group of asking ranks must hold global rank 0, which alone has the "
                         "teacher's renderings of the prompts (call it on the first TP rank of each replica's first "
                         "pipeline stage)")
    asked: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(asked, mine, group=group)
    answer = None
    if dist.get_rank() == 0:
        answer = {key: teacher.prompt_for(list(key)) for key in dict.fromkeys(k for keys in asked for k in keys)}
    answer = parallel.broadcast_object(answer, src=0, group=group)
    return {key: answer[key] for key in mine}


def place_candidates(teacher: CrossTokenizerTeacher, rows,
                     candidates: list[list[int]]) -> tuple[list[list[int]], dict[tuple[int, int], int]]:
    """Each candidate (token-aligned, in prompt + response) at the start of its span (`probe_span`); candidates
    whose span has no teacher signal, or whose response cannot be aligned at all, leave; two landing on one start
    become one. Also each placed candidate's number of span tokens, which its suppression weight covers
    (`run_probe`). The same on every rank (every rank holds both tokenizers)."""
    out, spans = [], {}
    for b, ts in enumerate(candidates):
        start = len(rows.prompts[b])
        try:
            al = align_response(rows.responses[b], teacher.student_tokenizer, teacher.teacher_tokenizer,
                                special_map=teacher.special_map, row=b)
        except AlignmentError:
            out.append([])
            continue
        placed: dict[int, int] = {}  # probe position -> its span's student tokens, in the candidates' order
        for t in ts:
            span = probe_span(al, t - start)
            if span is not None:
                placed.setdefault(start + span.start, len(span))
        out.append(list(placed))
        spans.update({(b, t): n for t, n in placed.items()})
    return out, spans


class TeacherWindows:
    """The teacher's near-future windows of student-id prefixes, in the student's ids (module docstring);
    None for a candidate it cannot continue. ``renderings``: student prompt ids -> the teacher's prompt ids, for
    the prompts of the rows whose candidates are probed (`teacher_prompts`)."""

    def __init__(self, teacher: CrossTokenizerTeacher, renderings: dict[tuple[int, ...], list[int]]):
        self.teacher = teacher
        self.renderings = renderings
        self.prompt_lengths = sorted({len(p) for p in renderings}, reverse=True)

    def teacher_prefix(self, prefix: Sequence[int]) -> list[int] | None:
        """The prefix in the teacher's ids: its prompt rendered for the teacher, then its response part's text."""
        t = self.teacher
        cut = next((n for n in self.prompt_lengths if tuple(prefix[:n]) in self.renderings), None)
        if cut is None:
            raise ValueError("a probe prefix starts with none of this step's prompts: build TeacherWindows with the "
                             "rows whose candidates are probed")
        try:
            response = retokenize(prefix[cut:], t.student_tokenizer, t.teacher_tokenizer, special_map=t.special_map)
        except AlignmentError:
            return None
        return list(self.renderings[tuple(prefix[:cut])]) + response

    def continue_prefixes(self, prefixes, *, max_new_tokens: int, n: int, temperature: float, top_p: float,
                          seed: int | None, servers=None) -> list[list[list[int]] | None]:
        t = self.teacher
        mapped = [self.teacher_prefix(p) for p in prefixes]
        context = t.client.context_length
        fits = [i for i, m in enumerate(mapped) if m is not None and (context is None or (
            len(m) + max_new_tokens <= context and len(m) <= longest_input(context)))]
        windows = t.client.continue_prefixes([mapped[i] for i in fits], max_new_tokens=max_new_tokens, n=n,
                                             temperature=temperature, top_p=top_p, seed=seed) if fits else []
        out: list = [None] * len(prefixes)
        back = {t.special_map[s]: s for s in t.special_map}  # the teacher's EOS -> the student's
        for i, per_prefix in zip(fits, windows):
            student = [in_student_tokens(w, t.teacher_tokenizer, t.student_tokenizer, back, max_new_tokens)
                       for w in per_prefix]
            out[i] = None if any(w is None for w in student) else student
        t.dropped_candidates += out.count(None)
        return out


class StudentWindows:
    """The student's windows (its servers, `servers` routing hints passed on), each re-tokenized canonically with
    its own tokenizer (module docstring); None for a candidate whose window spells nothing."""

    def __init__(self, client, tokenizer):
        self.client, self.tokenizer = client, tokenizer

    def continue_prefixes(self, prefixes, *, max_new_tokens: int, n: int, temperature: float, top_p: float,
                          seed: int | None, servers=None) -> list[list[list[int]] | None]:
        windows = self.client.continue_prefixes(prefixes, max_new_tokens=max_new_tokens, n=n, temperature=temperature,
                                                top_p=top_p, seed=seed, servers=servers)
        eos = self.tokenizer.eos_token_id
        same = {} if eos is None else {eos: eos}
        out = []
        for per_prefix in windows:
            canonical = [in_student_tokens(w, self.tokenizer, self.tokenizer, same, max_new_tokens) for w in per_prefix]
            out.append(None if any(w is None for w in canonical) else canonical)
        return out


def in_student_tokens(window: Sequence[int], from_tok, student_tok, special_map: dict, limit: int) -> list[int] | None:
    """A window's text in the student's tokens, at most ``limit`` of them; None when that is nothing, the student's
    tokenizer cannot spell it (`retokenize`: mapped special tokens kept, others and broken bytes left out), or the
    window holds an id ``from_tok`` has no token for (a padded vocabulary row the model sampled)."""
    if any(not 0 <= int(i) < len(from_tok) for i in window):
        return None
    try:
        ids = retokenize(window, from_tok, student_tok, special_map=special_map)[:limit]
    except AlignmentError:
        return None
    return ids or None
