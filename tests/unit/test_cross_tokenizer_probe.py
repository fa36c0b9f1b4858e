"""TOPD's probe across tokenizers (train/cross_probe.py, topd/cross_tokenizer.py `retokenize` / `probe_span`;
issue 27): prefixes written in the teacher's tokens, windows written back in the student's, candidates probed at
span starts, candidates that cannot be written dropped and counted, and the guidance rows' hard targets.

Two real tokenizers that differ in every way that matters (tests/unit/test_cross_tokenizer.py builds the same): a
character-level WordLevel tokenizer with a limited alphabet and specials ``<pad> <s> </s> <unk>``, and a byte-level
BPE of 300 or 1000 tokens with specials ``<|endoftext|> ... <|im_end|>``. The samplers are the project's reference
`TorchModelSampler` over small random bigram models.
"""
from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoTokenizer

from megatron_topd.testing.char_tokenizer import build_char_tokenizer
from megatron_topd.testing.tiny_hf import build_tokenizer
from megatron_topd.topd import TopdConfig, embedding_lookup, run_probe
from megatron_topd.topd.cross_tokenizer import AlignmentError, align_response, probe_position, retokenize
from megatron_topd.topd.sampler import TorchModelSampler
from megatron_topd.train.cross_probe import (StudentWindows, TeacherWindows, in_student_tokens, place_candidates,
                                             probe_samplers, teacher_prompts)
from megatron_topd.train.handoffs import RolloutRows
from megatron_topd.train.teacher import CrossTokenizerTeacher, RemoteTeacher
from tests.unit.test_cross_tokenizer import encode, random_text


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_toks")
    load = AutoTokenizer.from_pretrained
    return {"bpe1000": load(build_tokenizer(root / "bpe1000", 1000, seed=0)),
            "bpe300": load(build_tokenizer(root / "bpe300", 300, seed=1)),
            "char": load(build_char_tokenizer(root / "char"))}


def text_of(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


@pytest.mark.parametrize("src,dst", [("bpe1000", "char"), ("char", "bpe300"), ("bpe300", "bpe1000")])
def test_retokenize_writes_the_same_text_in_the_other_tokenizer(toks, src, dst):
    """80 random strings (Unicode, whitespace and digit runs), source ids canonical or randomly segmented: the
    result is the destination tokenizer's own encoding of the text, EOS maps to its EOS, other specials drop out."""
    a, b = toks[src], toks[dst]
    rng = random.Random(11)
    for trial in range(80):
        text = random_text(rng)
        ids, _ = encode(a, text, rng if trial % 2 else None)
        assert retokenize(ids, a, b) == encode(b, text)[0]
        assert retokenize(ids + [a.eos_token_id], a, b) == encode(b, text)[0] + [b.eos_token_id]
        if "<|im_end|>" in a.get_vocab():  # a special token the other side has no counterpart for: left out
            im_end = a.convert_tokens_to_ids("<|im_end|>")
            assert retokenize(ids + [im_end] + ids, a, b) == encode(b, text)[0] * 2  # each run on its own


def test_windows_in_student_tokens_are_cut_checked_and_never_empty(toks):
    char, bpe = toks["char"], toks["bpe300"]
    window = encode(bpe, "12+7=19; ok")[0] + [bpe.eos_token_id]
    back = {bpe.eos_token_id: char.eos_token_id}  # the teacher's EOS -> the student's
    assert in_student_tokens(window, bpe, char, back, 50) == encode(char, "12+7=19; ok")[0] + [char.eos_token_id]
    assert in_student_tokens(window, bpe, char, back, 4) == encode(char, "12+7")[0]  # topd.window student tokens
    assert in_student_tokens(encode(bpe, "x∑y")[0], bpe, char, back, 50) is None  # no student token for "∑"
    assert in_student_tokens([bpe.convert_tokens_to_ids("<|im_end|>")], bpe, char, back, 50) is None  # nothing
    assert in_student_tokens(window[:2] + [len(bpe)], bpe, char, back, 50) is None  # a padded row: no token


@pytest.mark.parametrize("student,teacher", [("char", "bpe300"), ("bpe1000", "char"), ("bpe1000", "bpe300")])
def test_probe_position_is_a_boundary_of_both_tokenizations(toks, student, teacher):
    """Every response position moves to the start of its span: the student's prefix up to it spells exactly the
    text of the teacher's first ``teacher_start`` tokens, and re-tokenized it is those tokens."""
    s, t = toks[student], toks[teacher]
    rng = random.Random(3)
    moved = 0
    for trial in range(60):
        text = random_text(rng)
        ids, _ = encode(s, text, rng if trial % 2 else None)
        try:
            al = align_response(ids, s, t)
        except AlignmentError:  # a character the char-level side cannot spell
            continue
        for pos in range(len(ids)):
            p = probe_position(al, pos)
            span = al.spans[int(al.student_span_index()[p])]
            assert p <= pos and span.student_start == p
            assert text_of(s, ids[:p]) == text_of(t, al.teacher_ids[: span.teacher_start])
            assert retokenize(ids[:p], s, t) == al.teacher_ids[: span.teacher_start]
            moved += p != pos
    assert moved > 20  # spans of several student tokens exist, so candidates really move


def cross_teacher(toks, student: str, teacher: str, *, context_length=None, seed=0) -> CrossTokenizerTeacher:
    """A cross-tokenizer teacher whose 'server' is the reference sampler over a random bigram model that writes
    only tokens the student can spell (and EOS), as a trained teacher would on the student's task."""
    s, t = toks[student], toks[teacher]
    alphabet = set(s.get_vocab())
    spellable = [i for i in range(len(t)) if i == t.eos_token_id or (
        i not in t.all_special_ids and (piece := text_of(t, [i])) and set(piece) <= alphabet)]
    client = TorchModelSampler(bigram(len(t), seed, spellable), eos_id=t.eos_token_id)
    client.context_length = context_length
    return CrossTokenizerTeacher(client, student_tokenizer=s, teacher_tokenizer=t)


def bigram(vocab: int, seed: int, allowed: list[int] | None = None):
    table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    if allowed is not None:
        table[:, [i for i in range(vocab) if i not in set(allowed)]] = -1e4
    return lambda ids: table[ids]


def test_teacher_prefix_uses_the_teachers_prompt_and_its_tokens_of_the_response(toks):
    teacher = cross_teacher(toks, "char", "bpe300")
    char, bpe = toks["char"], toks["bpe300"]
    prompt = encode(char, "12+30=")[0]
    teacher.prompts[tuple(prompt)] = [bpe.bos_token_id] + encode(bpe, "12+30=")[0]  # as ascore_samples renders it
    windows = TeacherWindows(teacher, teacher_prompts(teacher, [prompt, prompt]))
    assert windows.renderings == {tuple(prompt): teacher.prompts[tuple(prompt)]}
    response = encode(char, "2+0=2; ok")[0]
    assert windows.teacher_prefix(prompt + response) == teacher.prompts[tuple(prompt)] + encode(bpe, "2+0=2; ok")[0]
    with pytest.raises(ValueError, match="starts with none of this step's prompts"):
        windows.teacher_prefix(encode(char, "99+1=")[0])


def test_probe_across_tokenizers_places_maps_and_drops(toks):
    """run_probe with the cross-tokenizer samplers (student: char-level, teacher: BPE 300 over random bigram
    models): candidates sit at span starts; each teacher window is the teacher's own continuation of its prefix,
    written in the student's tokens (checked by rerunning the teacher's sampler with the same seed); the student's
    windows are canonical; a candidate whose teacher prefix does not fit the teacher's context drops out, counted;
    guidance rows are prefix + teacher window with hard targets."""
    char, bpe = toks["char"], toks["bpe300"]
    teacher = cross_teacher(toks, "char", "bpe300", context_length=24, seed=1)
    prompt = encode(char, "7+5=")[0]
    teacher.prompts[tuple(prompt)] = encode(bpe, "7+5=")[0]
    responses = [encode(char, "7+5+0=12; the sum is 12")[0], encode(char, "the answer: 12 " * 6)[0]]
    rows = RolloutRows([prompt, prompt], responses, [[0.0] * len(r) for r in responses])
    tokens, mask = rows.padded(char.pad_token_id)
    loss = torch.zeros(tokens.shape)
    late = len(prompt) + len(responses[1]) - 3
    loss[0, len(prompt) + 12] = 5.0  # the "e" of the teacher's token "he": a span of two student tokens
    loss[1, late] = 5.0  # its teacher prefix is longer than the teacher's context allows
    student_client = TorchModelSampler(bigram(len(char), 2), eos_id=char.eos_token_id)
    teacher_side, student_side, place = probe_samplers(teacher, None, student_client, rows)
    assert isinstance(teacher_side, TeacherWindows) and isinstance(student_side, StudentWindows)
    assert probe_samplers(teacher, None, student_client, rows, asks=False)[:2] == (None, None)  # places only
    cfg = TopdConfig(variant="topd", top_k=1, min_gap=1, window=6, low_fraction=0.0)
    table = torch.randn(len(char), 8, generator=torch.Generator().manual_seed(0))
    probe = run_probe(tokens, loss, mask, cfg, teacher=teacher_side, student=student_side,
                      embed=embedding_lookup(table), pad_id=char.pad_token_id, seed=5, place_candidates=place)

    al = align_response(responses[0], char, bpe)
    start = probe_position(al, 12)
    assert start == 11  # moved back to where "he" begins in both tokenizations
    assert probe.requests.owners == [(0, len(prompt) + start)] and probe.candidates == [[len(prompt) + start], []]
    assert teacher.dropped_candidates == 1  # row 1's candidate: no room in the teacher's context
    assert teacher.step_metrics(SimpleNamespace(teacher=[]))["cross_tokenizer_dropped_candidates"] == 1.0
    assert teacher.dropped_candidates == 0  # counted once
    suppress = TopdConfig(variant="opd_suppress", top_k=1, min_gap=1, window=6, threshold=2.0)  # 1 - cos < 2: all
    weights = run_probe(tokens, loss, mask, suppress, teacher=teacher_side, student=student_side,
                        embed=embedding_lookup(table), pad_id=char.pad_token_id, seed=5,
                        place_candidates=place).token_weights
    span = [len(prompt) + start, len(prompt) + start + 1]  # "h" and "e": both carry the span's signal
    assert weights[0, span].tolist() == [0.0, 0.0] and weights.sum() == weights.numel() - 2

    (prefix,) = probe.requests.prefixes
    t_prefix = teacher_side.teacher_prefix(prefix)
    assert t_prefix == encode(bpe, "7+5=")[0] + encode(bpe, text_of(char, responses[0][:start]))[0]
    (raw,) = teacher.client.continue_prefixes([t_prefix], max_new_tokens=6, n=1, temperature=1.0, seed=10)[0]
    (window,) = probe.teacher_windows[0]
    assert window == in_student_tokens(raw, bpe, char, {bpe.eos_token_id: char.eos_token_id}, 6)
    assert 1 <= len(window) <= 6 and retokenize(window, char, char) == window
    (s_window,) = probe.student_windows[0]
    assert retokenize(s_window, char, char) == s_window  # canonical: identical texts are identical ids

    g = probe.guidance
    assert g.num_windows == 1 and g.tokens[0, : int(g.lengths[0])].tolist() == prefix + window
    targets = teacher.score_guidance(g.tokens, g.lengths, g.window_start)
    assert targets[0]["topk_ids"][:, 0].tolist() == window and targets[0]["topk_logprobs"].eq(0).all()


def test_place_candidates_drops_spans_without_signal_and_merges(toks):
    a, c = toks["bpe1000"], toks["char"]
    teacher = CrossTokenizerTeacher(None, student_tokenizer=c, teacher_tokenizer=a)
    prompt = encode(c, "1+1=")[0]
    resp = encode(c, "the cat")[0] + [c.convert_tokens_to_ids("<unk>")] + encode(c, "ab")[0]
    rows = RolloutRows([prompt], [resp], [[0.0] * len(resp)])
    al = align_response(resp, c, a)  # the BPE writes "the cat" as t|he|Ġc|at
    assert [probe_position(al, t) for t in range(len(resp))] == [0, 1, 1, 3, 3, 5, 5, None, 8, 9]  # t|he| c|at, then a|b
    got, spans = place_candidates(teacher, rows, [[len(prompt) + 2, len(prompt) + 1, len(prompt) + 7, len(prompt) + 6]])
    assert got == [[len(prompt) + 1, len(prompt) + 5]]  # "h" and "e" share the span "he"; <unk> has no teacher token
    assert spans == {(0, len(prompt) + 1): 2, (0, len(prompt) + 5): 2}  # the student tokens of "he" and "at"


def test_hard_targets_give_the_cross_entropy_of_the_window_token():
    """The trajectory term on a hard target (k = 1, log-prob 0) is -log pi_S(y) exactly (float64 reference), and a
    same-tokenizer teacher's probe keeps its plain clients."""
    from megatron_topd.losses import vocab_parallel_topk_kl

    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([3, 0, 39, 17, 3])
    rows = CrossTokenizerTeacher.score_guidance(None, torch.cat([torch.zeros(1, 2, dtype=torch.long), y[None]], 1),
                                               torch.tensor([7]), torch.tensor([2]))
    kl = vocab_parallel_topk_kl(logits.float(), rows[0]["topk_ids"], rows[0]["topk_logprobs"], direction="forward")
    ref = -torch.log_softmax(logits, -1).gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(kl.double(), ref, rtol=1e-5, atol=1e-5)
    same = RemoteTeacher(None, kl="sampled", top_k=4)
    assert probe_samplers(same, "teacher-client", "student-client", None) == ("teacher-client", "student-client", None)
