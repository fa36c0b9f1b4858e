"""The tensor re-layouts of `convert.layout`: grouped QKV, gate/up, vocab padding and TP shard merging."""
import pytest
import torch

from megatron_topd.convert import layout


def labelled(rows: int, base: float, cols: int = 3) -> torch.Tensor:
    """Row i holds base + i in every column, so a re-layout can be read off the first column."""
    return (base + torch.arange(rows, dtype=torch.float32)).unsqueeze(1).repeat(1, cols)


def test_qkv_is_grouped_per_query_group():
    heads, kv_heads, d = 4, 2, 2
    q, k, v = labelled(heads * d, 0), labelled(kv_heads * d, 100), labelled(kv_heads * d, 200)
    fused = layout.fuse_qkv(q, k, v, heads, kv_heads)
    # group 0: q heads 0,1 then k0 then v0; group 1: q heads 2,3 then k1 then v1
    expected = [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]
    assert fused[:, 0].tolist() == expected
    assert all(torch.equal(a, b) for a, b in zip(layout.split_qkv(fused, heads, kv_heads), (q, k, v)))


def test_qkv_bias_and_tp_shards_hold_whole_groups():
    heads, kv_heads, d = 8, 2, 3
    q, k, v = torch.randn(heads * d), torch.randn(kv_heads * d), torch.randn(kv_heads * d)
    fused = layout.fuse_qkv(q, k, v, heads, kv_heads)
    shards = layout.split_tp("column", fused, 2)
    # each TP rank holds exactly one kv group: its own q heads, k and v
    for g, shard in enumerate(shards):
        sq, sk, sv = layout.split_qkv(shard, heads // 2, 1)
        assert torch.equal(sq, q[g * 4 * d : (g + 1) * 4 * d]) and torch.equal(sk, k[g * d : (g + 1) * d])
        assert torch.equal(sv, v[g * d : (g + 1) * d])
    assert torch.equal(layout.merge_tp_shards("column", shards), fused)


def test_qkv_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="query heads"):
        layout.fuse_qkv(torch.zeros(8, 4), torch.zeros(3, 4), torch.zeros(3, 4), 4, 2)


def test_fc1_tp_shards_are_gate_up_per_rank():
    gate, up = labelled(8, 0), labelled(8, 100)
    fc1 = layout.fuse_gate_up(gate, up)
    shards = layout.split_tp("fc1", fc1, 2)
    assert shards[0][:, 0].tolist() == [0, 1, 2, 3, 100, 101, 102, 103]
    assert shards[1][:, 0].tolist() == [4, 5, 6, 7, 104, 105, 106, 107]
    assert not torch.equal(torch.cat(shards), fc1)  # plain concatenation would be wrong
    assert torch.equal(layout.merge_tp_shards("fc1", shards), fc1)
    assert all(torch.equal(a, b) for a, b in zip(layout.split_gate_up(fc1), (gate, up)))


@pytest.mark.parametrize("kind", ["column", "row", "fc1", "replicated"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merge_inverts_split(kind, tp):
    full = torch.randn(16, 8)
    assert torch.equal(layout.merge_tp_shards(kind, layout.split_tp(kind, full, tp)), full)


def test_vocab_padding_roundtrip():
    w = torch.randn(1000, 4)
    padded = layout.pad_vocab(w, 1024)
    assert padded.shape == (1024, 4) and padded[1000:].abs().sum() == 0
    assert torch.equal(layout.unpad_vocab(padded, 1000), w)
    with pytest.raises(ValueError, match="exceed"):
        layout.pad_vocab(w, 512)
