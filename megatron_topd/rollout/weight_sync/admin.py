"""Blocking JSON calls to every server at once (weight sync runs in the training loop, outside any event loop).

Threads rather than asyncio: the distributed path must keep HTTP calls in flight while the main thread broadcasts.
Each call runs on its own daemon thread: a call left waiting on a collective that will never complete (its server,
or another, died) must not hold the trainer's exit, as a pool's worker threads would (they are joined at exit).
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
import threading
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from typing import Callable, TypeVar

from ..auth import auth_headers
from ..errors import CollectiveAbandoned, WeightSyncError

T = TypeVar("T")


def call(url: str, path: str, payload: dict | None = None, *, timeout_s: float = 600.0, method: str = "POST") -> dict:
    """One JSON request; raise WeightSyncError quoting the server's answer unless it is 2xx and not success=false."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json", **auth_headers()}  # the job's API key (auth.py)
    req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            text = resp.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        raise WeightSyncError(f"{url}{path} answered HTTP {e.code}: {e.read().decode(errors='replace')[:800]}") from None
    except (urllib.error.URLError, OSError) as e:
        raise WeightSyncError(f"{url}{path} unreachable: {e}. Is the server up? (see its log)") from None
    try:
        body = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        body = {"text": text}
    if isinstance(body, dict) and body.get("success") is False:
        raise WeightSyncError(f"{url}{path} failed: {body.get('message', body)}")
    return body


def in_daemon_thread(fn: Callable[..., T], *args, name: str = "weight-sync", **kwargs) -> "Future[T]":
    """`fn(*args, **kwargs)` on a new daemon thread; its outcome as a Future."""
    future: Future = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to whoever waits on the future
            future.set_exception(e)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


def submit_all(urls: list[str], path: str, payloads: list[dict] | dict | None, *, timeout_s: float,
               method: str = "POST") -> list[Future]:
    """Start the same call (or one payload per server) on every server; returns futures in server order."""
    per = payloads if isinstance(payloads, list) else [payloads] * len(urls)
    return [in_daemon_thread(call, u, path, p, timeout_s=timeout_s, method=method, name=f"http {path}")
            for u, p in zip(urls, per)]


def wait_all(futures: list[Future], what: str) -> list[dict]:
    """Results of every future; if any failed, raise one WeightSyncError naming all failures."""
    results, errors = [], []
    for f in futures:
        try:
            results.append(f.result())
        except Exception as e:  # noqa: BLE001 - collect every server's failure
            errors.append(str(e))
    if errors:
        raise WeightSyncError(f"{what} failed on {len(errors)} of {len(futures)} servers:\n  " + "\n  ".join(errors))
    return results


def call_all(urls: list[str], path: str, payload: dict | list[dict] | None = None, *, timeout_s: float = 600.0,
             method: str = "POST") -> list[dict]:
    if method != "GET" and payload is None:
        payload = {}
    return wait_all(submit_all(urls, path, payload, timeout_s=timeout_s, method=method), path)


def collective_beside_calls(collective: Callable[[], T], futures: list[Future], what: str) -> T:
    """Run a blocking collective with the servers (the weight-update group's rendezvous, a bucket's broadcast) while
    the HTTP calls that make them take part are in flight; its result once it and every call succeeded.

    A call that fails first (its server died, or refused) ends the wait at once: CollectiveAbandoned, naming it. The
    collective alone would wait for the missing peer until the group's timeout (600 s: a rendezvous with a server that
    never joins; NCCL's broadcast to a dead peer likewise), with every trainer rank and node held. The abandoned
    collective stays blocked on its daemon thread: the group is unusable and the caller must raise (the attempt ends;
    launch/trainer.py exits without running the group's destructors)."""
    done = in_daemon_thread(collective, name=what)
    wait([done, *futures], return_when=FIRST_EXCEPTION)
    refused = [f for f in futures if f.done() and f.exception() is not None]
    if refused and not done.done():
        raise CollectiveAbandoned(
            f"{what} abandoned: {len(refused)} of {len(futures)} servers failed while the trainer waited in the "
            "collective with them:\n  " + "\n  ".join(str(f.exception()) for f in refused))
    try:
        value = done.result()
    finally:
        wait_all(futures, what)  # a server's own error names it better than the collective's
    return value
