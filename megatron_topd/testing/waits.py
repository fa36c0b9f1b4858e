"""A wait on what a process reports, with a deadline and a failure that names what was awaited.

Tests synchronise on events (a server's load, a store's keys, Slurm's job state), never on a guessed sleep; this is
the one polling loop they share."""
from __future__ import annotations

import threading
import time
from typing import Callable, TypeVar

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout_s: float, what: str, poll_s: float = 0.5,
               on_timeout: Callable[[], str] = lambda: "") -> T:
    """Poll ``predicate`` until it returns something truthy and return that; after ``timeout_s`` fail with
    ``what`` and ``on_timeout()`` (e.g. a log's tail) in the message."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)  # polling interval of a wait on what a process reports (deadline above)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}\n{on_timeout()}".rstrip())


def threads_since(earlier: set[threading.Thread], name: str) -> list[threading.Thread]:
    """The live threads called ``name`` that were not in ``earlier`` (``set(threading.enumerate())`` taken before):
    a test checks what it left behind, not what earlier tests in the same process did."""
    return [t for t in set(threading.enumerate()) - earlier if t.name == name]
