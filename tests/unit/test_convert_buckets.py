"""`iter_buckets` cuts an export stream at the same names on every rank, whether it holds tensors or None."""
import json

import torch

from megatron_topd.convert import iter_buckets, spec_from_hf_config, tensor_maps
from megatron_topd.convert.mapping import hf_shapes
from megatron_topd.testing.tiny_families import family_config


def test_buckets_cut_alike_with_and_without_tensors():
    spec = spec_from_hf_config(json.loads(family_config("qwen3_moe").to_json_string()))
    shapes = hf_shapes(spec)
    names = [n for m in tensor_maps(spec) for n in m.hf]
    full = [(n, torch.zeros(shapes[n], dtype=torch.bfloat16)) for n in names]
    empty = [(n, None) for n in names]
    bucket_bytes = 64 * 1024
    with_tensors = list(iter_buckets(iter(full), spec, bucket_bytes))
    without = list(iter_buckets(iter(empty), spec, bucket_bytes))
    assert [[n for n, _ in b] for b in with_tensors] == [[n for n, _ in b] for b in without]
    assert [n for b in with_tensors for n, _ in b] == names
    sizes = [sum(t.numel() * 2 for _, t in b) for b in with_tensors]
    assert len(sizes) > 3 and all(s >= bucket_bytes for s in sizes[:-1])
    # a bucket closes as soon as it reaches the limit: without its last tensor it was below
    assert all(s - b[-1][1].numel() * 2 < bucket_bytes for s, b in zip(sizes[:-1], with_tensors))
