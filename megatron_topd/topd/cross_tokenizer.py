"""Cross-tokenizer on-policy distillation: the student's response under the teacher's tokenizer, the two
tokenizations aligned into spans, and the span-level sampled-token reverse-KL estimate (issue 27;
docs/remote_teacher.md "Teachers with another tokenizer", docs/method.md "Cross-tokenizer signal").

    relation = tokenizer_relation(student_tok, teacher_tok, student_rows=152064, teacher_rows=151936)  # same | cross
    al = align_response(response_ids, student_tok, teacher_tok, row=i)   # al.teacher_ids: what the teacher scores
    sig = span_log_ratio(al, student_logprobs, teacher_logprobs)         # per student token, sums to the sequence's

Alignment. The student's response ids are turned into text and per-token character starts *from the ids* (the
student's sampled tokenization is often not the one its tokenizer would give the text, so there are no offsets to
ask for): byte-level BPE tokenizers (decoder ``ByteLevel``: GPT-2, Llama 3, Qwen, DeepSeek) map every token to its
bytes exactly; every other tokenizer is decoded incrementally (`_decoded_pieces`). A token that starts inside a
multi-byte character (byte-level BPE splits rare characters into byte tokens, whose HF offsets overlap) has no
boundary of its own there. The text is re-tokenized with the teacher's tokenizer (`return_offsets_mapping` locates
errors), and the teacher's ids are turned into character starts the same way - which also checks that they spell
the text back (a teacher without a token for a character, or with a normalizer that changes it, cannot score it).
The spans are the pieces between consecutive character positions at which *both* tokenizations have a boundary:
the smallest runs of student tokens and teacher tokens that cover exactly the same characters.

Special tokens (the tokenizer's special ids) never enter the text: a special token in ``special_map`` (default:
the student's EOS -> the teacher's EOS) is its own span with the mapped teacher token, scored by the teacher like any
other token; an unmapped one is a span with no teacher token (``aligned=False``: no signal, masked out). Text is
re-tokenized run by run between special tokens, with ``split_special_tokens=True`` (text that looks like a teacher
special token is text). Bytes of an incomplete trailing character (a response cut off by ``max_new_tokens`` inside
a character, or right before a special token) are one unaligned span; so are the student tokens that hold bytes
which are not UTF-8 (byte-level students; one span per invalid byte sequence, the text on either side aligned as
two runs, as around an unmapped special token). Text the teacher cannot spell raises `AlignmentError` naming the row,
the student token and the character.

TOPD's probe across tokenizers (train/cross_probe.py) uses `retokenize` (a prefix written in the teacher's tokens, a
window written back in the student's) and `probe_span` (a candidate moved to its span's first student token).

Sizes: per response O(n_student + n_teacher) Python integers; nothing grows with the vocabulary.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from typing import Mapping, NamedTuple, Sequence

import torch

TOKENIZER_MODES = ("auto", "same", "cross")
PLACEMENTS = ("even", "first", "last")
_CONTEXT = 4  # tokens of left context when decoding incrementally (enough for SentencePiece-style space handling)


class AlignmentError(ValueError):
    """A response that cannot be aligned: ``row`` (as given), ``student_pos`` (index into the response's ids),
    ``char`` (index into the response text) and ``reason``."""

    def __init__(self, reason: str, *, row=None, student_pos: int | None = None, char: int | None = None,
                 context: str = ""):
        self.row, self.student_pos, self.char, self.reason = row, student_pos, char, reason
        where = f"row {row}: " if row is not None else ""
        at = f" at student token {student_pos}" if student_pos is not None else ""
        at += f" (character {char}: {context!r})" if char is not None else ""
        super().__init__(f"{where}the response cannot be aligned with the teacher's tokenizer{at}: {reason}")


class InvalidUTF8(AlignmentError):
    """Bytes that are not UTF-8 inside a response: student tokens ``[student_pos, student_end)`` hold them."""

    def __init__(self, reason: str, *, student_end: int, **kw):
        super().__init__(reason, **kw)
        self.student_end = student_end


class Span(NamedTuple):
    """Half-open index ranges: student tokens of the response, teacher tokens of `Alignment.teacher_ids`, characters
    of `Alignment.text`. ``aligned=False``: no teacher token covers it (unmapped special token, incomplete character,
    bytes that are not UTF-8)."""

    student_start: int
    student_end: int
    teacher_start: int
    teacher_end: int
    char_start: int
    char_end: int
    aligned: bool


@dataclass(frozen=True)
class Alignment:
    text: str  # the response's text, special tokens left out
    teacher_ids: list[int]  # the teacher's tokenization of the response (mapped special tokens in place)
    spans: list[Span]  # in order; every student and every teacher token in exactly one span
    n_student: int

    def student_span_index(self) -> torch.Tensor:
        """[n_student] int64: the span of each student token."""
        return _span_index([(s.student_start, s.student_end) for s in self.spans], self.n_student)

    def teacher_span_index(self) -> torch.Tensor:
        """[len(teacher_ids)] int64: the span of each teacher token."""
        return _span_index([(s.teacher_start, s.teacher_end) for s in self.spans], len(self.teacher_ids))

    def span_start(self, student_pos: int) -> int:
        """The first student token of the span holding ``student_pos`` (where that span's text begins: both
        tokenizations have a boundary there, so a prefix cut at it re-tokenizes without ambiguity)."""
        return self.spans[int(self.student_span_index()[student_pos])].student_start


class SpanSignal(NamedTuple):
    token_log_ratio: torch.Tensor  # [n_student] float64: the span values placed on the student's tokens
    mask: torch.Tensor  # [n_student] bool: the token's span has a teacher signal
    span_log_ratio: torch.Tensor  # [n_spans] float64: sum log pi_S - sum log pi_T per span (0 where unaligned)


# ---------------------------------------------------------------------------------------------------------------
# teacher.tokenizer: same | cross


class TokenizerRelation(NamedTuple):
    kind: str  # "same" or "cross"
    reason: str


def tokenizer_relation(student, teacher, *, student_rows: int | None = None,
                       teacher_rows: int | None = None) -> TokenizerRelation:
    """``same`` when both tokenizers map every token string to the same id (the models' vocabulary rows may differ:
    rows past the tokenizer's last id are padding, e.g. Qwen2.5's 152,064 vs 151,936 rows over one 151,665-token
    tokenizer); ``cross`` otherwise. ``student``/``teacher``: HF tokenizers or their ``get_vocab()`` dicts;
    ``*_rows``: the models' embedding rows, when known (a model with fewer rows than its tokenizer's ids is an error)."""
    vs, vt = _vocab(student), _vocab(teacher)
    for name, vocab, rows in (("student", vs, student_rows), ("teacher", vt, teacher_rows)):
        if rows is not None and vocab and rows <= max(vocab.values()):
            raise ValueError(f"the {name} model has {rows} vocabulary rows but its tokenizer has id "
                             f"{max(vocab.values())}: point the {name} at the tokenizer it was trained with")
    if vs == vt:
        padded = student_rows is not None and teacher_rows is not None and student_rows != teacher_rows
        return TokenizerRelation("same", f"identical vocabularies ({len(vs)} tokens)"
                                 + (f"; {student_rows} vs {teacher_rows} model rows differ only by padding" if padded else ""))
    only_s, only_t = vs.keys() - vt.keys(), vt.keys() - vs.keys()
    moved = sum(1 for k in vs.keys() & vt.keys() if vs[k] != vt[k])
    return TokenizerRelation("cross", f"vocabularies differ: {len(vs)} vs {len(vt)} tokens, {len(only_s)} only the "
                                      f"student's, {len(only_t)} only the teacher's, {moved} shared tokens with other ids")


def resolve_tokenizer_mode(setting: str, student, teacher, **rows) -> str:
    """``teacher.tokenizer`` (auto | same | cross) -> same | cross. ``same`` on vocabularies that differ is refused:
    token ids would mean different strings."""
    if setting not in TOKENIZER_MODES:
        raise ValueError(f"teacher.tokenizer={setting!r}: use one of {', '.join(TOKENIZER_MODES)}")
    detected = tokenizer_relation(student, teacher, **rows)
    if setting == "same" and detected.kind == "cross":
        raise ValueError(f"teacher.tokenizer=same, but the student's and the teacher's tokenizers differ "
                         f"({detected.reason}): use teacher.tokenizer=cross (or auto)")
    return detected.kind if setting == "auto" else setting


def _vocab(tok) -> dict[str, int]:
    return dict(tok) if isinstance(tok, Mapping) else tok.get_vocab()


# ---------------------------------------------------------------------------------------------------------------
# alignment


def default_special_map(student_tok, teacher_tok) -> dict[int, int]:
    """The student's EOS -> the teacher's EOS (the end of a response is a token both models predict), else empty."""
    s, t = student_tok.eos_token_id, teacher_tok.eos_token_id
    return {int(s): int(t)} if s is not None and t is not None else {}


def special_ids(tok) -> set[int]:
    """Ids kept out of the text: the tokenizer's special tokens (named ones and added tokens marked special)."""
    ids = set(tok.all_special_ids)
    ids.update(i for i, added in getattr(tok, "added_tokens_decoder", {}).items() if getattr(added, "special", False))
    return ids


def align_responses(responses: Sequence[Sequence[int]], student_tok, teacher_tok, *,
                    special_map: Mapping[int, int] | None = None, errors: str = "raise") -> list[Alignment | AlignmentError]:
    """`align_response` per row (``row`` = the index). ``errors="mask"`` returns a row's `AlignmentError` in its
    place instead of raising (the caller drops that row from the loss and counts it)."""
    if errors not in ("raise", "mask"):
        raise ValueError(f"errors={errors!r}: use 'raise' or 'mask'")
    out: list[Alignment | AlignmentError] = []
    for row, ids in enumerate(responses):
        try:
            out.append(align_response(ids, student_tok, teacher_tok, special_map=special_map, row=row))
        except AlignmentError as exc:
            if errors == "raise":
                raise
            out.append(exc)
    return out


def align_response(student_ids: Sequence[int], student_tok, teacher_tok, *,
                   special_map: Mapping[int, int] | None = None, row=None) -> Alignment:
    """Re-tokenize a student response with the teacher's tokenizer and align the two (module docstring)."""
    ids = [int(i) for i in student_ids]
    special_map = default_special_map(student_tok, teacher_tok) if special_map is None else dict(special_map)
    specials = special_ids(student_tok)
    text, teacher_ids, spans = [], [], []
    chars = 0
    i = 0
    while i < len(ids):
        if ids[i] in specials:
            mapped = special_map.get(ids[i])
            t0 = len(teacher_ids)
            if mapped is not None:
                teacher_ids.append(int(mapped))
            spans.append(Span(i, i + 1, t0, len(teacher_ids), chars, chars, mapped is not None))
            i += 1
            continue
        j = i
        while j < len(ids) and ids[j] not in specials:
            j += 1
        while i < j:  # the run, less the tokens that hold bytes which are not UTF-8 (each an unaligned span)
            try:
                run_text, run_teacher, run_spans = _align_run(ids[i:j], student_tok, teacher_tok, row=row, offset=i,
                                                              char_offset=chars, teacher_offset=len(teacher_ids))
                end = j
            except InvalidUTF8 as bad:
                head = bad.student_pos
                run_text, run_teacher, run_spans = _align_run(ids[i:head], student_tok, teacher_tok, row=row,
                                                              offset=i, char_offset=chars,
                                                              teacher_offset=len(teacher_ids)) if head > i else ("", [], [])
                end = bad.student_end
                run_spans.append(Span(head, end, len(teacher_ids) + len(run_teacher), len(teacher_ids) + len(run_teacher),
                                      chars + len(run_text), chars + len(run_text), False))
            text.append(run_text)
            teacher_ids.extend(run_teacher)
            spans.extend(run_spans)
            chars += len(run_text)
            i = end
    return Alignment("".join(text), teacher_ids, spans, len(ids))


def _align_run(ids: list[int], student_tok, teacher_tok, *, row, offset: int, char_offset: int,
               teacher_offset: int) -> tuple[str, list[int], list[Span]]:
    """One run of ordinary student tokens: (its text, the teacher's ids for it, its spans in response coordinates)."""
    s = token_pieces(ids, student_tok, row=row, offset=offset)
    text = s.text
    enc = teacher_tok(text, add_special_tokens=False, return_offsets_mapping=True, split_special_tokens=True)
    t_ids, t_offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    bad = special_ids(teacher_tok) | ({teacher_tok.unk_token_id} if teacher_tok.unk_token_id is not None else set())
    for k, tid in enumerate(t_ids):
        if tid in bad:
            c = int(t_offsets[k][0])
            raise AlignmentError(f"the teacher's tokenizer has no token for {text[c:t_offsets[k][1]]!r} (it gives "
                                 f"{teacher_tok.convert_ids_to_tokens(tid)!r})", row=row,
                                 student_pos=offset + _token_at(s.starts[: s.tail], c), char=char_offset + c,
                                 context=text[max(0, c - 10): c + 10])
    t = token_pieces(t_ids, teacher_tok, row=row)
    if t.text != text or t.tail != len(t_ids):
        c = next((k for k, (a, b) in enumerate(zip(t.text, text)) if a != b), min(len(t.text), len(text)))
        raise AlignmentError(f"the teacher's tokens spell {t.text[c:c + 10]!r} where the response has "
                             f"{text[c:c + 10]!r} (a normalizer or a missing character)", row=row,
                             student_pos=offset + _token_at(s.starts[: s.tail], c), char=char_offset + c,
                             context=text[max(0, c - 10): c + 10])
    spans = [Span(offset + a, offset + b, teacher_offset + c, teacher_offset + d, char_offset + x, char_offset + y, d > c)
             for a, b, c, d, x, y in align_pieces(s, t)]
    if s.tail < len(ids):
        spans.append(Span(offset + s.tail, offset + len(ids), teacher_offset + len(t_ids), teacher_offset + len(t_ids),
                          char_offset + len(text), char_offset + len(text), False))
    return text, t_ids, spans


def _token_at(starts: list[int], c: int) -> int:
    """The last token starting at or before character ``c``."""
    k = 0
    while k + 1 < len(starts) and starts[k + 1] <= c:
        k += 1
    return k


class Pieces(NamedTuple):
    """What a token sequence spells: ``text`` (its complete characters), per token ``starts`` (the character where
    its text begins; a token that begins inside a character gets that character and ``clean=False``), and ``tail``:
    tokens ``[tail:]`` only add bytes of an incomplete last character (not part of ``text``)."""

    text: str
    starts: list[int]
    clean: list[bool]
    tail: int


def boundaries(p: Pieces) -> set[int]:
    """Character positions at which the tokenization has a boundary (0 and the end included)."""
    return {c for c, ok in zip(p.starts[: p.tail], p.clean) if ok} | {0, len(p.text)}


def align_pieces(s: Pieces, t: Pieces) -> list[tuple[int, int, int, int, int, int]]:
    """Spans of two tokenizations of one text, as (student start, end, teacher start, end, char start, end): between
    consecutive common boundaries; tokens go to the span holding their start (zero-width ones at the end: the last)."""
    if s.text != t.text:
        raise ValueError("align_pieces needs two tokenizations of one text")
    if not s.text:  # nothing to align: any tokens spell nothing
        return [(0, s.tail, 0, t.tail, 0, 0)] if s.tail or t.tail else []
    cuts = sorted(boundaries(s) & boundaries(t))
    out, i, j = [], 0, 0
    for k in range(len(cuts) - 1):
        b, last = cuts[k + 1], k == len(cuts) - 2
        i2, j2 = i, j
        while i2 < s.tail and (last or s.starts[i2] < b):
            i2 += 1
        while j2 < t.tail and (last or t.starts[j2] < b):
            j2 += 1
        out.append((i, i2, j, j2, cuts[k], b))
        i, j = i2, j2
    return out


def token_pieces(ids: Sequence[int], tok, *, row=None, offset: int = 0, byte_level: bool | None = None) -> Pieces:
    """`Pieces` of ordinary (non-special) tokens: exact byte arithmetic for byte-level BPE tokenizers, incremental
    decoding otherwise (``byte_level=False`` forces the latter; tests compare the two)."""
    ids = [int(i) for i in ids]
    if byte_level is None:
        byte_level = _is_byte_level(tok)
    if byte_level:
        chunks = _byte_chunks(ids, tok)
        if chunks is not None:
            return _pieces_from_bytes(chunks, row=row, offset=offset)
    return _decoded_pieces(ids, tok)


def _is_byte_level(tok) -> bool:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        return False
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("type") == "ByteLevel"


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable character each byte is written as in a byte-level vocab."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _byte_chunks(ids: list[int], tok) -> list[bytes] | None:
    """Each token's bytes (added tokens: their content, verbatim); None when a token is not byte-level encoded."""
    table = _unicode_to_byte()
    added = {i: a.content for i, a in getattr(tok, "added_tokens_decoder", {}).items()}
    out = []
    for i, piece in zip(ids, tok.convert_ids_to_tokens(ids)):
        if i in added:
            out.append(added[i].encode("utf-8"))
            continue
        if piece is None or any(c not in table for c in piece):
            return None
        out.append(bytes(table[c] for c in piece))
    return out


def _pieces_from_bytes(chunks: list[bytes], *, row, offset: int) -> Pieces:
    data = b"".join(chunks)
    byte_starts, pos = [], 0
    for c in chunks:
        byte_starts.append(pos)
        pos += len(c)
    try:
        text, valid = data.decode("utf-8"), len(data)
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":  # invalid bytes inside the response
            k = max(n for n, b in enumerate(byte_starts) if b <= exc.start)
            end = max(n for n, b in enumerate(byte_starts) if b < exc.end) + 1
            text = data[: exc.start].decode("utf-8", errors="replace")
            raise InvalidUTF8(f"its bytes are not UTF-8 ({exc.reason}: {data[exc.start:exc.end]!r})", row=row,
                              student_pos=offset + k, student_end=offset + end, char=len(text),
                              context=text[-20:]) from None
        text, valid = data[: exc.start].decode("utf-8"), exc.start
    char_at = []  # character index of every byte of the complete text, and whether the byte starts it
    for n, ch in enumerate(text):
        width = len(ch.encode("utf-8"))
        char_at.extend([(n, True)] + [(n, False)] * (width - 1))
    char_at.append((len(text), True))
    starts, clean = [], []
    tail = len(chunks)
    for k, b in enumerate(byte_starts):
        if b + len(chunks[k]) > valid and tail == len(chunks):
            tail = k  # from here on the tokens reach into the incomplete character
        n, ok = char_at[min(b, valid)]
        starts.append(n)
        clean.append(ok)
    if tail < len(chunks):  # tokens that began inside the character the tail token began in belong to the tail too
        cut = starts[tail]
        while tail > 0 and starts[tail - 1] >= cut:
            tail -= 1
        text = text[:cut]
    return Pieces(text, starts[:tail], clean[:tail], tail)


def _decoded_pieces(ids: list[int], tok, *, exact: bool = False) -> Pieces:
    """Incremental decoding: each token's text is what decoding with it adds to decoding without it (with
    ``_CONTEXT`` tokens of left context; ``exact``: the whole prefix). A token whose text ends in U+FFFD (an
    incomplete character) waits for the next: all waiting tokens start where the completed text starts, and only the
    first of them has a boundary there. Checked against decoding the whole run; on a mismatch, redone exactly."""
    def dec(x):
        return tok.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    parts, starts, clean, waiting = [], [], [], []
    pos, prefix, read = 0, 0, 0
    for i in range(len(ids)):
        before, after = dec(ids[prefix:read]), dec(ids[prefix:i + 1])
        if not after.startswith(before):  # the left context decodes differently once this token follows
            if exact:
                raise ValueError(f"{type(tok).__name__}: decoding token {i} changes the text before it")
            return _decoded_pieces(ids, tok, exact=True)
        if after.endswith("\ufffd"):
            waiting.append(i)
            continue
        delta = after[len(before):]
        for n, k in enumerate(waiting + [i]):
            starts.append(pos)
            clean.append(n == 0)
        waiting = []
        parts.append(delta)
        pos += len(delta)
        read = i + 1
        prefix = 0 if exact else max(0, read - _CONTEXT)
    text = "".join(parts)
    tail = len(ids) - len(waiting)
    if not exact and dec(ids[:tail]) != text:
        return _decoded_pieces(ids, tok, exact=True)
    return Pieces(text, starts, clean, tail)


# ---------------------------------------------------------------------------------------------------------------
# the probe across tokenizers (TOPD): prefixes into the teacher's tokens, windows back into the student's


def retokenize(ids: Sequence[int], from_tok, to_tok, *, special_map: Mapping[int, int] | None = None, row=None) -> list[int]:
    """The text of ``ids`` (``from_tok``'s tokens) in ``to_tok``'s tokens: `align_response` with the roles as given,
    so a special token maps through ``special_map`` (default: EOS -> EOS) or drops out, bytes that are not UTF-8 and
    an incomplete last character drop out, and text ``to_tok`` cannot spell raises `AlignmentError`. The probe
    writes the student's prefix in the teacher's tokens with it, and the teacher's window in the student's."""
    return align_response(ids, from_tok, to_tok, special_map=special_map, row=row).teacher_ids


def probe_span(alignment: Alignment, t: int) -> range | None:
    """The student tokens of the span holding response token ``t``: a candidate at t is probed from the span's
    first token, so the probe's prefix ends where both tokenizations have a boundary (a prefix cut inside a span -
    student "1" of teacher "12" - would hand the teacher a tokenization it never sees, "1" followed by "2"), and its
    suppression weight covers all of them (the span's signal is spread over them). None when the span has no
    teacher signal (unmapped special token, bytes that are not UTF-8, an incomplete last character)."""
    span = alignment.spans[int(alignment.student_span_index()[t])]
    return range(span.student_start, span.student_end) if span.aligned else None


def probe_position(alignment: Alignment, t: int) -> int | None:
    """Where a candidate at response token ``t`` is probed: the first student token of its span (`probe_span`)."""
    span = probe_span(alignment, t)
    return None if span is None else span.start


# ---------------------------------------------------------------------------------------------------------------
# the span-level signal


def span_log_ratio(alignment: Alignment, student_logprobs, teacher_logprobs, *, placement: str = "even") -> SpanSignal:
    """Span-level sampled-token reverse-KL estimate: per aligned span k, ``d_k = sum log pi_S(student tokens of k) -
    sum log pi_T(teacher tokens of k)`` - a one-sample estimate of KL(pi_S || pi_T) over the span's text, since both
    sums are log-probabilities of the same string given the same text before it. Placed on the student's tokens:

    - ``even`` (default): ``d_k / n_k`` on each of the span's ``n_k`` student tokens. Where both tokenizations agree
      (spans of one token each) it is the token-level estimator ``log pi_S(y_t) - log pi_T(y_t)`` exactly; in a
      longer span the teacher does not say how its log-probability splits over the student's tokens, and the mean
      is the guess that favours none of them: every token of the span gets the same push (under the policy-gradient
      form of `train/estimators.py`, ``d_k / n_k * grad log pi_S(y_t)`` on each), so a 5-character teacher token
      scored against 5 character tokens is blamed on all 5, not on one of them.
    - ``first`` / ``last``: all of ``d_k`` on the span's first / last student token (the others get 0 and stay in
      the mask). Concentrates the whole span's gradient on one token: kept for comparison.

    Any placement sums, over a response, to ``sum_t log pi_S - sum_t' log pi_T`` over its aligned spans - the
    sequence-level log-ratio when every span is aligned. Unaligned spans get 0 and ``mask=False``.
    ``student_logprobs`` [n_student], ``teacher_logprobs`` [len(teacher_ids)]: per token, each model's log-prob of
    that token given everything before it (the teacher's from its own tokenization, prompt in its own chat template)."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement={placement!r}: use one of {', '.join(PLACEMENTS)}")
    s = torch.as_tensor(student_logprobs, dtype=torch.float64).reshape(-1)
    t = torch.as_tensor(teacher_logprobs, dtype=torch.float64).reshape(-1)
    if s.numel() != alignment.n_student or t.numel() != len(alignment.teacher_ids):
        raise ValueError(f"{s.numel()} student and {t.numel()} teacher log-probs for an alignment of "
                         f"{alignment.n_student} student and {len(alignment.teacher_ids)} teacher tokens")
    n_spans = len(alignment.spans)
    s_idx, t_idx = alignment.student_span_index(), alignment.teacher_span_index()
    aligned = torch.tensor([sp.aligned for sp in alignment.spans], dtype=torch.bool)
    d = torch.zeros(n_spans, dtype=torch.float64).index_add_(0, s_idx, s)
    d = d.index_add_(0, t_idx, -t)
    d = torch.where(aligned, d, torch.zeros_like(d))
    if placement == "even":
        counts = torch.tensor([sp.student_end - sp.student_start for sp in alignment.spans], dtype=torch.float64)
        token = (d / counts.clamp(min=1))[s_idx]
    else:
        token = torch.zeros(alignment.n_student, dtype=torch.float64)
        at = [(sp.student_start if placement == "first" else sp.student_end - 1) for sp in alignment.spans]
        for k, p in enumerate(at):
            if alignment.spans[k].student_end > alignment.spans[k].student_start:
                token[p] = d[k]
    return SpanSignal(token, aligned[s_idx], d)


def teacher_logprobs_on_student_tokens(signal: SpanSignal, student_logprobs) -> torch.Tensor:
    """[n_student]: ``log pi_S(y_t) - placed d``, the per-student-token "teacher log-prob" that makes the token-level
    ``sampled`` estimator (l_t = log pi_S - log pi_T, `train/estimators.py`) reproduce the span-level signal: with
    the trainer's own log-probs ``log pi_S'`` it gives ``l_t = log pi_S'(y_t) - log pi_S(y_t) + placed d``, which sums
    over a span to ``sum log pi_S' - sum log pi_T`` exactly. Masked tokens get their own log-prob (l_t = 0); give
    them loss weight 0."""
    s = torch.as_tensor(student_logprobs, dtype=torch.float64).reshape(-1)
    return torch.where(signal.mask, s - signal.token_log_ratio, s)


def _span_index(ranges: list[tuple[int, int]], n: int) -> torch.Tensor:
    idx = torch.full((n,), -1, dtype=torch.int64)
    for k, (a, b) in enumerate(ranges):
        idx[a:b] = k
    if n and int(idx.min()) < 0:
        raise AssertionError("an alignment left a token out of every span")
    return idx
