"""Cross-tokenizer alignment and the span-level signal (megatron_topd/topd/cross_tokenizer.py, issue 27).

Three tokenizers built offline here that really differ: byte-level BPE with 1000 tokens (tiny_hf), byte-level BPE
with 300 tokens trained on another corpus, and a character-level WordLevel tokenizer with other special tokens
(testing/char_tokenizer.py). The alignment is compared with a brute-force reference built from HF's offsets on
random Unicode strings; the span-level log-ratio is computed from two real tiny HF models.
"""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoTokenizer

from megatron_topd.tasks.addition import build_tokenizer as build_addition_tokenizer
from megatron_topd.testing.char_tokenizer import ALPHABET, build_char_tokenizer
from megatron_topd.testing.tiny_hf import (build_tiny_model, build_tokenizer, hf_token_logprobs, load_hf_model,
                                           load_spec, random_state_dict)
from megatron_topd.topd.cross_tokenizer import (AlignmentError, Span, align_response, align_responses,
                                                resolve_tokenizer_mode, span_log_ratio,
                                                teacher_logprobs_on_student_tokens, token_pieces, tokenizer_relation)


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    load = AutoTokenizer.from_pretrained
    return {
        "bpe1000": load(build_tokenizer(root / "bpe1000", 1000, seed=0)),
        "bpe300": load(build_tokenizer(root / "bpe300", 300, seed=1)),
        "char": load(build_char_tokenizer(root / "char")),
    }


# ---------------------------------------------------------------------------------------------------------------
# random text and random (non-canonical) tokenizations

WORDS = ["the", "sum", "of", "x", "prove", "what", "bakodu", "zi", "Hello", "wörld", "café", "中文", "語字", "€5",
         "😀", "🚀🚀", "Straße", "ω=2", "(a+b)", "ñ"]


def random_text(rng: random.Random) -> str:
    """Words, digit runs, whitespace runs (spaces, newlines, tabs) and single characters of 1-4 UTF-8 bytes."""
    out = []
    for _ in range(rng.randint(0, 12)):
        r = rng.random()
        if r < 0.35:
            out.append(rng.choice(WORDS))
        elif r < 0.5:
            out.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
        elif r < 0.7:
            out.append("".join(rng.choice(" \n\t") for _ in range(rng.randint(1, 4))))
        else:
            out.append("".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 3))))
    return "".join(out)


def encode(tok, text: str, rng: random.Random | None = None):
    """(ids, character offsets): canonical, or (rng) a random segmentation - the text cut at random characters,
    each piece encoded alone or, for byte-level BPE, byte by byte - as a sampled response may be tokenized."""
    if rng is None:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    cuts = sorted({0, len(text), *(rng.randint(0, len(text)) for _ in range(rng.randint(0, 6)))})
    ids, offsets = [], []
    for a, b in zip(cuts, cuts[1:]):
        if rng.random() < 0.3 and "Ġ" in tok.get_vocab():  # byte-level vocabulary: one token per byte
            from megatron_topd.topd.cross_tokenizer import _unicode_to_byte

            to_char = {b_: c for c, b_ in _unicode_to_byte().items()}
            for k in range(a, b):
                for byte in text[k].encode("utf-8"):
                    ids.append(tok.convert_tokens_to_ids(to_char[byte]))
                    offsets.append((k, k + 1))
        else:
            p_ids, p_off = encode(tok, text[a:b])
            ids += p_ids
            offsets += [(s + a, e + a) for s, e in p_off]
    return ids, offsets


def reference_spans(length: int, s_off, t_off) -> list[tuple]:
    """Brute force from offsets: a character position c is a boundary of a tokenization when some split index i has
    every token before i ending at or before c and every token from i starting at or after c (byte tokens of one
    character share its offsets, so no boundary falls inside it); spans lie between consecutive boundaries common to
    both, and hold the tokens whose offsets lie inside them."""
    def cuts(off):
        return {c for c in range(length + 1)
                if any(all(e <= c for _, e in off[:i]) and all(s >= c for s, _ in off[i:]) for i in range(len(off) + 1))}

    common = sorted(cuts(s_off) & cuts(t_off))
    out = []
    for a, b in zip(common, common[1:]):
        si = [k for k, (s, e) in enumerate(s_off) if s >= a and e <= b]
        ti = [k for k, (s, e) in enumerate(t_off) if s >= a and e <= b]
        out.append((si[0], si[-1] + 1, ti[0], ti[-1] + 1, a, b))
    return out


PAIRS = [("bpe1000", "bpe300"), ("bpe300", "bpe1000"), ("bpe1000", "char"), ("char", "bpe1000"), ("bpe300", "char"),
         ("char", "bpe300"), ("bpe1000", "bpe1000")]


@pytest.mark.parametrize("student,teacher", PAIRS)
def test_alignment_equals_brute_force_reference(toks, student, teacher):
    """120 random strings per pair (seeded), student ids canonical or randomly segmented: the spans equal the brute
    force's, every token is in exactly one span, and the teacher's ids are its own tokenization of the text."""
    s_tok, t_tok = toks[student], toks[teacher]
    rng = random.Random(PAIRS.index((student, teacher)))  # fixed seeds: the same strings every run
    merged = 0
    for trial in range(120):
        text = random_text(rng)
        s_ids, s_off = encode(s_tok, text, rng if trial % 2 else None)
        t_ids, t_off = encode(t_tok, text)
        al = align_response(s_ids, s_tok, t_tok, row=trial)
        assert al.text == text
        assert al.teacher_ids == t_ids
        got = [tuple(sp[:6]) for sp in al.spans]
        assert got == reference_spans(len(text), s_off, t_off), (trial, text)
        assert all(sp.aligned for sp in al.spans)
        assert al.student_span_index().tolist() == sorted(al.student_span_index().tolist())  # a partition, in order
        merged += sum(1 for sp in al.spans if sp.student_end - sp.student_start > 1 or sp.teacher_end - sp.teacher_start > 1)
    if student != teacher:
        assert merged > 50  # the tokenizations really differ: many spans hold more than one token on a side


@pytest.mark.parametrize("name", ["bpe1000", "bpe300"])
def test_byte_path_equals_incremental_decoding(toks, name):
    """For byte-level BPE the exact byte arithmetic and the generic incremental decoding (used for every other
    tokenizer) give the same text, starts and boundaries, also on byte-by-byte tokens of multi-byte characters."""
    tok, rng = toks[name], random.Random(5)
    for _ in range(60):
        ids, _ = encode(tok, random_text(rng), rng)
        assert token_pieces(ids, tok) == token_pieces(ids, tok, byte_level=False)


def test_special_tokens_mapped_or_kept_out(toks):
    """EOS maps to the teacher's EOS (default); another special token is a span without teacher tokens (no signal);
    text that spells the teacher's special token is text to the teacher (split_special_tokens)."""
    a, c = toks["bpe1000"], toks["char"]
    t1, t2 = "x = 12 </s>", "中 ok"
    ids = encode(a, t1)[0] + [a.convert_tokens_to_ids("<|im_end|>")] + encode(a, t2)[0] + [a.eos_token_id]
    al = align_response(ids, a, c)
    assert al.text == t1 + t2
    assert al.teacher_ids == encode(c, t1)[0] + encode(c, t2)[0] + [c.eos_token_id]
    assert c.eos_token_id not in al.teacher_ids[:-1]  # "</s>" in the text was not read as the special token
    im_end = [sp for sp in al.spans if sp.student_end - sp.student_start == 1 and ids[sp.student_start] == ids[len(encode(a, t1)[0])]]
    assert im_end == [Span(len(encode(a, t1)[0]), len(encode(a, t1)[0]) + 1, len(t1), len(t1), len(t1), len(t1), False)]
    assert al.spans[-1] == Span(len(ids) - 1, len(ids), len(al.teacher_ids) - 1, len(al.teacher_ids), len(al.text),
                                len(al.text), True)
    none = align_response(ids, a, c, special_map={})
    assert none.spans[-1].aligned is False and c.eos_token_id not in none.teacher_ids


@pytest.mark.parametrize("forced_decoding", [False, True])
def test_incomplete_trailing_character_is_an_unaligned_tail(toks, forced_decoding):
    """A response cut inside a 4-byte character (max_new_tokens): its last tokens are one span with no signal."""
    a, c = toks["bpe1000"], toks["char"]
    head, _ = encode(a, "ok 12")
    emoji = [a.convert_tokens_to_ids(t) for t in a.convert_ids_to_tokens(encode(a, "😀")[0])]
    assert len(emoji) >= 2
    ids = head + emoji[:-1]
    if forced_decoding:
        assert token_pieces(ids, a, byte_level=False) == token_pieces(ids, a)
    al = align_response(ids, a, c)
    assert al.text == "ok 12" and al.teacher_ids == encode(c, "ok 12")[0]
    assert al.spans[-1] == Span(len(head), len(ids), 5, 5, 5, 5, False)
    with_eos = align_response(ids + [a.eos_token_id], a, c)
    assert [sp.aligned for sp in with_eos.spans[-2:]] == [False, True]


def test_unalignable_responses_raise_naming_row_and_position(toks, tmp_path):
    a = toks["bpe1000"]
    addition = AutoTokenizer.from_pretrained(build_addition_tokenizer(tmp_path / "addition"))
    ids = encode(a, "12+3")[0] + encode(a, "a=5")[0]
    with pytest.raises(AlignmentError) as err:  # the addition task's teacher has no token for "a"
        align_response(ids, a, addition, row=7)
    e = err.value
    assert (e.row, e.char) == (7, 4) and e.student_pos == len(encode(a, "12+3")[0])
    assert "row 7" in str(e) and "'a'" in str(e) and f"student token {e.student_pos}" in str(e)

    lone = a.convert_tokens_to_ids("Ģ")  # byte 0x80: a continuation byte with no character to continue
    bad = encode(a, "ab")[0] + [lone] + encode(a, "cd")[0]
    with pytest.raises(AlignmentError, match=r"row 3: .* at student token 2 \(character 2.*not UTF-8"):
        token_pieces(bad, a, row=3)  # the pieces refuse it; align_response masks those tokens only (below)

    out = align_responses([encode(a, "12")[0], ids, encode(a, "3")[0]], a, addition, errors="mask")
    assert [type(x).__name__ for x in out] == ["Alignment", "AlignmentError", "Alignment"] and out[1].row == 1
    with pytest.raises(AlignmentError, match="row 1"):
        align_responses([encode(a, "12")[0], ids], a, addition)


def byte_token(tok, byte: int) -> int:
    from megatron_topd.topd.cross_tokenizer import _unicode_to_byte

    return tok.convert_tokens_to_ids({b: c for c, b in _unicode_to_byte().items()}[byte])


@pytest.mark.parametrize("teacher", ["char", "bpe300"])
def test_invalid_utf8_masks_only_its_tokens(toks, teacher):
    """Tokens whose bytes are not UTF-8 are unaligned spans of their own (no teacher token, no signal); the text on
    either side is aligned and scored as without them. Hand cases: a lone continuation byte, a lead byte followed by
    ASCII, two invalid places in one response, an invalid byte right before a cut-off character, and a character
    split over byte tokens on both sides of an invalid byte."""
    a, t = toks["bpe1000"], toks[teacher]
    enc = lambda text: encode(a, text)[0]  # noqa: E731
    cont, lead3, ff = byte_token(a, 0x80), byte_token(a, 0xE4), byte_token(a, 0xFF)
    euro = [byte_token(a, b) for b in "€".encode()]  # 3 byte tokens of one valid character
    cases = [
        # (ids, the text kept, student ranges masked: one span per invalid byte sequence)
        (enc("ab") + [cont] + enc("cd"), "abcd", [(len(enc("ab")), len(enc("ab")) + 1)]),
        ([lead3] + enc("a1"), "a1", [(0, 1)]),
        (enc("x") + [cont] + enc("y") + [ff, ff] + enc("z"), "xyz",
         [(1, 2), (2 + len(enc("y")), 3 + len(enc("y"))), (3 + len(enc("y")), 4 + len(enc("y")))]),  # per sequence
        (euro + [ff] + euro + enc(" 5"), "€€ 5", [(3, 4)]),
    ]
    for ids, kept, masked in cases:
        al = align_response(ids, a, t, row=0)
        assert al.text == kept and al.teacher_ids == encode(t, kept)[0]
        assert sorted(sum(([k for k in range(sp.student_start, sp.student_end)] for sp in al.spans), [])) == \
            list(range(len(ids)))  # every student token in exactly one span
        bad = [(sp.student_start, sp.student_end) for sp in al.spans if not sp.aligned]
        assert bad == masked, (kept, bad)
        assert all(sp.teacher_start == sp.teacher_end for sp in al.spans if not sp.aligned)
    # an invalid byte and then a character cut off by max_new_tokens: two unaligned spans
    ids = enc("ok") + [ff] + enc("1") + euro[:2]
    al = align_response(ids, a, t)
    assert al.text == "ok1" and [(sp.student_start, sp.student_end) for sp in al.spans if not sp.aligned] == \
        [(len(enc("ok")), len(enc("ok")) + 1), (len(ids) - 2, len(ids))]
    out = align_responses([ids, enc("12")], a, t, errors="mask")
    assert [type(x).__name__ for x in out] == ["Alignment", "Alignment"]


# ---------------------------------------------------------------------------------------------------------------
# span-level log-ratio from two real tiny models


@pytest.fixture(scope="module")
def models(tmp_path_factory, toks):
    root = tmp_path_factory.mktemp("models")
    student_dir = build_tiny_model(root / "student", arch="llama", vocab_size=1000, seed=0)  # tokenizer = bpe1000
    teacher_dir = build_tiny_model(root / "teacher", arch="qwen2", vocab_size=300, seed=1)  # bpe300; char fits too
    same_tok_teacher = load_hf_model(student_dir, random_state_dict(load_spec(student_dir), seed=3))
    return {"student": load_hf_model(student_dir), "teacher": load_hf_model(teacher_dir),
            "teacher_same_tok": same_tok_teacher}


def response_logprobs(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """[len(response)] float64: log-prob of each response token given the prompt and the tokens before it."""
    logp = hf_token_logprobs(model, prompt + response)[len(prompt) - 1 : -1]
    return logp.gather(1, torch.tensor(response)[:, None])[:, 0]


@pytest.mark.parametrize("teacher_name", ["bpe300", "char"])
def test_span_log_ratio_sums_to_sequence_log_ratio(toks, models, teacher_name):
    """Student: tiny Llama over bpe1000, response ids randomly segmented; teacher: tiny Qwen2 (300 rows) scoring its
    own tokenization of the same text (prompt in its own tokens, EOS mapped). Summed over the response, every
    placement gives log P_S(response) - log P_T(response), computed independently of the alignment."""
    s_tok, t_tok = toks["bpe1000"], toks[teacher_name]
    rng = random.Random(11)
    prompt = "what is the sum of 12 and 30?\n"
    worst, multi = 0.0, 0
    for _ in range(12):
        text = random_text(rng)[:60]
        s_ids = encode(s_tok, text, rng)[0] + [s_tok.eos_token_id]
        al = align_response(s_ids, s_tok, t_tok)
        s_lp = response_logprobs(models["student"], encode(s_tok, prompt)[0], s_ids)
        t_prompt = encode(t_tok, prompt)[0]
        t_lp = response_logprobs(models["teacher"], t_prompt, al.teacher_ids)
        # the sequence-level log-ratio, with the teacher's tokenization made here, not taken from the alignment
        own = encode(t_tok, text)[0] + [t_tok.eos_token_id]
        sequence = float(s_lp.sum() - response_logprobs(models["teacher"], t_prompt, own).sum())
        for placement in ("even", "first", "last"):
            sig = span_log_ratio(al, s_lp, t_lp, placement=placement)
            assert bool(sig.mask.all())
            worst = max(worst, abs(float(sig.token_log_ratio.sum()) - sequence))
            assert float(sig.token_log_ratio.sum()) == pytest.approx(sequence, abs=1e-9)
        idx = al.student_span_index()
        even = span_log_ratio(al, s_lp, t_lp).token_log_ratio
        for k, sp in enumerate(al.spans):  # each span: its own student sum minus its own teacher sum
            d = float(s_lp[sp.student_start:sp.student_end].sum() - t_lp[sp.teacher_start:sp.teacher_end].sum())
            assert float(even[idx == k].sum()) == pytest.approx(d, abs=1e-9)
            multi += sp.student_end - sp.student_start > 1 or sp.teacher_end - sp.teacher_start > 1
        # what the token-level `sampled` estimator would need, with the trainer's own (here: perturbed) log-probs
        eff = teacher_logprobs_on_student_tokens(span_log_ratio(al, s_lp, t_lp), s_lp)
        s_new = s_lp + 0.01 * torch.randn(len(s_lp), dtype=torch.float64)
        assert float((s_new - eff).sum()) == pytest.approx(float(s_new.sum() - t_lp.sum()), abs=1e-9)
    assert multi > 20 and worst < 1e-9


def test_span_log_ratio_is_token_level_when_tokenizations_agree(toks, models):
    """Same tokenizer, canonical ids: each span is the same tokens on both sides - one token, except the byte
    tokens of a character the vocabulary splits into bytes, which share it - and the even placement is the
    token-level estimator log pi_S(y_t) - log pi_T(y_t) at every token of a one-token span."""
    tok, rng = toks["bpe1000"], random.Random(2)
    prompt = encode(tok, "find x:\n")[0]
    single = 0
    for _ in range(5):
        ids = encode(tok, random_text(rng) or "x")[0] + [tok.eos_token_id]
        al = align_response(ids, tok, tok)
        assert al.teacher_ids == ids
        assert all((sp.student_start, sp.student_end) == (sp.teacher_start, sp.teacher_end) for sp in al.spans)
        s_lp = response_logprobs(models["student"], prompt, ids)
        t_lp = response_logprobs(models["teacher_same_tok"], prompt, ids)
        got = span_log_ratio(al, s_lp, t_lp).token_log_ratio
        for sp in al.spans:
            if sp.student_end - sp.student_start == 1:
                single += 1
                assert float(got[sp.student_start]) == pytest.approx(float(s_lp[sp.student_start] - t_lp[sp.student_start]), abs=1e-12)
            else:  # bytes of one character: the span's mean
                part = slice(sp.student_start, sp.student_end)
                assert torch.allclose(got[part], (s_lp[part] - t_lp[part]).mean().expand(sp.student_end - sp.student_start))
    assert single > 30


def test_placements_and_masking():
    """Spans [0,3) with 2 teacher tokens, [3,4) unaligned: values by placement, 0 and masked where unaligned."""
    from megatron_topd.topd.cross_tokenizer import Alignment

    al = Alignment("abc", [7, 8], [Span(0, 3, 0, 2, 0, 3, True), Span(3, 4, 2, 2, 3, 3, False)], 4)
    s, t = torch.tensor([-1.0, -2.0, -3.0, -9.0]), torch.tensor([-0.5, -1.5])
    d = -6.0 + 2.0
    even = span_log_ratio(al, s, t)
    assert even.token_log_ratio.tolist() == [d / 3] * 3 + [0.0] and even.mask.tolist() == [True] * 3 + [False]
    assert span_log_ratio(al, s, t, placement="first").token_log_ratio.tolist() == [d, 0, 0, 0]
    assert span_log_ratio(al, s, t, placement="last").token_log_ratio.tolist() == [0, 0, d, 0]
    assert even.span_log_ratio.tolist() == [d, 0.0]
    assert al.span_start(2) == 0 and al.span_start(3) == 3
    with pytest.raises(ValueError, match="placement='middle'"):
        span_log_ratio(al, s, t, placement="middle")
    with pytest.raises(ValueError, match="3 student and 2 teacher log-probs"):
        span_log_ratio(al, s[:3], t)


# ---------------------------------------------------------------------------------------------------------------
# teacher.tokenizer: same | cross


def test_tokenizer_relation(toks, tmp_path):
    a = toks["bpe1000"]
    again = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path / "again", 1000, seed=0))
    assert tokenizer_relation(a, again).kind == "same"
    padded = tokenizer_relation(a, again, student_rows=152064 - 151936 + 1000, teacher_rows=1000)
    assert padded.kind == "same" and "padding" in padded.reason  # Qwen2.5's 152,064 vs 151,936 rows, scaled down
    assert tokenizer_relation(a, toks["bpe300"]).kind == "cross"
    assert tokenizer_relation(a, toks["char"]).kind == "cross"
    assert tokenizer_relation(toks["char"], AutoTokenizer.from_pretrained(build_addition_tokenizer(tmp_path / "add"))).kind == "cross"
    vocab = a.get_vocab()
    swapped = dict(vocab, **{"the": vocab["of"], "of": vocab["the"]}) if "the" in vocab and "of" in vocab else None
    if swapped is None:  # any two tokens swapped: the same strings under other ids
        k1, k2 = list(vocab)[10:12]
        swapped = dict(vocab, **{k1: vocab[k2], k2: vocab[k1]})
    rel = tokenizer_relation(vocab, swapped)
    assert rel.kind == "cross" and "2 shared tokens with other ids" in rel.reason
    with pytest.raises(ValueError, match="teacher model has 999 vocabulary rows"):
        tokenizer_relation(a, again, teacher_rows=999)
    assert resolve_tokenizer_mode("auto", a, again) == "same"
    assert resolve_tokenizer_mode("auto", a, toks["char"]) == "cross"
    assert resolve_tokenizer_mode("cross", a, again) == "cross"
    with pytest.raises(ValueError, match="teacher.tokenizer=same, but .* use teacher.tokenizer=cross"):
        resolve_tokenizer_mode("same", a, toks["bpe300"])
    with pytest.raises(ValueError, match="teacher.tokenizer='both'"):
        resolve_tokenizer_mode("both", a, a)
