"""Weight sync by collective broadcast to every server rank (gloo on CPU, NCCL on GPU), one group per pipeline stage.

`sync_model(model, spec)` (the trainer's path): the first TP rank of each pipeline stage (of data-parallel replica 0)
pushes its own stage's tensors (`convert.export_stage_hf_weights`); no tensor travels to global rank 0 first.
- Groups: SGLang receives with `src=0` of the named group, so each stage has its own group (`<name>_pp<p>`: the
  stage's pushing rank is rank 0, server i's ranks start at 1 + i * tp_size); a server keeps several groups side by
  side (a dict keyed by group_name). Its scheduler serves one request at a time, so a server receives one bucket at a
  time whichever stage sends it.
- Order: bucket sends (the HTTP call to every server at once, then the broadcast) and group set-ups take turns across
  stages (`one_at_a_time` on rank 0's store). Two stages in flight at once could reach two servers in opposite
  orders: with NCCL's ring broadcast each server would wait inside the other stage's collective (deadlock). The
  stages still overlap everything else: while one stage's bucket is on the wire the others gather and flatten theirs.
- Pipelining within a stage: the main thread gathers bucket n+1 over the TP group (every TP rank of the stage runs
  the same gathers) while a sender thread broadcasts bucket n; at most three buckets live on the pushing rank.
- Global rank 0 alone pauses, begins, ends, checks `/model_info` and continues; every rank learns each stage's
  outcome (one small all-gather), so a failure is raised on every rank, not only where it happened.

`sync(named_tensors)` (any iterator, e.g. a state dict, or `export_hf_weights`'s funnel): global rank 0 alone
broadcasts every bucket over stage 0's group, one bucket after another.

Set-up: the port: every trainer rank builds this object, but only rank 0 listens. Rank 0 binds the rendezvous store
when the object is made (port 0: the OS's choice, held from then on, so nothing can take it before the group forms)
and broadcasts the port; the other stages' pushing ranks connect to `master_address:port` as clients (as the servers
do); no rank ever binds `master_address`, which is trainer node 1's address and not assignable on the other trainer
nodes (binding it there failed with Errno 99).
"""
from __future__ import annotations

import queue
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.distributed as dist

from ...parallel import broadcast_object
from ..errors import CollectiveAbandoned, WeightSyncError
from . import admin
from .base import SyncStats, WeightSync, _rank, close_sessions
from .buckets import flatten, iter_buckets, meta
from .process_group import broadcast_from_rank0, connect_store, destroy, listen, new_update_group, one_at_a_time


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
        self.hosts_store = self.store is not None
        self.group_store = None  # the group's own client of the store (`connect`)
        self.master_port, self.group_name = broadcast_object(
            (self.store.port, f"megatron_topd_weights_{uuid.uuid4().hex[:8]}") if self.store is not None else None)
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        self.pg = None
        self.stage_group = None
        self.abandoned = False

    def connect(self, stage: int = 0) -> None:
        """Join pipeline stage `stage`'s group as its rank 0 (idempotent; the first push calls it)."""
        if self.pg is not None:
            return
        if self.store is None:
            self.store = connect_store(self.master_address, self.master_port, self.timeout_s)
        # The group's rendezvous (and NCCL's first broadcast) on a client of its own: a store client serves one
        # request at a time, and the rendezvous waits on it for the servers' keys. On the turn lock's client, a server
        # dying mid-rendezvous held the lock's release, and so the CollectiveAbandoned, for the store's timeout.
        self.group_store = connect_store("127.0.0.1" if self.hosts_store else self.master_address, self.master_port,
                                         self.timeout_s)
        name = f"{self.group_name}_pp{stage}"
        payloads = [
            {"master_address": self.master_address, "master_port": self.master_port, "rank_offset": 1 + i * self.tp_size,
             "world_size": self.world_size, "group_name": name, "backend": self.backend}
            for i in range(len(self.urls))
        ]
        # One rendezvous at a time: a server joins groups one after another, in the order they are asked for.
        with one_at_a_time(self.store, f"{self.group_name}/turn"):
            futures = admin.submit_all(self.urls, "/init_weights_update_group", payloads, timeout_s=self.timeout_s)
            self.pg = admin.collective_beside_calls(
                lambda: new_update_group(self.group_store, self.world_size, name, self.backend, self.timeout_s),
                futures, "init_weights_update_group")
        self.stage_group = name

    def _send_bucket(self, names: dict, flat: torch.Tensor, version: str, flush: bool) -> None:
        """The HTTP call to every server at once, and the broadcast they wait for."""
        payload = {**names, "group_name": self.stage_group, "load_format": "flattened_bucket", "flush_cache": flush,
                   "weight_version": version}
        futures = admin.submit_all(self.urls, "/update_weights_from_distributed", payload, timeout_s=self.timeout_s)
        try:
            admin.collective_beside_calls(lambda: broadcast_from_rank0(flat, self.pg), futures,
                                          "update_weights_from_distributed")
        except CollectiveAbandoned:
            self.abandoned = True  # the broadcast still blocks on its thread: close() must not destroy the group
            raise

    def _push(self, named_tensors, version: str):
        """`sync`'s push: rank 0 alone, bucket after bucket, over stage 0's group."""
        self.connect(0)
        admin.call_all(self.urls, "/begin_weight_update", {}, timeout_s=self.timeout_s)
        try:
            n = nbytes = nbuckets = 0
            buckets = iter_buckets(named_tensors, self.bucket_bytes)
            bucket = next(buckets)
            while bucket is not None:
                following = next(buckets, None)
                flat = flatten(bucket, self.device)
                self._send_bucket(meta(bucket), flat, version, flush=following is None)
                n, nbytes, nbuckets = n + len(bucket), nbytes + flat.numel(), nbuckets + 1
                bucket = following
            admin.call_all(self.urls, "/end_weight_update", {}, timeout_s=self.timeout_s)
        except BaseException:
            close_sessions(self.urls)
            raise
        return n, nbytes, nbuckets

    def sync_model(self, model, spec, version: str) -> SyncStats | None:
        """Every pipeline stage pushes its own layers (see the module docstring); every trainer rank calls it.
        Returns stats with `stage_bytes` on global rank 0, None elsewhere; raises on every rank if any stage failed."""
        from megatron_topd.convert import export_stage_hf_weights, stage_role

        self.check_version(version)
        t0 = time.perf_counter()
        role = stage_role()
        ready = ""
        if _rank() == 0:
            try:
                self.pause()
                admin.call_all(self.urls, "/begin_weight_update", {}, timeout_s=self.timeout_s)
            except Exception as e:  # noqa: BLE001 - every rank must hear it, not only rank 0
                ready = f"pause/begin_weight_update: {e}"
        ready = broadcast_object(ready)
        if ready:
            raise self.failed(version, ready)
        stream = export_stage_hf_weights(model, spec)
        counts, error = (0, 0, 0), ""
        if role.pushes:
            try:
                counts = self._push_stage(role.stage, stream, version)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = f"stage {role.stage}: {type(e).__name__}: {e}"
        else:
            for _ in stream:  # this rank's part of the stage's TP gathers
                pass
        reports = [None] * dist.get_world_size()
        dist.all_gather_object(reports, (role.stage if role.pushes else -1, counts, error))
        errors = [e for _, _, e in reports if e]
        if _rank() == 0:
            try:
                if errors:
                    raise WeightSyncError("; ".join(errors))
                admin.call_all(self.urls, "/end_weight_update", {}, timeout_s=self.timeout_s)
            except BaseException as e:
                close_sessions(self.urls)
                raise self.failed(version, e) from e
            self.finish(version)
        elif errors:
            raise self.failed(version, "; ".join(errors))
        if _rank() != 0:
            return None
        stages = sorted((s, c) for s, c, _ in reports if s >= 0)
        return SyncStats(self.method, version, sum(c[0] for _, c in stages), sum(c[1] for _, c in stages),
                         sum(c[2] for _, c in stages), time.perf_counter() - t0, [c[1] for _, c in stages])

    def _push_stage(self, stage: int, stream, version: str) -> tuple[int, int, int]:
        """This stage's buckets: built here (the stream drives the TP gathers), sent by a thread, one bucket apart.
        The stream is always drained, even after a failed send, so the stage's other TP ranks are never left waiting."""
        self.connect(stage)
        ready: queue.Queue = queue.Queue(maxsize=1)
        counts = [0, 0, 0]

        def send_all() -> None:
            error, first = None, True
            while (item := ready.get()) is not None:
                if error is not None:
                    continue  # keep taking buckets so the builder never blocks
                try:
                    with one_at_a_time(self.store, f"{self.group_name}/turn"):
                        # flush with the stage's first bucket: generation is paused, so nothing refills the cache
                        # before the sync ends, and no look-ahead is needed to find the last bucket
                        self._send_bucket(item[0], item[1], version, flush=first)
                except BaseException as e:  # noqa: BLE001 - raised below, after the queue is drained
                    error = e
                first = False
            if error is not None:
                raise error

        with ThreadPoolExecutor(max_workers=1) as sender_pool:
            sender = sender_pool.submit(send_all)
            try:
                for bucket in iter_buckets(stream, self.bucket_bytes):
                    flat = flatten(bucket, self.device)
                    counts = [counts[0] + len(bucket), counts[1] + flat.numel(), counts[2] + 1]
                    ready.put((meta(bucket), flat))
            finally:
                ready.put(None)
            sender.result()
        return counts[0], counts[1], counts[2]

    def close(self) -> None:
        """Tear this rank's group down on the servers and here."""
        if self.pg is not None:
            for url in self.urls:
                try:
                    admin.call(url, "/destroy_weights_update_group", {"group_name": self.stage_group}, timeout_s=60)
                except Exception:  # noqa: BLE001 - a dead server has no group left to destroy
                    pass
            if not self.abandoned:
                destroy(self.pg)
            self.pg = None
        self.store = self.group_store = None  # the last references: the port is released
        self.closed = True
