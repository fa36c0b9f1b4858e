"""`ServerPool` + `post_json`: load balancing over several SGLang servers, bounded retries with backoff.

Each logical request is sent to the up server with the fewest requests in flight (never more than `max_inflight`
per server). Connection errors mark a server down for `cooldown_s`, so retries go to the others; timeouts and 5xx
only steer the next attempt elsewhere (a timed-out request is not left running: SGLang aborts a request whose client
closed the connection). After `max_retries` retries the call raises `RequestFailed` listing every attempt. 4xx answers are not retried: the request itself is wrong and would fail anywhere.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp

from .errors import InvalidResponse, RequestFailed

# Failures worth another attempt (elsewhere): the server died or hung, or aborted the generation.
CONNECTION_ERRORS = (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, ConnectionError)


class Retryable(Exception):
    """Raised by a response check for an answer that another attempt may fix (e.g. an aborted generation)."""


@dataclass
class _Server:
    url: str
    inflight: int = 0
    down_until: float = 0.0
    failures: int = 0
    last_error: str = ""


@dataclass
class ServerPool:
    urls: list[str]
    max_inflight: int = 64
    cooldown_s: float = 5.0
    _servers: list[_Server] = field(init=False)
    _cond: asyncio.Condition | None = field(init=False, default=None)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None)

    def __post_init__(self):
        if not self.urls:
            raise ValueError("SGLangClient needs at least one server URL")
        self._servers = [_Server(u.rstrip("/")) for u in self.urls]

    def _condition(self) -> asyncio.Condition:
        """The pool's condition for the running event loop (sync calls each run a new loop; health state persists)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop, self._cond = loop, asyncio.Condition()
            for s in self._servers:
                s.inflight = 0  # requests of a finished loop are all released or dead
        return self._cond

    async def acquire(self, avoid: str | None = None, prefer: str | None = None) -> _Server:
        """The least-loaded up server with a free slot (avoiding `avoid` when another one is up); waits if none.
        `prefer` (e.g. the server whose radix cache holds this request's prefix) wins whenever it is up and free."""
        cond = self._condition()
        async with cond:
            while True:
                now = time.monotonic()
                up = [s for s in self._servers if s.down_until <= now]
                preferred = [s for s in up if s.url == prefer and s.inflight < self.max_inflight]
                if preferred:
                    preferred[0].inflight += 1
                    return preferred[0]
                if avoid is not None and len(up) > 1:
                    up = [s for s in up if s.url != avoid] or up
                free = [s for s in up if s.inflight < self.max_inflight]
                if free:
                    best = min(free, key=lambda s: (s.inflight, s.failures))
                    best.inflight += 1
                    return best
                wake = min((s.down_until for s in self._servers if s.down_until > now), default=now + 1.0)
                try:
                    await asyncio.wait_for(cond.wait(), timeout=max(0.05, wake - now))
                except asyncio.TimeoutError:
                    pass

    async def release(self, server: _Server) -> None:
        cond = self._condition()
        async with cond:
            server.inflight -= 1
            cond.notify_all()

    def mark_down(self, server: _Server, error: str) -> None:
        server.failures += 1
        server.last_error = error
        server.down_until = time.monotonic() + self.cooldown_s

    def mark_ok(self, server: _Server) -> None:
        server.failures = 0
        server.down_until = 0.0


async def post_json(
    session: aiohttp.ClientSession,
    pool: ServerPool,
    path: str,
    make_payload: Callable[[int], dict],
    check: Callable[[Any, int], Any],
    *,
    what: str,
    max_retries: int,
    backoff_s: float,
    timeout: aiohttp.ClientTimeout,
    affinity: list | None = None,
    headers: dict | None = None,
) -> Any:
    """POST `make_payload(attempt)` to `path` on a pool server; return `check(body, attempt)`.

    `check` raises `Retryable` for answers worth another attempt and `InvalidResponse` for answers that are wrong.
    `affinity`, a one-item list: the first attempt goes to the server URL it holds (when that one is up and free;
    None: any), and it receives the URL of the server that answered - requests that extend each other's prompts
    pass one list along so that the later ones meet the earlier ones' KV in that server's radix cache.
    `headers`: sent with each attempt, over the session's (an OpenAI-compatible endpoint's own key).
    """
    errors: list[str] = []
    avoid = None
    for attempt in range(max_retries + 1):
        if attempt:
            await asyncio.sleep(min(30.0, backoff_s * 2 ** (attempt - 1)))
        server = await pool.acquire(avoid, prefer=affinity[0] if affinity is not None and not attempt else None)
        url = server.url + path
        try:
            async with session.post(url, json=make_payload(attempt), timeout=timeout, headers=headers) as resp:
                text = await resp.text()
                if resp.status >= 500:
                    raise Retryable(f"HTTP {resp.status}: {text[:300]}")
                if resp.status >= 400:
                    raise RequestFailed(f"{what}: {url} answered HTTP {resp.status} (not retried): {text[:500]}")
            try:
                body = json.loads(text)
            except json.JSONDecodeError as e:
                raise InvalidResponse(f"{what}: {url} answered non-JSON ({e}): {text[:300]!r}") from None
            result = check(body, attempt)
            pool.mark_ok(server)
            if affinity is not None:
                affinity[0] = server.url
            return result
        except CONNECTION_ERRORS as e:
            pool.mark_down(server, repr(e))
            errors.append(f"attempt {attempt + 1} on {server.url}: connection error ({type(e).__name__}: {e})")
        except asyncio.TimeoutError:
            errors.append(f"attempt {attempt + 1} on {server.url}: no answer within {timeout.total}s")
        except Retryable as e:
            errors.append(f"attempt {attempt + 1} on {server.url}: {e}")
        finally:
            await pool.release(server)
        avoid = server.url
    raise RequestFailed(
        f"{what} failed on all {max_retries + 1} attempts (servers: {', '.join(pool.urls)}):\n  "
        + "\n  ".join(errors)
        + "\nCheck that the servers are up (their logs), or raise rollout.max_retries / rollout.request_timeout_s."
    )
