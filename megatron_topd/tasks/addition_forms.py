"""Addition whose chain of thought has equivalent surface forms: the task where TOPD's two regimes both exist.

Each step of the demo's chain (`addition.py`) may be written in any of three forms that say the same thing with the
same tokens in another order (digit a, digit b, carry in; carry out c, sum digit s):

    ab         a+b+c=cs;      "1+8+0=09;"
    ba         b+a+c=cs;      "8+1+0=09;"
    sum_first  cs=a+b+c;      "09=1+8+0;"

then ``>`` and the answer as in the demo. Forms are chosen per step, so a chain mixes them freely; a model trained on
a mixture (`sample_solution`) has a preferred form, and a student trained on another mixture leaves the teacher's
form at the first token of a step *without being wrong* (a surface-form mismatch). A wrong digit or carry is a real
fork: every later step inherits it. The checker (`is_correct`, the answer after the last ``>``) accepts every form;
`next_tokens` knows the exact set of correct continuations of any prefix, which gives each probed position its
ground-truth label (`candidate_label`):

    surface    the prefix is on a correct chain and the token is one of several correct next tokens (a form choice)
    divergent  the prefix is on a correct chain and the token leaves every correct chain (a wrong digit or carry)
    neither    anything else: the only correct token, or a prefix already off every correct chain
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

from megatron_topd.tasks.addition import AdditionTask, Problem

FORMS = ("ab", "ba", "sum_first")
END = "<eos>"  # the end of the response: the only correct next token once the answer is written
LABELS = ("surface", "divergent", "neither")


@dataclass(frozen=True)
class AdditionFormsTask(AdditionTask):
    """`AdditionTask` (same prompts, answers, checker, problem split and files) with three forms per chain step."""

    def step_options(self, p: Problem) -> list[tuple[str, ...]]:
        """Per step (least significant digit first), the step's text in each of `FORMS`, each ending in ';'."""
        a, b = f"{p.a:0{self.digits}d}"[::-1], f"{p.b:0{self.digits}d}"[::-1]
        out, carry = [], 0
        for da, db in zip(a, b):
            s = int(da) + int(db) + carry
            cs = f"{s // 10}{s % 10}"
            out.append((f"{da}+{db}+{carry}={cs};", f"{db}+{da}+{carry}={cs};", f"{cs}={da}+{db}+{carry};"))
            carry = s // 10
        return out

    def solution(self, p: Problem, forms: Sequence[str] | None = None) -> str:
        """The chain with step i written in ``forms[i]`` (default: every step ``ab``, the demo's chain)."""
        options = self.step_options(p)
        forms = ["ab"] * len(options) if forms is None else list(forms)
        if len(forms) != len(options) or any(f not in FORMS for f in forms):
            raise ValueError(f"forms={forms!r}: give one of {', '.join(FORMS)} per step ({len(options)} steps)")
        return "".join(o[FORMS.index(f)] for o, f in zip(options, forms)) + ">" + self.answer(p)

    def sample_solution(self, p: Problem, rng: random.Random, weights: Sequence[float]) -> str:
        """A chain whose steps' forms are drawn independently with ``weights`` (one per form of `FORMS`)."""
        if len(weights) != len(FORMS) or any(w < 0 for w in weights) or sum(weights) <= 0:
            raise ValueError(f"form weights {list(weights)!r}: give {len(FORMS)} non-negative numbers "
                             f"(for {', '.join(FORMS)}), not all zero")
        return self.solution(p, rng.choices(FORMS, weights=weights, k=self.digits))

    def next_tokens(self, p: Problem, text: str) -> set[str]:
        """Every character that continues ``text`` (a response prefix) along some correct chain, `END` once the
        answer is complete; the empty set when ``text`` is already off every correct chain."""
        pos = 0
        for options in self.step_options(p):
            rest = text[pos:]
            whole = [o for o in options if rest.startswith(o)]
            if whole:  # the forms of a step have one length, so at most one text matches it whole
                pos += len(whole[0])
                continue
            return {o[len(rest)] for o in options if o.startswith(rest)}
        rest, tail = text[pos:], ">" + self.answer(p)
        if rest == tail:
            return {END}
        return {tail[len(rest)]} if tail.startswith(rest) else set()

    def chain_is_correct(self, p: Problem, response: str) -> bool:
        """The whole response is a correct chain in any mixture of forms, ending with the right answer."""
        return self.next_tokens(p, response) == {END}

    def candidate_label(self, p: Problem, prefix: str, token: str) -> str:
        """The ground-truth label of the response token ``token`` (one character, or `END`) written after ``prefix``
        (see the module doc)."""
        allowed = self.next_tokens(p, prefix)
        if not allowed:
            return "neither"
        if token not in allowed:
            return "divergent"
        return "surface" if len(allowed) > 1 else "neither"

    def problem_from_prompt(self, prompt: str) -> Problem:
        """The problem a prompt states ("0071+0968=" -> Problem(71, 968)); a clear error for anything else."""
        body = prompt.strip()
        a, sep, b = body.rstrip("=").partition("+")
        if not (body.endswith("=") and sep and a.isdigit() and b.isdigit()):
            raise ValueError(f"prompt {prompt!r} is not an addition prompt such as '0071+0968='")
        return Problem(int(a), int(b))
