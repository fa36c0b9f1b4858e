"""The distributed weight sync's rendezvous port: chosen and bound once, by trainer rank 0 (the rank that listens),
and broadcast to the other ranks; no rank binds `master_address`, which is trainer node 1's address and cannot be
assigned on trainer nodes 2+ (there a bind failed with Errno 99 after the model had loaded).

Two real gloo ranks; the master address is one no interface of this machine holds (TEST-NET-2), as trainer node 1's
address is on every other trainer node. The sync is never run (no server is needed to build the object)."""
from __future__ import annotations

import socket

from megatron_topd.parallel.spawn import run_on_ranks

NOT_LOCAL = "198.51.100.7"  # RFC 5737 documentation range: assigned to no interface here


def _make_sync():
    import torch.distributed as dist

    from megatron_topd.rollout.weight_sync import DistributedWeightSync

    sync = DistributedWeightSync(["http://198.51.100.8:30000"], master_address=NOT_LOCAL, backend="gloo", timeout_s=30)
    listening = None
    if dist.get_rank() == 0:  # the port is bound (and accepting) from the moment the object exists
        with socket.create_connection(("127.0.0.1", sync.master_port), timeout=5):
            listening = True
    result = (sync.master_port, sync.group_name, sync.store is not None, listening)
    sync.close()
    return result


def test_port_is_bound_by_rank0_only_and_shared():
    with socket.socket() as s:  # the premise: this machine cannot bind the master address
        try:
            s.bind((NOT_LOCAL, 0))
            raise AssertionError(f"{NOT_LOCAL} is assignable here: the test needs an address that is not")
        except OSError as e:
            assert e.errno == 99, e
    (port0, group0, store0, up0), (port1, group1, store1, up1) = run_on_ranks(_make_sync, 2, timeout=120)
    assert port0 == port1 and 0 < port0 < 65536, (port0, port1)
    assert group0 == group1
    assert store0 and up0 and not store1 and up1 is None
