"""TOPD at TP=2 over gloo: the vocabulary-parallel embedding lookup and the probe with one sampling rank,
compared with a single-process run on the whole table."""
import pytest
import torch
from torch import nn

from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.topd import TopdConfig, TorchModelSampler, embedding_lookup, run_probe, vocab_parallel_rows

VOCAB, HIDDEN, EOS, PAD = 24, 16, 1, 0


def _table() -> torch.Tensor:
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(3))


class _TinyLM(nn.Module):
    def __init__(self, seed: int):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB, 8)
            self.rnn = nn.GRU(8, 8, batch_first=True)
            self.head = nn.Linear(8, VOCAB)

    def forward(self, ids):
        return self.head(self.rnn(self.embed(ids))[0]) * 4.0


class _Refuse:
    """Stands on ranks that must not sample: calling it fails the test."""

    def continue_prefixes(self, *a, **kw):
        raise AssertionError("only the TP group's first rank may call the samplers")


def _batch():
    g = torch.Generator().manual_seed(9)
    tokens = torch.randint(2, VOCAB, (4, 30), generator=g)
    mask = torch.zeros(4, 30, dtype=torch.bool)
    for b, (p, n) in enumerate([(3, 30), (5, 22), (4, 30), (6, 12)]):
        mask[b, p:n] = True
    return tokens, torch.rand(4, 30, generator=g), mask


def _probe(embed, on_sampling_rank: bool, group):
    tokens, loss, mask = _batch()
    cfg = TopdConfig(variant="topd", top_k=2, min_gap=3, window=6, samples_per_side=2, low_fraction=0.3,
                     position_weighting="ot_plan")
    if on_sampling_rank:
        samplers = dict(teacher=TorchModelSampler(_TinyLM(1), eos_id=EOS),
                        student=TorchModelSampler(_TinyLM(2), eos_id=EOS))
    else:
        samplers = dict(teacher=_Refuse(), student=_Refuse())
    r = run_probe(tokens, loss, mask, cfg, embed=embed, pad_id=PAD, seed=4, group=group, **samplers)
    return dict(candidates=r.candidates, teacher=r.teacher_windows, student=r.student_windows, ot=r.ot_distances,
                divergent=r.divergent, token_weights=r.token_weights, g_tokens=r.guidance.tokens,
                g_weights=r.guidance.logit_weights)


def _on_rank():
    from megatron_topd.parallel import initialize, tensor_parallel_group

    layout = initialize(tensor_parallel=2)
    group = tensor_parallel_group()
    shard = _table().chunk(2, dim=0)[layout.tp_rank].clone().requires_grad_()
    ids = torch.tensor([[0, 11, 12, 23, 5], [17, 17, 2, 12, 0]])
    rows = vocab_parallel_rows(ids, shard, group=group)
    errors = []
    try:
        vocab_parallel_rows(torch.tensor([3, VOCAB]), shard, group=group)
    except ValueError as e:
        errors.append(str(e))
    probe = _probe(embedding_lookup(shard, group=group), layout.tp_rank == 0, group)
    return dict(tp_rank=layout.tp_rank, rows=rows, rows_grad=rows.requires_grad, errors=errors, probe=probe)


def test_vocab_parallel_lookup_and_probe_at_tp2():
    results = run_on_ranks(_on_rank, 2, timeout=240)
    table = _table()
    ids = torch.tensor([[0, 11, 12, 23, 5], [17, 17, 2, 12, 0]])
    reference = _probe(embedding_lookup(table), True, None)
    assert [r["tp_rank"] for r in results] == [0, 1]
    for r in results:
        assert torch.equal(r["rows"], table[ids])  # exactly: each row comes from one rank, the others add zeros
        assert not r["rows_grad"]
        assert len(r["errors"]) == 1 and "token ids must lie in [0, 24)" in r["errors"][0]
        p = r["probe"]
        assert p["candidates"] == reference["candidates"]
        assert p["teacher"] == reference["teacher"] and p["student"] == reference["student"]
        assert torch.allclose(p["ot"], reference["ot"], atol=1e-6) and (p["ot"] > 0).any()
        assert torch.equal(p["divergent"], reference["divergent"]) and not p["divergent"].all()
        assert torch.equal(p["token_weights"], reference["token_weights"])
        assert torch.equal(p["g_tokens"], reference["g_tokens"])
        assert torch.allclose(p["g_weights"], reference["g_weights"], atol=1e-5)
    # both TP ranks hold bit-identical probe results (decisions must agree across the group)
    assert torch.equal(results[0]["probe"]["ot"], results[1]["probe"]["ot"])


@pytest.mark.parametrize("vocab_start", [None, 4])
def test_lookup_without_group_uses_the_whole_table(vocab_start):
    table = _table()
    ids = torch.tensor([4, 9, 23])
    if vocab_start is None:
        assert torch.equal(vocab_parallel_rows(ids, table), table[ids])
    else:
        # a single shard holding rows [4, 24): ids it owns come back, with the explicit start honoured
        assert torch.equal(vocab_parallel_rows(ids, table[4:], vocab_start=4, vocab_size=VOCAB), table[ids])
