"""`OpenAICompletionsClient`: a teacher's scores from an OpenAI-compatible ``/v1/completions`` endpoint (vLLM,
SGLang's own, a hosted API that takes token-id prompts), for `teacher.api: openai` (docs/remote_teacher.md).

Scoring only: each sequence is one request ``{"prompt": ids, "max_tokens": 1, "echo": true, "logprobs": k}``; the
answer's ``logprobs.token_logprobs`` holds the log-prob of every prompt token given the ones before it (None for the
first), then the one generated token's (ignored: SGLang 0.5.23 refuses ``max_tokens: 0``), and ``top_logprobs`` the
server's top-k per position, keyed by token *text*. So the top-k comes back as values
without ids: enough to renormalise at a temperature (`train/teacher.py`), not for `teacher.kl: topk`. ``k`` is at
least 1 on the wire (SGLang 0.5.23 returns prompt log-probs only when ``echo and logprobs``, and 0 is falsy) and at
most ``max_top_k``, the cap the server enforces (vLLM's ``--max-logprobs`` defaults to 20): asking for more is an
error here, before any request. Retries with backoff, load balancing and per-attempt timeouts are the SGLang
client's (`pool.post_json`); what the server answers is checked (one log-prob per token sent, the ids when the
server returns them, finite log-probs <= 0).
"""
from __future__ import annotations

import os
from typing import Any

from .client import Score, SGLangClient, _logprob, _short
from .errors import InvalidResponse
from .pool import post_json

COMPLETIONS_PATH = "/v1/completions"


class OpenAICompletionsClient(SGLangClient):
    """`SGLangClient.ascore` / `score` over ``/v1/completions`` (same validation, retries and results: `Score`,
    with ``top_logprobs`` as ``(-1, log-prob)`` pairs best first, the ids unknown). ``model``: the request's model
    name; ``api_key_env``: an environment variable holding a key, sent as ``Authorization: Bearer``."""

    def __init__(self, urls, *, model: str = "default", max_top_k: int = 20, api_key_env: str = "", **kw):
        super().__init__(urls, **kw)
        if isinstance(max_top_k, bool) or not isinstance(max_top_k, int) or max_top_k < 1:
            raise ValueError(f"max_top_k={max_top_k!r}: the server's cap on logprobs, an integer >= 1")
        self.model, self.max_top_k, self.api_key_env = model, max_top_k, api_key_env
        self.headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env, "")
            if not key:
                raise ValueError(f"teacher.api_key_env={api_key_env}: that environment variable is not set here")
            self.headers = {"Authorization": f"Bearer {key}"}

    async def agenerate(self, *args, **kw):
        raise NotImplementedError("an OpenAI-compatible teacher only scores (teacher.api=openai): the teacher's "
                                  "windows and held-out evaluation need SGLang's /generate (teacher.api=sglang)")

    async def ascore(self, sequences, *, start=1, top_logprobs: int = 0) -> list[Score]:
        if top_logprobs > self.max_top_k:
            raise ValueError(f"top-{top_logprobs} log-probs asked of {', '.join(self.urls)}, which allows at most "
                             f"{self.max_top_k} (teacher.api_max_top_k): lower teacher.top_k to {self.max_top_k}, or "
                             "raise teacher.api_max_top_k if the server allows more (vLLM: --max-logprobs)")
        return await super().ascore(sequences, start=start, top_logprobs=top_logprobs)

    async def _score_one(self, session, call, index, seq, start, top_logprobs) -> Score:
        where = f"score sequence {index} ({COMPLETIONS_PATH})"
        body = {"model": self.model, "prompt": seq, "max_tokens": 1, "echo": True,
                "logprobs": max(1, top_logprobs), "temperature": 0.0}

        def check(answer: Any, attempt: int) -> Score:
            choices = answer.get("choices") if isinstance(answer, dict) else None
            if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
                raise InvalidResponse(f"{where}: expected one choice, got {_short(answer)}")
            choice = choices[0]
            lps = choice.get("logprobs") or {}
            values = lps.get("token_logprobs")
            want = len(seq) + 1  # the prompt echoed, then the one generated token
            if not isinstance(values, list) or len(values) != want:
                raise InvalidResponse(f"{where}: expected {want} token_logprobs (the {len(seq)} tokens sent, echoed, "
                                      f"and one generated), got {_short(values)}")
            ids = choice.get("prompt_token_ids")  # SGLang / vLLM with return_token_ids; not every server sends it
            if ids is not None and list(ids) != list(seq):
                raise InvalidResponse(f"{where}: the scored token ids differ from the sequence sent")
            tops = None
            if top_logprobs:
                raw = lps.get("top_logprobs")
                if not isinstance(raw, list) or len(raw) != want:
                    raise InvalidResponse(f"{where}: expected {want} top_logprobs, got {_short(raw)}")
                tops = [_top_values(raw[i], top_logprobs, where) for i in range(start, len(seq))]
            return Score(start, [_logprob(v, where) for v in values[start:len(seq)]], tops, "")

        return await post_json(session, self.pool, COMPLETIONS_PATH, lambda attempt: body, check, what=where,
                               max_retries=self.max_retries, backoff_s=self.retry_backoff_s, timeout=self.timeout,
                               headers=self.headers)


def _top_values(row: Any, k: int, where: str) -> list[tuple[int, float]]:
    """One position's top-k as ``(-1, log-prob)`` best first. Keys are token texts, so two tokens that render to one
    text keep one entry: a position with fewer than k entries is refused (its tail would be over-counted)."""
    if not isinstance(row, dict) or len(row) < k:
        raise InvalidResponse(f"{where}: expected {k} top log-probs per position, got {_short(row)} (token texts "
                              "that collide leave fewer entries: ask for fewer)")
    values = sorted((_logprob(v, where) for v in row.values()), reverse=True)[:k]
    return [(-1, v) for v in values]
