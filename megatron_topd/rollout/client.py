"""`SGLangClient`: batched generation, teacher scoring and TOPD continuation windows over SGLang's HTTP API.

Token ids in, token ids out (the trainer owns tokenization). Every call validates its inputs before sending anything
(an out-of-range id or an empty prompt crashes an SGLang server), spreads one HTTP request per prompt (for the
probe's windows: per family of prefixes, `window_request_plan`) over the servers (`ServerPool`), retries failed
requests elsewhere, and validates every answer: each sample carries a request id (rid) of its own, and an answer is
accepted only if it holds exactly the rids that were sent, in order. A call therefore returns every requested sample
exactly once, or raises.

Sync methods (`generate`, `score`, `continue_prefixes`) wrap the async ones (`agenerate`, `ascore`) for callers that
are not in an event loop, such as the training loop. `continue_prefixes` implements `topd.sampler.ContinuationSampler`.
"""
from __future__ import annotations

import asyncio
import copy
import dataclasses
import itertools
import json
import math
import os
import secrets
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import aiohttp

from .auth import auth_headers
from .errors import InvalidResponse
from .logprob_decode import split_logprobs, split_top_logprobs
from .pool import Retryable, ServerPool, post_json
from .sampling import SamplingParams
from .validation import check_token_sequences

FINISH_REASONS = ("stop", "length", "abort")
_CALLS = itertools.count()


@dataclass
class Generation:
    """One sampled response."""

    token_ids: list[int]  # new tokens only; ends with the EOS/stop id when finish_reason == "stop"
    logprobs: list[float] | None  # log-prob of each token under the server's (unscaled) distribution
    top_logprobs: list[list[tuple[int, float]]] | None  # per position: (token id, log-prob), best first
    finish_reason: str  # "stop" | "length"
    weight_version: str  # the server's weight version when the request finished
    prompt_tokens: int
    server: str = ""  # URL of the server that generated it (its radix cache holds the sequence's KV for a while)


@dataclass
class RequestJob:
    """HTTP requests (lists of prompt indices) sent one after another to one server: ``server`` for the first one
    when it is up and free (None: the least-loaded), then wherever the previous one went, so that a request whose
    prompts extend an earlier one's finds their KV in that server's radix cache."""

    requests: list[list[int]]
    server: str | None = None


@dataclass
class Score:
    """Log-probs of given tokens (teacher scoring): position i scores token `start + i` given all tokens before it."""

    start: int
    token_logprobs: list[float]
    top_logprobs: list[list[tuple[int, float]]] | None
    weight_version: str


class SGLangClient:
    """Client of one or more SGLang servers serving the same model."""

    def __init__(
        self,
        urls: str | Sequence[str],
        *,
        vocab_size: int | None = None,
        context_length: int | None = None,
        request_timeout_s: float = 600.0,
        connect_timeout_s: float = 10.0,
        max_retries: int = 3,
        retry_backoff_s: float = 0.5,
        max_inflight_per_server: int = 64,
        server_cooldown_s: float = 5.0,
        progress: bool | None = None,
        window_priority: int | None = None,
        family_min_shared_tokens: int | None = None,
    ):
        urls = [urls] if isinstance(urls, str) else list(urls)
        self.pool = ServerPool(urls, max_inflight=max_inflight_per_server, cooldown_s=server_cooldown_s)
        self.urls = self.pool.urls
        self.vocab_size = vocab_size
        self.context_length = context_length
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        self.max_retries = max_retries
        self.retry_backoff_s = retry_backoff_s
        self.progress = progress
        self.window_priority = window_priority  # SGLang priority of continue_prefixes' requests (WINDOW_PRIORITY)
        self.family_min_shared_tokens = family_min_shared_tokens  # None: FAMILY_MIN_SHARED_TOKENS (window_request_plan)
        self._tag = uuid.uuid4().hex[:8]

    def with_own_pool(self) -> "SGLangClient":
        """The same servers and settings on a fresh connection pool: a pool is bound to one event loop, so a
        background thread (async rollouts) needs its own."""
        clone = copy.copy(self)
        clone.pool = ServerPool(list(self.urls), max_inflight=self.pool.max_inflight, cooldown_s=self.pool.cooldown_s)
        return clone

    @classmethod
    def from_config(cls, cfg, urls: Sequence[str] | None = None) -> "SGLangClient":
        """Client for a validated `RolloutConfig`; the vocabulary size comes from `<model_path>/config.json`."""
        vocab = None
        config_json = Path(cfg.model_path) / "config.json" if cfg.model_path else None
        if config_json is not None and config_json.is_file():
            vocab = json.loads(config_json.read_text()).get("vocab_size")
        if vocab is None:
            warnings.warn(f"no vocab_size in {config_json}: token ids will not be range-checked, and an out-of-range "
                          "id crashes an SGLang server; pass vocab_size= to SGLangClient")
        return cls(
            list(urls or cfg.urls),
            vocab_size=vocab,
            context_length=cfg.context_length,
            request_timeout_s=cfg.request_timeout_s,
            connect_timeout_s=cfg.connect_timeout_s,
            max_retries=cfg.max_retries,
            retry_backoff_s=cfg.retry_backoff_s,
            max_inflight_per_server=cfg.max_inflight_per_server,
        )

    # --- generation -------------------------------------------------------------------------------------------
    async def agenerate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams,
        *,
        return_logprobs: bool = True,
        top_logprobs: int = 0,
        on_prompt_done=None,
        prompts_per_request: int = 1,
        request_plan=None,
        priority: int | None = None,
        _what: str = "prompts",
    ) -> list[list[Generation]]:
        """`params.n` generations per prompt: `result[i][j]` is sample j of prompt i.

        ``on_prompt_done(i, generations)`` (async) runs as soon as prompt i's samples are back - e.g. to score them
        with a remote teacher while other prompts still generate; its failure fails the call.
        ``prompts_per_request``: prompts sent together in one HTTP request (one entry per sample; retried together).
        Many short generations (the probe's windows) reach the server's scheduler at once this way, instead of
        trickling in one request at a time under `max_inflight_per_server`.
        ``request_plan(prompts) -> [RequestJob]`` replaces that grouping, every prompt in exactly one request (e.g.
        `window_request_plan`: the longest prompt of each prefix family first, the prefixes it extends after it, on
        the server that generated their row). Seeds and rids follow the prompt index, so the samples do not depend
        on the plan. ``priority``: SGLang's request priority (higher first on a server run with
        --enable-priority-scheduling, ignored elsewhere): `ROLLOUT_PRIORITY`, `WINDOW_PRIORITY`."""
        if isinstance(prompts_per_request, bool) or not isinstance(prompts_per_request, int) or prompts_per_request < 1:
            raise ValueError(f"prompts_per_request={prompts_per_request!r}: use an integer >= 1")
        params.validate(self.vocab_size)
        if params.seed is None and not params.greedy:
            # Unseeded = a fresh seed per call. A deterministic server gives every request without sampling_seed the
            # same fixed seed (42 in SGLang 0.5.23), so unseeded samples of one prompt would all be equal there.
            params = dataclasses.replace(params, seed=secrets.randbits(62))
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens=0 generates nothing: use score() to get log-probs of given tokens")
        _check_top_logprobs(top_logprobs, self.vocab_size)
        prompts = check_token_sequences(
            prompts, what=_what, vocab_size=self.vocab_size,
            max_new_tokens=params.max_new_tokens, context_length=self.context_length,
        )
        if request_plan is None:
            jobs = [RequestJob([list(range(first, min(first + prompts_per_request, len(prompts))))])
                    for first in range(0, len(prompts), prompts_per_request)]
        else:
            jobs = _checked_plan(request_plan(prompts), len(prompts))
        call = f"{self._tag}-{next(_CALLS)}"

        async def run_job(session, job: RequestJob):
            affinity: list = [job.server]  # the job's later requests follow its first one to the same server
            done = {}
            for indices in job.requests:
                gens = await self._generate_group(session, call, indices, prompts, params, return_logprobs,
                                                  top_logprobs, affinity, priority)
                for i, g in zip(indices, gens):
                    done[i] = g
                    if on_prompt_done is not None:
                        await on_prompt_done(i, g)
            return done

        results = await self._run_jobs(
            lambda session: [run_job(session, job) for job in jobs],
            what="generate",
            total_samples=len(prompts) * params.n,
        )
        by_prompt = {i: g for done in results for i, g in done.items()}
        return [by_prompt[i] for i in range(len(prompts))]

    def generate(self, prompts, params: SamplingParams, **kw) -> list[list[Generation]]:
        return _run_sync(self.agenerate(prompts, params, **kw), "agenerate")

    async def _generate_group(self, session, call, indices, prompts, params, return_logprobs, top_logprobs,
                              affinity: list, priority: int | None):
        """Prompts ``indices`` in one HTTP request; returns each one's ``params.n`` generations, in that order.
        ``affinity``: `post_json`'s server box, shared by the requests of one `RequestJob`."""
        # Greedy samples are identical: compute one and copy it n times.
        n_sent = 1 if params.greedy else params.n
        keys = [(i, j) for i in indices for j in range(n_sent)]  # (prompt index, sample)
        where = f"prompt {indices[0]}" if len(indices) == 1 else f"prompts {_span(indices)}"

        def payload(attempt: int) -> dict:
            body = {
                "input_ids": [prompts[i] for i, _ in keys],
                "rid": [_rid(call, i, j, attempt) for i, j in keys],
                "sampling_params": [params.for_sample(i, j) for i, j in keys],
                "return_logprob": return_logprobs or top_logprobs > 0,
                "top_logprobs_num": top_logprobs,
                "logprob_start_len": -1,  # outputs only
            }
            if priority is not None:
                body["priority"] = priority
            return body

        def check(body: Any, attempt: int) -> list[list[Generation]]:
            items = _expect_list(body, len(keys), f"generate {where}")
            gens = [
                _parse_generation(item, _rid(call, i, j, attempt), params, len(prompts[i]), self.vocab_size,
                                  return_logprobs, top_logprobs, f"prompt {i} sample {j}")
                for item, (i, j) in zip(items, keys)
            ]
            return [gens[k * n_sent:(k + 1) * n_sent] for k in range(len(indices))]

        groups = await self._post(session, "/generate", payload, check, f"generate({where})", affinity=affinity)
        for gens in groups:
            for g in gens:
                g.server = affinity[0]
        return [[copy.deepcopy(g[0]) for _ in range(params.n)] if params.greedy else g for g in groups]

    # --- teacher scoring ----------------------------------------------------------------------------------------
    async def ascore(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        start: int | Sequence[int] = 1,
        top_logprobs: int = 0,
    ) -> list[Score]:
        """Log-probs of `sequences[i][start_i:]`, each token given all tokens before it (`max_new_tokens=0`).

        `start` >= 1 (token 0 has no context); pass the prompt length to score only the response.
        """
        seqs = check_token_sequences(sequences, what="sequences", vocab_size=self.vocab_size,
                                     context_length=self.context_length)
        _check_top_logprobs(top_logprobs, self.vocab_size)
        starts = [start] * len(seqs) if isinstance(start, int) else list(start)
        if len(starts) != len(seqs):
            raise ValueError(f"start has {len(starts)} entries for {len(seqs)} sequences: give one per sequence")
        for i, (s, seq) in enumerate(zip(starts, seqs)):
            if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s < len(seq):
                raise ValueError(f"start[{i}]={s!r}: use 1 <= start < len(sequences[{i}])={len(seq)}")
        call = f"{self._tag}-{next(_CALLS)}"
        return await self._run_jobs(
            lambda session: [self._score_one(session, call, i, seq, s, top_logprobs)
                             for i, (seq, s) in enumerate(zip(seqs, starts))],
            what="score",
            total_samples=len(seqs),
        )

    def score(self, sequences, **kw) -> list[Score]:
        return _run_sync(self.ascore(sequences, **kw), "ascore")

    async def _score_one(self, session, call, index, seq, start, top_logprobs) -> Score:
        def payload(attempt: int) -> dict:
            return {
                "input_ids": [seq],
                "rid": [_rid(call, index, 0, attempt)],
                "sampling_params": [{"max_new_tokens": 0, "temperature": 0.0}],
                "return_logprob": True,
                # SGLang returns None for the token at logprob_start_len itself, values from the next one on.
                "logprob_start_len": start - 1,
                "top_logprobs_num": top_logprobs,
            }

        def check(body: Any, attempt: int) -> Score:
            (item,) = _expect_list(body, 1, f"score sequence {index}")
            where = f"score sequence {index}"
            meta = _meta(item, _rid(call, index, 0, attempt), where)
            lps = meta.get("input_token_logprobs")
            want = len(seq) - start + 1
            if not isinstance(lps, list) or len(lps) != want:
                raise InvalidResponse(f"{where}: expected {want} input_token_logprobs, got {_short(lps)}")
            fast = split_logprobs(lps[1:])  # vectorised (entry 0 has no log-prob); None: per-entry checks below
            if ([lps[0][1], *fast[1]] if fast is not None else [e[1] for e in lps]) != seq[start - 1:]:
                raise InvalidResponse(f"{where}: the scored token ids differ from the sequence sent")
            values = fast[0] if fast is not None else [_logprob(e[0], where) for e in lps[1:]]
            tops = None
            if top_logprobs:
                raw = meta.get("input_top_logprobs")
                if not isinstance(raw, list) or len(raw) != want:
                    raise InvalidResponse(f"{where}: expected {want} input_top_logprobs, got {_short(raw)}")
                tops = _parse_tops(raw[1:], top_logprobs, self.vocab_size, where)
            return Score(start, values, tops, str(meta.get("weight_version", "")))

        return await self._post(session, "/generate", payload, check, f"score(sequence {index})")

    # --- TOPD near-future windows (topd.sampler.ContinuationSampler) ------------------------------------------
    def continue_prefixes(
        self,
        prefixes: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        n: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        servers: Sequence[str | None] | None = None,
    ) -> list[list[list[int]]]:
        """`n` continuations (new token ids, ending with EOS when stopped early) of each prefix, used verbatim.
        ``servers``: the URL of the server that generated each prefix's row, if known (`Generation.server`)."""
        return _run_sync(self.acontinue_prefixes(prefixes, max_new_tokens=max_new_tokens, n=n,
                                                 temperature=temperature, top_p=top_p, seed=seed, servers=servers),
                         "acontinue_prefixes")

    async def acontinue_prefixes(self, prefixes, *, max_new_tokens, n, temperature, top_p, seed, servers=None):
        plan_kw = {} if self.family_min_shared_tokens is None else {"min_shared_tokens": self.family_min_shared_tokens}
        params = SamplingParams(max_new_tokens=max_new_tokens, n=n, temperature=temperature, top_p=top_p, seed=seed,
                                stream="window")  # never the random streams of rollouts given the same seed
        gens = await self.agenerate(prefixes, params, return_logprobs=False, _what="prefixes",
                                    request_plan=lambda checked: window_request_plan(checked, self.urls, servers,
                                                                                     **plan_kw),
                                    priority=self.window_priority)
        return [[g.token_ids for g in row] for row in gens]

    # --- plumbing -----------------------------------------------------------------------------------------------
    async def _post(self, session, path, payload, check, what, affinity=None):
        return await post_json(
            session, self.pool, path, payload, check, what=what,
            max_retries=self.max_retries, backoff_s=self.retry_backoff_s, timeout=self.timeout, affinity=affinity,
        )

    async def _run_jobs(self, make_jobs, *, what: str, total_samples: int) -> list:
        """Run one coroutine per prompt; results in prompt order, each exactly once; first failure cancels the rest."""
        show = self.progress if self.progress is not None else total_samples >= 256
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, headers=auth_headers()) as session:  # job's key
            tasks = [asyncio.ensure_future(c) for c in make_jobs(session)]
            index = {t: i for i, t in enumerate(tasks)}
            results: list = [None] * len(tasks)
            filled = [False] * len(tasks)
            bar = _progress(show, len(tasks), what)
            try:
                pending = set(tasks)
                while pending:
                    done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    for t in done:
                        i = index[t]
                        if filled[i]:
                            raise InvalidResponse(f"{what}: request {i} completed twice")
                        results[i], filled[i] = t.result(), True  # re-raises the request's error
                        if bar is not None:
                            bar.update(1)
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                if bar is not None:
                    bar.close()
        if not all(filled):
            raise InvalidResponse(f"{what}: {filled.count(False)} requests never completed")
        return results


WINDOW_PROMPTS_PER_REQUEST = 64  # at most: bounds a request's body (16k-token prefixes) and what one retry repeats
# SGLang request priorities (rollout.windows_first): the probe's short windows, on the step's critical path, go
# ahead of queued async rollouts; a gap under SGLang's preemption threshold (10) retracts no running request.
ROLLOUT_PRIORITY = 0
WINDOW_PRIORITY = 1
# Followers go in a second request only when each would reuse this many prefix tokens on average: a prefill of that
# many tokens per follower then outweighs a second round of `window` decode steps (topd_70b: ~8k-token prefixes and
# 50 steps; the CPU demo: ~100-token prefixes, where the second round cost more than it saved).
FAMILY_MIN_SHARED_TOKENS = 256


def window_prompts_per_request(n_prefixes: int, n_servers: int) -> int:
    """The probe's prefixes per HTTP request: an even share per server, at most `WINDOW_PROMPTS_PER_REQUEST`, so a
    server's scheduler gets its share of the short windows at once and prefills and decodes them as one batch (the
    few requests per server stay far below `max_inflight_per_server`)."""
    return max(1, min(WINDOW_PROMPTS_PER_REQUEST, math.ceil(n_prefixes / max(n_servers, 1))))


def prefix_families(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of ``prompts`` as families ``[leader, followers...]``: each follower is a prefix of its leader (an
    exact copy counts) and no leader is a prefix of any other prompt. The probe's prefixes of one rollout row form
    one family, led by the row's longest prefix: a server that prefills the leader first holds every follower's KV.

    In sorted order, everything between a prompt and a longer prompt it starts holds that prompt as a prefix too;
    so a prompt is a follower exactly when its successor starts with it."""
    order = sorted(range(len(prompts)), key=prompts.__getitem__)
    family_of = [0] * len(prompts)
    families: list[list[int]] = []
    for k in range(len(order) - 1, -1, -1):
        i = order[k]
        if k + 1 < len(order):
            nxt = prompts[order[k + 1]]
            if len(nxt) >= len(prompts[i]) and nxt[: len(prompts[i])] == prompts[i]:
                family_of[i] = family_of[order[k + 1]]
                families[family_of[i]].append(i)
                continue
        family_of[i] = len(families)
        families.append([i])
    families.reverse()  # sorted order of the leaders
    return families


def window_request_plan(prefixes: Sequence[Sequence[int]], urls: Sequence[str],
                        servers: Sequence[str | None] | None = None, *,
                        min_shared_tokens: int = FAMILY_MIN_SHARED_TOKENS) -> list[RequestJob]:
    """The probe's window requests (`agenerate`'s ``request_plan``): prefix families of at most
    `WINDOW_PROMPTS_PER_REQUEST` per job; a job sends its leaders (the rows' longest prefixes) in one request, then
    their followers in a second one to the same server, which finds their KV in its radix cache. ``servers[i]``, the
    URL that generated prefix i's row (one of ``urls``; else ignored), sends its family there, where the whole row is
    cached; families without one are dealt evenly over the servers. When the followers would reuse fewer than
    ``min_shared_tokens`` tokens each on average, a job is one request (leaders and followers together): short
    prefixes cost less to prefill again than a second round of decode steps (on the CPU servers a decode step costs
    in proportion to its batch, so the second round doubled the probe's window time under async rollouts).

    Why: a server that does not hold the row (the teacher's, which never sees the rollouts; a student server other
    than the one that generated it) otherwise prefills every prefix from scratch, ~1.5x a row's tokens with 3
    candidates per row; at topd_70b (768 prefixes of ~8k tokens per step) ~6M tokens on the teacher's one node, and
    on 8 student servers 7 of every 8 prefixes missed. The cost is a second round of `window` decode steps per job.
    All prefixes in one request could not share: a prefill batch computes its sequences independently."""
    families = prefix_families(prefixes)
    per_request = window_prompts_per_request(len(families), len(urls))
    known = set(urls)
    by_server: dict[str | None, list[list[int]]] = {}
    for family in families:
        hint = servers[family[0]] if servers is not None else None
        by_server.setdefault(hint if hint in known else None, []).append(family)
    jobs = []
    for server, fams in by_server.items():
        for first in range(0, len(fams), per_request):
            chunk = fams[first:first + per_request]
            leaders = [family[0] for family in chunk]
            followers = [i for family in chunk for i in family[1:]]
            shared = sum(len(prefixes[i]) - 1 for i in followers)
            if not followers or shared < min_shared_tokens * len(followers):
                jobs.append(RequestJob([leaders + followers], server))
            else:
                jobs.append(RequestJob([leaders, followers], server))
    return jobs


def _checked_plan(jobs, n_prompts: int) -> list[RequestJob]:
    if not all(isinstance(job, RequestJob) for job in jobs):
        raise ValueError("request_plan must return a list of RequestJob")
    seen = sorted(i for job in jobs for request in job.requests for i in request)
    if seen != list(range(n_prompts)) or any(not request for job in jobs for request in job.requests):
        raise ValueError(f"request_plan must put each of the {n_prompts} prompt indices in exactly one non-empty "
                         f"request; it gave {len(seen)} entries")
    return jobs


def _span(indices: Sequence[int]) -> str:
    return f"{indices[0]}..{indices[-1]}" if list(indices) == list(range(indices[0], indices[-1] + 1)) else \
        f"{indices[0]}, ... ({len(indices)} prompts)"


# --- response parsing ---------------------------------------------------------------------------------------------
def _rid(call: str, index: int, sample: int, attempt: int) -> str:
    return f"{call}-p{index}-s{sample}-a{attempt}"


def _expect_list(body: Any, n: int, where: str) -> list:
    if isinstance(body, dict) and n == 1:
        body = [body]
    if not isinstance(body, list) or len(body) != n:
        raise InvalidResponse(f"{where}: expected a list of {n} results, got {_short(body)}")
    return body


def _meta(item: Any, rid: str, where: str) -> dict:
    if not isinstance(item, dict) or not isinstance(item.get("meta_info"), dict):
        raise InvalidResponse(f"{where}: result without meta_info: {_short(item)}")
    meta = item["meta_info"]
    if meta.get("id") != rid:
        raise InvalidResponse(f"{where}: answer for request {meta.get('id')!r} where {rid!r} was expected")
    return meta


def _parse_generation(item, rid, params, prompt_len, vocab, want_lps, top_k, where) -> Generation:
    meta = _meta(item, rid, where)
    reason = (meta.get("finish_reason") or {}).get("type")
    if reason == "abort":  # e.g. aborted by a weight sync or an overloaded server: generate it again
        raise Retryable(f"{where}: generation aborted by the server ({meta.get('finish_reason')})")
    if reason not in FINISH_REASONS:
        raise InvalidResponse(f"{where}: unknown finish_reason {meta.get('finish_reason')!r}")
    ids = item.get("output_ids")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise InvalidResponse(f"{where}: output_ids is not a list of ints: {_short(ids)}")
    if not 1 <= len(ids) <= params.max_new_tokens:
        raise InvalidResponse(f"{where}: {len(ids)} tokens for max_new_tokens={params.max_new_tokens}")
    if reason == "length" and len(ids) != params.max_new_tokens:
        raise InvalidResponse(f"{where}: finish_reason 'length' after {len(ids)} < {params.max_new_tokens} tokens")
    if any(t < 0 or (vocab is not None and t >= vocab) for t in ids):
        raise InvalidResponse(f"{where}: output token ids outside [0, {vocab})")
    if meta.get("completion_tokens") != len(ids) or meta.get("prompt_tokens") != prompt_len:
        raise InvalidResponse(
            f"{where}: counts disagree: completion_tokens={meta.get('completion_tokens')} for {len(ids)} ids, "
            f"prompt_tokens={meta.get('prompt_tokens')} for {prompt_len}"
        )
    logprobs = tops = None
    if want_lps:
        lps = meta.get("output_token_logprobs")
        fast = split_logprobs(lps)  # vectorised; None: the per-entry checks below say what is wrong
        if not isinstance(lps, list) or len(lps) != len(ids) or \
                (list(fast[1]) if fast is not None else [e[1] for e in lps]) != ids:
            raise InvalidResponse(f"{where}: output_token_logprobs do not match output_ids: {_short(lps)}")
        logprobs = fast[0] if fast is not None else [_logprob(e[0], where) for e in lps]
    if top_k:
        raw = meta.get("output_top_logprobs")
        if not isinstance(raw, list) or len(raw) != len(ids):
            raise InvalidResponse(f"{where}: expected {len(ids)} output_top_logprobs, got {_short(raw)}")
        tops = _parse_tops(raw, top_k, vocab, where)
    return Generation(ids, logprobs, tops, reason, str(meta.get("weight_version", "")), prompt_len)


def _parse_tops(rows: list, k: int, vocab: int | None, where: str) -> list[list[tuple[int, float]]]:
    """Every position's top-k: vectorised, or row by row where the fast path declines (to name what is wrong)."""
    fast = split_top_logprobs(rows, min(k, vocab or k))
    return fast if fast is not None else [_parse_top(r, k, vocab, where) for r in rows]


def _parse_top(row: Any, k: int, vocab: int | None, where: str) -> list[tuple[int, float]]:
    if not isinstance(row, list) or len(row) != min(k, vocab or k):
        raise InvalidResponse(f"{where}: expected {k} top log-probs per position, got {_short(row)}")
    out = [(int(e[1]), _logprob(e[0], where)) for e in row]
    if any(b[1] > a[1] + 1e-6 for a, b in zip(out, out[1:])):
        raise InvalidResponse(f"{where}: top log-probs are not sorted best first")
    return out


def _logprob(x: Any, where: str) -> float:
    if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x) or x > 1e-4:
        raise InvalidResponse(f"{where}: invalid log-prob {x!r}")
    return float(x)


def _check_top_logprobs(k: int, vocab: int | None) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (vocab is not None and k > vocab):
        raise ValueError(f"top_logprobs={k!r}: use an integer in [0, {vocab or 'vocab_size'}] (0 = off)")


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 200 else s[:200] + "..."


def _progress(show: bool, total: int, what: str):
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"sglang {what}", unit="req", disable=os.environ.get("TQDM_DISABLE") == "1")


def _run_sync(coro, async_name: str):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    coro.close()
    raise RuntimeError(f"called from inside a running event loop: use `await client.{async_name}(...)` instead")
