"""The trainer's end of SGLang's weight-update process group (`/init_weights_update_group`).

SGLang builds that group on its side with torch's rendezvous over `tcp://master_address:master_port`, a PrefixStore
named after the group, and torch's (private) `_new_process_group_helper`; trainer rank 0 must build the same group as
rank 0, or the stores' keys do not meet. The group lives outside the trainer's default process group (which may not
exist, or may hold only trainer ranks). Trainer and servers should run the same torch version (the store layout is
torch's).
"""
from __future__ import annotations

import contextlib
from datetime import timedelta

import torch
from torch.distributed import distributed_c10d as c10d


def listen(port: int, world_size: int, timeout_s: float) -> "torch.distributed.TCPStore":
    """The group's rendezvous store, hosted here (rank 0) and listening at once on every interface of this node:
    `port` 0 lets the OS choose (read it back as `.port`), so no port is picked by one process and bound later.

    Hosted ourselves rather than through c10d.rendezvous: under torchrun, TORCHELASTIC_USE_AGENT_STORE makes rendezvous
    connect as a client to a store the elastic agent hosts, and nobody would host this one (deadlock). The store's own
    client reaches it through loopback; the servers connect to `master_address` (this node's routable address)."""
    return torch.distributed.TCPStore("127.0.0.1", port, world_size, True, timedelta(seconds=timeout_s),
                                      wait_for_workers=False, multi_tenant=True)


def connect_store(master_address: str, port: int, timeout_s: float) -> "torch.distributed.TCPStore":
    """A client of rank 0's store (`listen`): for the other pipeline stages' pushing ranks (any trainer node), and for
    each group's rendezvous, which must not share the lock's client (`one_at_a_time`)."""
    return torch.distributed.TCPStore(master_address, port, None, False, timedelta(seconds=timeout_s))


@contextlib.contextmanager
def one_at_a_time(store: "torch.distributed.TCPStore", name: str):
    """A first-come-first-served lock across processes, on the store: a ticket from `store.add`, then a wait for
    the previous ticket's release key (the store's timeout bounds the wait). One store client per holder: a client
    blocked in `wait` cannot send anything else, so nothing held inside the lock may wait on this client either (the
    release would queue behind it)."""
    ticket = store.add(f"{name}/ticket", 1)
    if ticket > 1:
        store.wait([f"{name}/released/{ticket - 1}"])
    try:
        yield
    finally:
        store.set(f"{name}/released/{ticket}", "1")


def new_update_group(store: "torch.distributed.TCPStore", world_size: int, group_name: str, backend: str,
                     timeout_s: float) -> "torch.distributed.ProcessGroup":
    """Create the group as rank 0 on `store` (from `listen`); blocks until all `world_size` ranks have joined."""
    timeout = timedelta(seconds=timeout_s)
    rank = 0
    pg, _ = c10d._new_process_group_helper(
        world_size, rank, [], c10d.Backend(backend), c10d.PrefixStore(group_name, store),
        group_name=group_name, timeout=timeout,
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


def broadcast_from_rank0(tensor: torch.Tensor, pg) -> None:
    opts = torch.distributed.BroadcastOptions()
    opts.rootRank = 0
    pg.broadcast([tensor], opts).wait()


def destroy(pg) -> None:
    try:
        torch.distributed.destroy_process_group(pg)
    except Exception:  # noqa: BLE001 - teardown of a group whose peers may be gone
        pass
