"""Weight sync by collective broadcast: trainer rank 0 + every server rank form one group (gloo on CPU, NCCL on GPU).

Set-up, once: `/init_weights_update_group` on each server (server i's ranks start at 1 + i * tp_size) while rank 0
joins the same rendezvous. Each sync: `/begin_weight_update`, then per bucket `/update_weights_from_distributed` with
the bucket's names/dtypes/shapes (`load_format=flattened_bucket`) in flight on every server while rank 0 broadcasts
the bucket as one flat byte buffer, then `/end_weight_update`. Works across machines (the servers connect to
`master_address:master_port`), and on GPUs the bytes never leave the GPUs.

The port: every trainer rank builds this object, but only rank 0 listens. Rank 0 binds the rendezvous store when the
object is made (port 0: the OS's choice, held from then on, so nothing can take it before the group forms) and
broadcasts the port to the other ranks; no rank ever binds `master_address`, which is trainer node 1's address and
not assignable on the other trainer nodes (binding it there failed with Errno 99).
"""
from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import torch

from ...parallel import broadcast_object
from . import admin
from .base import WeightSync, _rank, close_sessions
from .buckets import flatten, iter_buckets, meta
from .process_group import broadcast_from_rank0, destroy, listen, new_update_group


class DistributedWeightSync(WeightSync):
    method = "distributed"

    def __init__(self, urls, *, master_address: str = "127.0.0.1", master_port: int = 0, backend: str = "gloo",
                 tp_size: int = 1, **kw):
        super().__init__(urls, **kw)
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"rollout.sync_backend={backend!r}: use 'gloo' (CPU) or 'nccl' (GPU)")
        if backend == "nccl" and not torch.cuda.is_available():
            raise ValueError("rollout.sync_backend='nccl' needs CUDA on the trainer: use 'gloo' on CPU")
        self.master_address = master_address
        self.backend = backend
        self.tp_size = tp_size
        self.world_size = 1 + len(self.urls) * tp_size
        # Rank 0 listens (bound now, on every interface; master_port 0: the OS's choice) and tells the others.
        self.store = listen(master_port, self.world_size, self.timeout_s) if _rank() == 0 else None
        self.master_port, self.group_name = broadcast_object(
            (self.store.port, f"megatron_topd_weights_{uuid.uuid4().hex[:8]}") if self.store is not None else None)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.pg = None

    def connect(self) -> None:
        """Form the group (idempotent); the first `sync` calls it."""
        if self.pg is not None:
            return
        payloads = [
            {"master_address": self.master_address, "master_port": self.master_port, "rank_offset": 1 + i * self.tp_size,
             "world_size": self.world_size, "group_name": self.group_name, "backend": self.backend}
            for i in range(len(self.urls))
        ]
        with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
            futures = admin.submit_all(pool, self.urls, "/init_weights_update_group", payloads, timeout_s=self.timeout_s)
            try:
                self.pg = new_update_group(self.store, self.world_size, self.group_name, self.backend,
                                           self.timeout_s)
            finally:
                admin.wait_all(futures, "init_weights_update_group")

    def _push(self, named_tensors, version: str):
        self.connect()
        admin.call_all(self.urls, "/begin_weight_update", {}, timeout_s=self.timeout_s)
        try:
            n = nbytes = nbuckets = 0
            with ThreadPoolExecutor(max_workers=len(self.urls)) as pool:
                buckets = iter_buckets(named_tensors, self.bucket_bytes)
                bucket = next(buckets)
                while bucket is not None:
                    following = next(buckets, None)
                    flat = flatten(bucket, self.device)
                    payload = {**meta(bucket), "group_name": self.group_name, "load_format": "flattened_bucket",
                               "flush_cache": following is None, "weight_version": version}
                    futures = admin.submit_all(pool, self.urls, "/update_weights_from_distributed", payload,
                                               timeout_s=self.timeout_s)
                    try:
                        broadcast_from_rank0(flat, self.pg)
                    finally:
                        admin.wait_all(futures, "update_weights_from_distributed")
                    n, nbytes, nbuckets = n + len(bucket), nbytes + flat.numel(), nbuckets + 1
                    bucket = following
            admin.call_all(self.urls, "/end_weight_update", {}, timeout_s=self.timeout_s)
        except BaseException:
            close_sessions(self.urls)
            raise
        return n, nbytes, nbuckets

    def close(self) -> None:
        """Tear the group down on the servers and here."""
        if self.pg is not None:
            for url in self.urls:
                try:
                    admin.call(url, "/destroy_weights_update_group", {"group_name": self.group_name}, timeout_s=60)
                except Exception:  # noqa: BLE001 - a dead server has no group left to destroy
                    pass
            destroy(self.pg)
            self.pg = None
        self.store = None  # the last reference: the port is released
        self.closed = True
