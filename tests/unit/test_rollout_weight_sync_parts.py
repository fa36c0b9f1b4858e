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


def test_tensor_payload_is_torch_forking_pickle_sharing_memory():
    src = [("x", torch.randn(4, 3)), ("y", torch.arange(6, dtype=torch.bfloat16))]
    payload = serialize_named_tensors(src)
    raw = base64.b64decode(payload)
    assert b"rebuild_storage_filename" in raw  # file_system strategy: shared memory, not the tensor bytes
    assert torch.multiprocessing.get_sharing_strategy() == "file_descriptor"  # restored afterwards
    back = pickle.loads(raw)
    assert [n for n, _ in back] == ["x", "y"]
    for (_, a), (_, b) in zip(src, back):
        assert a.dtype == b.dtype and torch.equal(a, b)
