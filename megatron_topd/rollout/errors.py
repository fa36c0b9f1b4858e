"""Exceptions of the rollout layer: each says what failed, where, and what to do."""
from __future__ import annotations


class RolloutError(RuntimeError):
    """Base class of rollout-layer failures."""


class ServerStartError(RolloutError):
    """An SGLang server exited or did not become healthy in time; the message quotes its log tail."""


class RequestFailed(RolloutError):
    """A request failed on every attempt (retries exhausted), or failed in a way retrying cannot fix."""


class InvalidResponse(RolloutError):
    """A server answered with something that does not match the request (lengths, ids, ranges)."""


class WeightSyncError(RolloutError):
    """A server refused or failed a weight update; generation may still be paused on it."""


class CollectiveAbandoned(WeightSyncError):
    """A server failed while the trainer waited in a collective with it; the collective was left blocked on its own
    thread, so its group must be neither reused nor destroyed (its destructor would wait for it)."""
