"""A remote teacher's per-row scores reach only the ranks whose loss reads them: rank 0 holds every row's scores,
`replica_rows` gives each data-parallel replica its rows and sends their scores to that replica's last pipeline stage
(all of its TP ranks); every other rank gets None. Checked at (TP, PP, DP) = (2, 1, 2), (1, 2, 2), (2, 2, 1),
(1, 1, 4) on 4 gloo ranks, against the single-process dealing; the dealing itself against hand values."""
import torch

from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.train.dealing import deal_rows

LENGTHS = [(3, 5), (2, 9), (4, 1), (6, 6), (1, 2), (5, 3), (2, 2)]  # (prompt, response) tokens per row


def _scores(i: int) -> dict:
    g = torch.Generator().manual_seed(i)
    r = LENGTHS[i][1]
    return {"token_logprobs": -torch.rand(r, generator=g), "topk_ids": torch.randint(0, 50, (r, 4), generator=g,
                                                                                        dtype=torch.int32),
            "topk_logprobs": -torch.rand(r, 4, generator=g)}


def _on_rank(tp: int, pp: int):
    import torch.distributed as dist

    from megatron_topd.parallel import initialize
    from megatron_topd.rollout.step_batch import StepBatch
    from megatron_topd.train.loop import replica_rows

    layout = initialize(tensor_parallel=tp, pipeline_parallel=pp)
    rank0 = dist.get_rank() == 0
    batch = StepBatch.from_rows([[7] * p for p, _ in LENGTHS], [[8] * r for _, r in LENGTHS],
                                [[-0.5] * r for _, r in LENGTHS], ["stop"] * len(LENGTHS), ["1"] * len(LENGTHS), {},
                                teacher=[_scores(i) for i in range(len(LENGTHS))] if rank0 else None,
                                has_teacher_scores=True)
    rows = replica_rows(batch, layout)
    return {"dp": layout.dp_rank, "last": layout.is_last_stage, "tp": layout.tp_rank,
            "lengths": rows.lengths(), "teacher": rows.teacher}


def test_deal_rows_longest_first_to_the_lightest_replica():
    lengths = [p + r for p, r in LENGTHS]  # 8 11 5 12 3 8 4
    assert deal_rows(lengths, 1) == [list(range(7))]
    # 12 (row 3) -> 0; 11 (1) -> 1; 8 (0) -> 1 (11 < 12); 8 (5) -> 0; 5 (2) -> 1; 4 (6) -> 0; 3 (4): 24 = 24 -> 0
    assert deal_rows(lengths, 2) == [[3, 4, 5, 6], [0, 1, 2]]
    assert sorted(i for part in deal_rows(lengths, 3) for i in part) == list(range(7))


LAYOUTS = [(2, 1), (1, 2), (2, 2), (1, 1)]  # (TP, PP) on 4 ranks; DP is the rest


def _every_layout():
    """All layouts in one spawn (`initialize` rebuilds Megatron's groups for each): one rank start-up, not four."""
    return {layout: _on_rank(*layout) for layout in LAYOUTS}


def test_remote_scores_reach_only_each_replicas_last_stage():
    per_rank = run_on_ranks(_every_layout, 4, timeout=300)
    lengths = [p + r for p, r in LENGTHS]
    for tp, pp in LAYOUTS:
        results = [r[(tp, pp)] for r in per_rank]
        dp = 4 // (tp * pp)
        replicas = deal_rows(lengths, dp)
        for r in results:
            mine = replicas[r["dp"]]
            assert r["lengths"] == [lengths[i] for i in mine], (tp, pp)
            if not r["last"]:
                assert r["teacher"] is None, "a rank that computes no loss holds no teacher scores"
                continue
            assert r["teacher"] is not None and len(r["teacher"]) == len(mine)
            for got, i in zip(r["teacher"], mine):
                want = _scores(i)
                assert got.keys() == want.keys()
                assert all(torch.equal(got[k], want[k]) for k in want)
        assert sum(r["last"] for r in results) == 4 // pp, (tp, pp)
