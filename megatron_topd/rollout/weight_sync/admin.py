"""Blocking JSON calls to every server at once (weight sync runs in the training loop, outside any event loop).

Threads rather than asyncio: the distributed path must keep HTTP calls in flight while the main thread broadcasts.
"""
from __future__ import annotations

import json
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor

from ..auth import auth_headers
from ..errors import WeightSyncError


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


def submit_all(pool: ThreadPoolExecutor, urls: list[str], path: str, payloads: list[dict] | dict, *,
               timeout_s: float) -> list[Future]:
    """Start the same call (or one payload per server) on every server; returns futures in server order."""
    per = payloads if isinstance(payloads, list) else [payloads] * len(urls)
    return [pool.submit(call, u, path, p, timeout_s=timeout_s) for u, p in zip(urls, per)]


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
    with ThreadPoolExecutor(max_workers=max(1, len(urls))) as pool:
        if method == "GET":
            futs = [pool.submit(call, u, path, None, timeout_s=timeout_s, method="GET") for u in urls]
        else:
            futs = submit_all(pool, urls, path, payload if payload is not None else {}, timeout_s=timeout_s)
        return wait_all(futs, path)
