"""`WeightSync`: push new trainer weights to every SGLang server, with generation paused around the push.

A sync is: pause generation on every server -> push the tensors (subclass: disk, tensor, distributed) with the new
`weight_version` -> check every server reports that version -> continue generation. The version then comes back in
every generation's meta_info, hence in every rollout record.

`sync(named_tensors)`: only trainer rank 0 talks to the servers. Other ranks still drain the iterator, because
exporting HF tensors from a sharded Megatron model takes collectives in which every rank must take part.
`sync_model(model, spec)`: the same for a live Megatron model; the distributed path pushes each pipeline stage's
layers from that stage (no rank-0 funnel).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable

import torch

from ..errors import WeightSyncError
from . import admin


@dataclass
class SyncStats:
    method: str
    version: str
    num_tensors: int
    num_bytes: int
    num_buckets: int
    seconds: float
    stage_bytes: list[int] | None = None  # bytes each pipeline stage pushed (per-stage push only)


class WeightSync:
    method = "base"

    def __init__(
        self,
        urls: list[str],
        *,
        bucket_bytes: int = 512 * 2**20,
        pause_mode: str = "retract",
        timeout_s: float = 600.0,
    ):
        if not urls:
            raise ValueError("weight sync needs at least one server URL")
        self.urls = [u.rstrip("/") for u in urls]
        self.bucket_bytes = int(bucket_bytes)
        self.pause_mode = pause_mode
        self.timeout_s = timeout_s
        self.closed = False

    def sync(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncStats | None:
        """Push all tensors to every server as weight version `version`; returns stats on rank 0, None elsewhere."""
        self.check_version(version)
        if _rank() != 0:
            for _ in named_tensors:
                pass
            return None
        t0 = time.perf_counter()
        self.pause()
        try:
            n, nbytes, nbuckets = self._push(named_tensors, version)
        except BaseException as e:
            raise self.failed(version, e) from e
        self.finish(version)
        return SyncStats(self.method, version, n, nbytes, nbuckets, time.perf_counter() - t0)

    def sync_model(self, model, spec, version: str) -> SyncStats | None:
        """Push a live (TP/PP-sharded) Megatron model; every trainer rank calls it. This path: the whole model
        through global rank 0 (`export_hf_weights`); the distributed sync overrides it with a push per stage."""
        from megatron_topd.convert import export_hf_weights

        return self.sync(export_hf_weights(model, spec), version)

    def check_version(self, version: str) -> None:
        if self.closed:
            raise WeightSyncError(f"{type(self).__name__} is closed: make a new one")
        if not isinstance(version, str) or not version:
            raise ValueError(f"weight version {version!r}: use a non-empty string (e.g. the training step)")

    def pause(self) -> None:
        admin.call_all(self.urls, "/pause_generation", {"mode": self.pause_mode}, timeout_s=self.timeout_s)

    def failed(self, version: str, error: BaseException | str) -> WeightSyncError:
        return WeightSyncError(
            f"{self.method} weight sync to version {version!r} failed; the servers stay paused and may hold "
            f"partly updated weights (resync, or restart them): {error}"
        )

    def finish(self, version: str) -> None:
        """Check every server reports `version`, then let generation continue."""
        infos = admin.call_all(self.urls, "/model_info", timeout_s=60, method="GET")
        wrong = [(u, i.get("weight_version")) for u, i in zip(self.urls, infos) if i.get("weight_version") != version]
        if wrong:
            raise WeightSyncError(f"after the sync these servers report another weight_version than {version!r}: {wrong}")
        admin.call_all(self.urls, "/continue_generation", {}, timeout_s=self.timeout_s)

    def _push(self, named_tensors, version: str) -> tuple[int, int, int]:
        """Send every tensor; return (tensors, bytes, buckets)."""
        raise NotImplementedError

    def close(self) -> None:
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def close_sessions(urls: list[str]) -> None:
    """Best effort after a failed push: close the begin_weight_update sessions so a later sync can open new ones."""
    for url in urls:
        try:
            admin.call(url, "/end_weight_update", {}, timeout_s=60)
        except Exception:  # noqa: BLE001 - the push's own error is the one to report
            pass


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
