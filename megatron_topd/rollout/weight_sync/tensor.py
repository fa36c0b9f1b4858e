"""Weight sync by shared memory on the same machine: `/update_weights_from_tensor` inside begin/end_weight_update.

Only handles travel over HTTP (see tensor_ipc.py); the server copies straight from the trainer's memory. Needs the
servers on the trainer's host (co-located rollout). Each bucket is cloned first, so the caller's tensors are never
moved into shared memory, and the clone lives until every server has loaded it.
"""
from __future__ import annotations

import atexit
import socket
from urllib.parse import urlparse

from . import admin
from .base import WeightSync, close_sessions
from .buckets import iter_buckets
from .tensor_ipc import end_shm_managers, serialize_named_tensors, shm_manager_pids

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}


class TensorWeightSync(WeightSync):
    method = "tensor"

    def __init__(self, urls, *, tp_size: int = 1, **kw):
        super().__init__(urls, **kw)
        local = LOCAL_HOSTS | {socket.gethostname(), socket.getfqdn()}
        remote = [u for u in self.urls if urlparse(u).hostname not in local]
        if remote:
            raise ValueError(
                f"rollout.sync_method='tensor' shares memory, so the servers must run on this machine; {remote} "
                "look remote: use sync_method='distributed' (or 'disk' with a shared filesystem)"
            )
        self.tp_size = tp_size
        self._shm_pids: set[int] = set()
        atexit.register(self.close)

    def _push(self, named_tensors, version: str):
        admin.call_all(self.urls, "/begin_weight_update", {}, timeout_s=self.timeout_s)
        try:
            return self._push_buckets(named_tensors, version)
        except BaseException:
            close_sessions(self.urls)
            raise

    def _push_buckets(self, named_tensors, version: str):
        n = nbytes = nbuckets = 0
        buckets = iter_buckets(named_tensors, self.bucket_bytes)
        bucket = next(buckets)
        while bucket is not None:
            following = next(buckets, None)
            owned = [(name, t.detach().clone()) for name, t in bucket]
            # One payload per TP rank of each server: each rank opens its own handles (SGLang's convention).
            payload = {
                "serialized_named_tensors": [serialize_named_tensors(owned) for _ in range(self.tp_size)],
                "load_format": None,
                "flush_cache": following is None,  # one KV-cache flush, after the last bucket
                "weight_version": version,
            }
            self._shm_pids.update(shm_manager_pids())
            admin.call_all(self.urls, "/update_weights_from_tensor", payload, timeout_s=self.timeout_s)
            n += len(owned)
            nbytes += sum(t.numel() * t.element_size() for _, t in owned)
            nbuckets += 1
            del owned, payload
            bucket = following
        admin.call_all(self.urls, "/end_weight_update", {}, timeout_s=self.timeout_s)
        return n, nbytes, nbuckets

    def close(self) -> None:
        """End the torch_shm_manager this sync started (after this, no tensor sync can run in this process)."""
        if not self.closed and self._shm_pids:
            end_shm_managers(sorted(self._shm_pids))
        self.closed = True
