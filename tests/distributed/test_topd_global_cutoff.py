"""The suppression cut-off over the whole batch at DP=2 (gloo): run_probe all-gathers each replica's candidate
distances (different counts per replica), decides once on the global vector and keeps its slice - equal to the
single-process decision on the concatenated distances, for every `topd.suppress` rule and threshold mode; the
probe's calibration metrics (`train.metrics.probe_metrics`) are identical on both ranks."""
import torch

from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.topd import TopdConfig, divergence_weights, ot_statistics

SEED = 11
# (candidate positions per row) per data-parallel rank; the student's window after prefix length t differs from
# the teacher's [2, 2, 2, 2] in t % 5 tokens (one-hot embeddings: OT distance = (t % 5) / 4)
ROWS = {0: [[5, 10, 11], [2, 3, 4]], 1: [[1, 6, 7]]}
CASES = {
    "low": dict(low_fraction=0.4),
    "threshold": dict(threshold=0.6),
    "high": dict(low_fraction=0.4, suppress="high"),
    "random": dict(low_fraction=0.4, suppress="random"),
}


class _Windows:
    def __init__(self, teacher: bool):
        self.teacher = teacher

    def continue_prefixes(self, prefixes, *, max_new_tokens, n, temperature, top_p, seed):
        out = []
        for p in prefixes:
            k = 0 if self.teacher else len(p) % 5
            out.append([[3] * k + [2] * (4 - k)] * n)
        return out


def _batch(rows):
    tokens = torch.full((len(rows), 14), 4, dtype=torch.long)
    loss = torch.zeros(len(rows), 14)
    mask = torch.zeros(len(rows), 14, dtype=torch.bool)
    mask[:, 1:] = True
    for b, positions in enumerate(rows):
        for i, t in enumerate(positions):
            loss[b, t] = 10.0 - i
    return tokens, loss, mask


def _on_rank():
    from megatron.core import parallel_state as ps

    from megatron_topd.parallel import initialize
    from megatron_topd.topd import gather_distances, run_probe
    from megatron_topd.train.handoffs import ProbeOutcome
    from megatron_topd.train.metrics import probe_metrics

    layout = initialize(tensor_parallel=1)
    dp = ps.get_data_parallel_group()
    tokens, loss, mask = _batch(ROWS[layout.dp_rank])
    out = {"dp_rank": layout.dp_rank}
    for name, kw in CASES.items():
        cfg = TopdConfig(variant="topd", top_k=3, min_gap=None, window=4, **kw)
        r = run_probe(tokens, loss, mask, cfg, teacher=_Windows(True), student=_Windows(False),
                      embed=lambda ids: torch.eye(8)[ids], pad_id=0, seed=SEED, dp_group=dp)
        out[name] = dict(candidates=r.candidates, ot=r.ot_distances, divergent=r.divergent,
                         weights=r.candidate_weights, windows=r.guidance.num_windows, stats=r.ot_stats,
                         metrics=probe_metrics(ProbeOutcome.from_probe(r)))
    # variable counts, one replica empty
    local = torch.tensor([0.5, 0.25]) if layout.dp_rank == 0 else torch.zeros(0)
    out["gather_empty"] = gather_distances(local, dp)
    return out


def test_global_cutoff_at_dp2_equals_the_single_process_cutoff():
    results = run_on_ranks(_on_rank, 2, timeout=240)
    assert [r["dp_rank"] for r in results] == [0, 1]
    everyone = torch.cat([results[0]["low"]["ot"], results[1]["low"]["ot"]])
    assert everyone.tolist() == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 0.25, 0.25, 0.5]
    expected_suppressed = {"low": 5, "threshold": 7, "high": 5, "random": 5}
    for name, kw in CASES.items():
        parts = [r[name] for r in results]
        assert parts[0]["candidates"] == ROWS[0] and parts[1]["candidates"] == ROWS[1]
        divergent = torch.cat([p["divergent"] for p in parts])
        weights = torch.cat([p["weights"] for p in parts])
        ref_w, ref_div = divergence_weights(everyone, seed=SEED, **kw)  # single process, concatenated distances
        assert torch.equal(divergent, ref_div), name
        assert torch.equal(weights, ref_w), name
        assert int((~divergent).sum()) == expected_suppressed[name], name
        assert [p["windows"] for p in parts] == [int(p["divergent"].sum()) for p in parts]
        stats = ot_statistics(everyone, ref_div)
        assert parts[0]["stats"] == parts[1]["stats"] == stats
        assert parts[0]["metrics"] == parts[1]["metrics"]
        m = parts[0]["metrics"]
        assert m["candidates"] == 9 and m["divergent"] == 9 - expected_suppressed[name]
        assert m["ot_q10"] == 0.0 and m["ot_q50"] == 0.25 and abs(m["ot_q90"] - 0.8) < 1e-12
    # hand values of the global rules (per replica, `low` would suppress 2 + 2 = 4, not 5)
    low = ~torch.cat([r["low"]["divergent"] for r in results])
    assert low.tolist() == [True, True, True, False, False, False, True, True, False]
    high = ~torch.cat([r["high"]["divergent"] for r in results])
    assert high[[3, 4, 5, 8]].all() and int(high[[2, 6, 7]].sum()) == 1 and not high[[0, 1]].any()
    m = results[0]["low"]["metrics"]
    assert abs(m["ot_mean_suppressed"] - 0.15) < 1e-12 and abs(m["ot_mean_kept"] - 2.75 / 4) < 1e-12
    assert results[0]["gather_empty"][0].tolist() == [0.5, 0.25] == results[1]["gather_empty"][0].tolist()
    assert [r["gather_empty"][1] for r in results] == [0, 2]
