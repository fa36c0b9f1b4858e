"""Pieces of weight sync that need no server: bucketing, and the tensor payload format SGLang unpickles."""
from __future__ import annotations

import base64
import pickle

import pytest
import torch

from megatron_topd.rollout.weight_sync.buckets import flatten, iter_buckets, meta
from megatron_topd.rollout.weight_sync.tensor_ipc import serialize_named_tensors


def named():
    return [("a", torch.zeros(10)), ("b", torch.ones(30)), ("c", torch.arange(5, dtype=torch.bfloat16)),
            ("d", torch.full((2, 3), 2.0)), ("e", torch.zeros(100))]


def test_buckets_respect_size_and_dtype():
    buckets = list(iter_buckets(named(), max_bytes=160))
    assert [[n for n, _ in b] for b in buckets] == [["a", "b"], ["c"], ["d"], ["e"]]
    for b in buckets:
        assert len({t.dtype for _, t in b}) == 1
    assert meta(buckets[0]) == {"names": ["a", "b"], "dtypes": ["float32", "float32"], "shapes": [[10], [30]]}
    flat = flatten(buckets[0], torch.device("cpu"))
    assert flat.dtype == torch.uint8 and flat.numel() == 160
    assert torch.equal(flat[40:].view(torch.float32), torch.ones(30))


def test_bucket_input_errors():
    with pytest.raises(ValueError, match="appears twice"):
        list(iter_buckets([("a", torch.zeros(1)), ("a", torch.zeros(1))], 100))
    with pytest.raises(ValueError, match="iterator was empty"):
        list(iter_buckets([], 100))
    with pytest.raises(TypeError, match=r"weight w: expected a torch\.Tensor"):
        list(iter_buckets([("w", [1.0])], 100))


_ROUNDTRIP = """
import base64, json, pickle, torch
from megatron_topd.rollout.weight_sync.tensor_ipc import end_shm_managers, serialize_named_tensors
src = [("x", torch.randn(4, 3)), ("y", torch.arange(6, dtype=torch.bfloat16))]
raw = base64.b64decode(serialize_named_tensors(src))
after = torch.multiprocessing.get_sharing_strategy()
back = pickle.loads(raw)
out = {"file_system": b"rebuild_storage_filename" in raw, "strategy_after": after, "names": [n for n, _ in back],
       "equal": [a.dtype == b.dtype and torch.equal(a, b) for (_, a), (_, b) in zip(src, back)]}
del back
out["ended"] = len(end_shm_managers())
print(json.dumps(out))
"""


def test_tensor_payload_is_torch_forking_pickle_sharing_memory():
    """Runs in a fresh interpreter: once a process has ended its torch_shm_manager (the tensor sync's close() does,
    as the issue asks), torch cannot share CPU memory in it again, so this check must not depend on earlier tests."""
    import json
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", _ROUNDTRIP], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["file_system"]  # file_system strategy: shared memory, not the tensor bytes
    assert out["strategy_after"] == "file_descriptor"  # restored afterwards
    assert out["names"] == ["x", "y"] and out["equal"] == [True, True]
    assert out["ended"] == 1  # the helper process it started was ended

def test_stages_take_turns_on_the_store_first_come_first_served():
    """The per-stage push's lock (process_group.one_at_a_time): a second holder waits until the first releases."""
    import threading
    import time

    from megatron_topd.rollout.weight_sync.process_group import connect_store, listen, one_at_a_time

    store = listen(0, 1, 30)
    order = []

    def second():  # another pushing rank: its own client of rank 0's store
        with one_at_a_time(connect_store("127.0.0.1", store.port, 30), "turn"):
            order.append("second")

    with one_at_a_time(store, "turn"):
        worker = threading.Thread(target=second)
        worker.start()
        deadline = time.monotonic() + 30
        while store.add("turn/ticket", 0) < 2:  # the worker holds ticket 2 and waits on the store
            assert time.monotonic() < deadline, "the second holder never asked for its turn"
            time.sleep(0.01)  # polling interval of a wait on the store's ticket counter (deadline above)
        order.append("first")
    worker.join(timeout=30)
    assert order == ["first", "second"] and not worker.is_alive()
