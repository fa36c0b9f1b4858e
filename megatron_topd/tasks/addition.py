"""Multi-digit addition with a digit-by-digit chain of thought: the demo's and the experiment's reasoning task.

Why this task: it is built offline in a second, has an exact-answer checker, and its chain of thought is a
*trajectory*: one wrong carry early on derails every later step, which is what TOPD's near-future probe is about.

    prompt    "4071+0968="
    response  "1+8+0=09;7+6+0=13;0+9+1=10;4+0+1=05;>05039" then EOS

Each step adds the operands' digits from the least significant one with the carry in (``a+b+c=cs``: carry out,
sum digit); after ``>`` the answer is written most significant digit first, zero-padded to digits + 1 characters.
Operands are zero-padded in the prompt so every problem has the same length. One character is one token
(`build_tokenizer`); the answer's checker reads what follows the last ``>``.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

SYMBOLS = tuple("0123456789+=;>")
# Ids 0-2 are the specials every model config of the project names (pad, bos, eos); the last id is never used:
# SGLang's CPU path scores input id V-1 as id 0 (docs/rollout.md), so the vocabulary keeps it free.
SPECIALS = ("<pad>", "<bos>", "<eos>")
UNUSED = "<unused>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
VOCAB_SIZE = len(SPECIALS) + len(SYMBOLS) + 1


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    def key(self) -> tuple[int, int]:
        return self.a, self.b


@dataclass(frozen=True)
class AdditionTask:
    digits: int = 4

    def prompt(self, p: Problem) -> str:
        return f"{p.a:0{self.digits}d}+{p.b:0{self.digits}d}="

    def solution(self, p: Problem) -> str:
        """The reference chain of thought and answer (the SFT target; EOS is added by the tokenizer side)."""
        a, b = f"{p.a:0{self.digits}d}"[::-1], f"{p.b:0{self.digits}d}"[::-1]
        steps, carry = [], 0
        for da, db in zip(a, b):
            s = int(da) + int(db) + carry
            steps.append(f"{da}+{db}+{carry}={s // 10}{s % 10};")
            carry = s // 10
        return "".join(steps) + f">{p.a + p.b:0{self.digits + 1}d}"

    def answer(self, p: Problem) -> str:
        return f"{p.a + p.b:0{self.digits + 1}d}"

    @staticmethod
    def extract_answer(response: str) -> str | None:
        """What follows the last '>' (None when the response never reached an answer)."""
        if ">" not in response:
            return None
        return response.rsplit(">", 1)[1].strip()

    def is_correct(self, response: str, answer: str) -> bool:
        return self.extract_answer(response) == answer

    def problems(self, n: int, seed: int, exclude: set[tuple[int, int]] = frozenset()) -> list[Problem]:
        """`n` distinct random problems, none of them in `exclude` (held-out problems stay unseen)."""
        rng = random.Random(seed)
        hi = 10 ** self.digits - 1
        seen, out = set(exclude), []
        if n > (hi + 1) ** 2 - len(seen):
            raise ValueError(f"{n} problems asked of a {self.digits}-digit task with fewer distinct problems left")
        while len(out) < n:
            p = Problem(rng.randint(0, hi), rng.randint(0, hi))
            if p.key() not in seen:
                seen.add(p.key())
                out.append(p)
        return out

    def split(self, n_train: int, n_heldout: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
        heldout = self.problems(n_heldout, seed=seed + 1)
        return self.problems(n_train, seed=seed + 2, exclude={p.key() for p in heldout}), heldout

    def write_jsonl(self, problems: list[Problem], path: str | Path, *, with_solution: bool = False) -> Path:
        """Rows {"prompt", "answer"[, "solution"]}: the trainer's prompt file and the evaluation's held-out file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            for p in problems:
                row = {"prompt": self.prompt(p), "answer": self.answer(p)}
                if with_solution:
                    row["solution"] = self.solution(p)
                f.write(json.dumps(row) + "\n")
        return path


def build_tokenizer(out_dir: str | Path) -> Path:
    """A character-level HF tokenizer over the task's symbols (one character = one token), saved to `out_dir`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate((*SPECIALS, *SYMBOLS, UNUSED))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=SPECIALS[PAD_ID]))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=SPECIALS[PAD_ID], bos_token=SPECIALS[BOS_ID],
                                   eos_token=SPECIALS[EOS_ID], unk_token=SPECIALS[PAD_ID],
                                   additional_special_tokens=[UNUSED])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    return out
