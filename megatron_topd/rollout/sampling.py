"""`SamplingParams`: what one generation call asks for, checked before anything is sent.

SGLang rejects some bad values itself (HTTP 400) but not all, and a token id outside the vocabulary crashes the whole
server (IndexError in the embedding, then the scheduler dies): so everything is validated on the client first.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    n: int = 1
    temperature: float = 1.0  # 0.0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    seed: int | None = None  # per-sample seeds derive from it (honoured by servers run with deterministic inference)
    stream: str = ""  # names what is sampled ("" = rollouts, "window" = TOPD windows): same seed, other streams
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def validate(self, vocab_size: int | None = None) -> "SamplingParams":
        """Raise ValueError naming the bad field and the fix; return self."""
        _int_at_least("max_new_tokens", self.max_new_tokens, 0, "(0 scores the prompt without generating)")
        _int_at_least("n", self.n, 1)
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature={t!r}: use a finite number >= 0 (0 = greedy)")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p={p!r}: use a number in (0, 1] (1 = off)")
        if self.top_k != -1:
            _int_at_least("top_k", self.top_k, 1, "(or -1 for off)")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**62:
                raise ValueError(f"seed={self.seed!r}: use an integer in [0, 2**62) or None")
        for i, tok in enumerate(self.stop_token_ids):
            if isinstance(tok, bool) or not isinstance(tok, int) or tok < 0 or (vocab_size and tok >= vocab_size):
                raise ValueError(f"stop_token_ids[{i}]={tok!r}: use token ids in [0, {vocab_size or 'vocab_size'})")
        return self

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def for_sample(self, prompt_index: int, sample_index: int) -> dict:
        """SGLang `sampling_params` of one sample (n is expanded by the client, one request entry per sample)."""
        out = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": float(self.temperature),
            "top_p": float(self.top_p),
            "top_k": self.top_k,
            "ignore_eos": self.ignore_eos,
        }
        if self.stop_token_ids:
            out["stop_token_ids"] = list(self.stop_token_ids)
        if self.seed is not None:
            out["sampling_seed"] = derive_seed(self.seed, prompt_index, sample_index, self.stream)
        return out


def derive_seed(seed: int, prompt_index: int, sample_index: int, stream: str = "") -> int:
    """A distinct, reproducible seed per (prompt, sample): n samples of one prompt must not share a seed.

    ``prompt_index`` is the prompt's position in one client call, so callers vary ``seed`` per call (the training
    loop uses ``seed * 100003 + step``). ``stream`` separates kinds of sampling that may be given equal integer seeds
    (rollouts and TOPD windows): with another stream every derived seed differs."""
    key = f"{seed}:{prompt_index}:{sample_index}" if not stream else f"{stream}:{seed}:{prompt_index}:{sample_index}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # [0, 2**62): fits SGLang's int64 check


def _int_at_least(name: str, value: object, lo: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name}={value!r}: use an integer >= {lo} {note}".rstrip())
