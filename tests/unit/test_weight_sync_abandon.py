"""A server that dies while the trainer waits in the weight-update group's rendezvous ends `connect` at once.

The rendezvous waits on the store for the server's key; the turn lock (`one_at_a_time`) is released on the store
too. When both shared one store client, the release queued behind that wait and the CollectiveAbandoned came only at
the store's timeout (600 s in a job, every trainer rank held): seen once in 20 runs of the killed-server integration
test and once in a fresh-clone `make test`. Here the order is forced: the server (a socket that takes the HTTP call
and then closes without an answer, as a process that dies mid-request) goes away only once rank 0's rendezvous has
published its address and is waiting for the server's."""
from __future__ import annotations

import socket
import threading

import pytest

from megatron_topd.rollout.errors import CollectiveAbandoned
from megatron_topd.rollout.weight_sync import DistributedWeightSync, admin
from megatron_topd.rollout.weight_sync.process_group import connect_store
from megatron_topd.testing.waits import threads_since, wait_until

STORE_TIMEOUT_S = 120  # the bug's wait; the test's bound below is a bound on a failure, not a timing


def test_server_dying_mid_rendezvous_abandons_the_group_at_once():
    listener = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    called, die = threading.Event(), threading.Event()

    def server() -> None:
        conn, _ = listener.accept()
        conn.recv(65536)  # /init_weights_update_group has arrived
        called.set()
        die.wait(STORE_TIMEOUT_S)
        conn.close()  # dies before answering
        listener.close()

    threading.Thread(target=server, daemon=True).start()
    sync = DistributedWeightSync([url], backend="gloo", timeout_s=STORE_TIMEOUT_S)
    observer = connect_store("127.0.0.1", sync.master_port, 30)
    assert observer.num_keys() == 0
    earlier = set(threading.enumerate())  # threads of other tests in this process (e.g. an integration test's sync)
    joining = admin.in_daemon_thread(sync.connect, name="test connect")
    # the turn's ticket, then rank 0's address in the group's store: the rendezvous now waits for the server's
    wait_until(lambda: called.is_set() and observer.num_keys() >= 2, 60,
               "the call to arrive and rank 0 to publish its address", poll_s=0.01)
    die.set()
    with pytest.raises(CollectiveAbandoned, match=rf"(?s)init_weights_update_group abandoned: 1 of 1 servers failed"
                                                  rf".*{url}/init_weights_update_group unreachable"):
        joining.result(timeout=STORE_TIMEOUT_S / 4)
    # the lock was released: the next turn's ticket is not held behind the abandoned rendezvous
    assert observer.get(f"{sync.group_name}/turn/released/1") == b"1"
    # nothing left behind: closing the store ends the abandoned rendezvous' wait (its thread is a daemon either way)
    sync.close()
    wait_until(lambda: not threads_since(earlier, "init_weights_update_group"), 60,
               "the abandoned rendezvous' thread to end once the store is closed", poll_s=0.01)
