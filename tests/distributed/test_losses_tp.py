"""Vocabulary-parallel losses at TP = 2 and 4 over gloo: values and gradients of every rank's shard against the
float64 single-process full-vocabulary reference, chunked equal to unchunked, fp32 and bf16, with and without
padding; gradcheck at TP = 2; Megatron's TP group picked up by group=None (world 4 = two TP-2 groups).

Spawning ranks costs seconds and a case milliseconds, so each test is one spawn running a whole battery.
"""
from __future__ import annotations

import itertools

import torch
import torch.distributed as dist

from megatron_topd.losses import checking
from megatron_topd.parallel.spawn import run_on_ranks

# (name, keyword arguments): every public loss, both KL directions, temperatures.
LOSSES = [
    ("kl", {"direction": "reverse"}),
    ("kl", {"direction": "forward", "temperature": 0.7}),
    ("log_probs", {"temperature": 1.3}),
    ("entropy", {}),
    ("opd_scores", {}),
    ("topk_kl", {"direction": "reverse"}),
    ("topk_kl", {"direction": "forward"}),
]
LEAD = (2, 5)  # [batch, sequence]: 10 tokens
V_LOCAL = {2: 16, 4: 8}
CHUNKS = {2: (1, 4, 10), 4: (3, 10)}  # 10 = unchunked; None (automatic) is covered by the unit tests
FP32_TOL, BF16_GRAD_TOL = 1e-5, 4e-3  # bf16 gradients are returned in bf16: 2^-9 relative rounding per element
CHUNK_TOL = 4e-6  # chunked vs unchunked: reductions over 1 or 10 rows may round differently in the last bits


def _cases(world: int):
    v_local = V_LOCAL[world]
    padded = world * v_local
    # No padding; a few padding ids on the last rank; (TP 4) the last rank holding only padding.
    sizes = [padded, padded - 3] + ([padded - v_local - 2] if world >= 4 else [])
    for i, ((name, kw), vocab_size, dtype) in enumerate(itertools.product(LOSSES, sizes, (torch.float32, torch.bfloat16))):
        yield checking.make_problem(LEAD, padded, vocab_size, seed=i, dtype=dtype), name, kw, dtype


def _battery(world: int, group, rank: int) -> list:
    return [[checking.run_shard(p, name, rank=rank, world=world, group=group, dtype=dtype, chunk_size=c, **kw)
             for c in CHUNKS[world]] for p, name, kw, dtype in _cases(world)]


def _check_battery(world: int, per_rank: list) -> None:
    v_local = V_LOCAL[world]
    for i, (problem, name, kw, dtype) in enumerate(_cases(world)):
        want = checking.run_reference(problem, name, dtype=dtype, **kw)
        where = f"TP={world} {name} {kw} vocab_size={problem.vocab_size} {dtype}"
        for rank, rank_results in enumerate(per_rank):
            runs = rank_results[i]
            unchunked = runs[-1]
            for chunk, got in zip(CHUNKS[world], runs):
                for key, value in got.items():
                    err = checking.rel_err(value, unchunked[key])
                    assert err <= CHUNK_TOL, f"{where} rank {rank} chunk={chunk}: {key} off unchunked by {err:.1e}"
            for key, ref in want.items():
                if key == "grad":
                    ref = ref[..., rank * v_local : (rank + 1) * v_local]
                tol = BF16_GRAD_TOL if (key == "grad" and dtype == torch.bfloat16) else FP32_TOL
                err = checking.rel_err(unchunked[key], ref)
                assert err <= tol, f"{where} rank {rank}: {key} relative error {err:.2e} > {tol:.0e}"
            grad = unchunked["grad"]
            assert grad.dtype == dtype and unchunked["kl" if "kl" in unchunked else next(iter(unchunked))].dtype == torch.float32
            first_pad = problem.vocab_size - rank * v_local
            if first_pad < v_local:  # Megatron's padding ids on this rank get exactly zero gradient
                assert torch.all(grad[..., max(0, first_pad):] == 0), f"{where} rank {rank}: padding got gradient"


# ---- gradcheck at TP 2: ranks take turns; the others replay every forward so the collectives line up -------------

def _loss_fn(problem, name, kw, rank, world, group):
    """x (this rank's float64 student shard) -> the differentiable outputs of loss `name`."""
    from megatron_topd import losses

    v_local = problem.student.shape[-1] // world
    t = problem.teacher[..., rank * v_local : (rank + 1) * v_local].double()
    common = dict(group=group, vocab_size=problem.vocab_size, chunk_size=1)
    return {
        "kl": lambda x: losses.vocab_parallel_kl(x, t, **common, **kw),
        "log_probs": lambda x: losses.vocab_parallel_log_probs(x, problem.token_ids, **common, **kw),
        "entropy": lambda x: losses.vocab_parallel_entropy(x, **common, **kw),
        "opd_scores": lambda x: tuple(losses.vocab_parallel_opd_scores(x, t, problem.token_ids, **common, **kw)[i]
                                      for i in (0, 1, 3)),
        "topk_kl": lambda x: losses.vocab_parallel_topk_kl(x, problem.topk_ids, problem.topk_logprobs, **common, **kw),
    }[name]


def _gradcheck_in_turns(f, x: torch.Tensor, group) -> list[bool]:
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    passed = []
    for turn in range(world):
        if rank == turn:
            def g(y):
                dist.broadcast(torch.ones(1), src=turn, group=group)  # "run one forward with me"
                return f(y)

            passed.append(torch.autograd.gradcheck(g, (x.clone().requires_grad_(),), eps=1e-6, atol=1e-8,
                                                   rtol=1e-6, raise_exception=False))
            dist.broadcast(torch.zeros(1), src=turn, group=group)  # "done"
        else:
            flag = torch.empty(1)
            while True:
                dist.broadcast(flag, src=turn, group=group)
                if flag.item() == 0:
                    break
                f(x)
    return passed


def _gradchecks(world: int, group, rank: int) -> dict:
    # 2 tokens x 4 ids per rank, one padding id, chunk_size 1: small enough for full (not fast-mode) gradcheck.
    problem = checking.make_problem((2,), world * 4, world * 4 - 1, k=3, seed=11)
    x = problem.student[..., rank * 4 : (rank + 1) * 4].double()
    return {f"{name} {kw}": _gradcheck_in_turns(_loss_fn(problem, name, kw, rank, world, group), x, group)
            for name, kw in LOSSES}


def _tp2_ranks():
    rank = dist.get_rank()
    return {"battery": _battery(2, dist.group.WORLD, rank), "gradcheck": _gradchecks(2, dist.group.WORLD, rank)}


def test_tp2_values_gradients_and_gradcheck():
    per_rank = run_on_ranks(_tp2_ranks, 2, timeout=600)
    _check_battery(2, [r["battery"] for r in per_rank])
    for rank, r in enumerate(per_rank):
        failed = {name: turns for name, turns in r["gradcheck"].items() if not all(turns)}
        assert not failed, f"rank {rank}: gradcheck failed for {failed} (one bool per rank's turn)"


# ---- TP 4 with an explicit group, then Megatron's TP group (world 4 = two groups of 2) via group=None ------------


def _megatron_problem(tp_group_index: int):
    return checking.make_problem(LEAD, 2 * 16, 29, seed=100 + tp_group_index)


def _tp4_ranks():
    rank = dist.get_rank()
    battery = _battery(4, dist.group.WORLD, rank)
    from megatron.core import parallel_state as ps

    from megatron_topd.parallel import initialize

    initialize(tensor_parallel=2)
    tp_rank, tp_index = ps.get_tensor_model_parallel_rank(), rank // 2
    problem = _megatron_problem(tp_index)
    megatron = {name: checking.run_shard(problem, name, rank=tp_rank, world=2, group=None, chunk_size=4)
                for name in ("kl", "opd_scores")}
    return {"battery": battery, "megatron": megatron, "tp_rank": tp_rank}


def test_tp4_values_gradients_and_megatron_group():
    per_rank = run_on_ranks(_tp4_ranks, 4, timeout=600)
    _check_battery(4, [r["battery"] for r in per_rank])
    for rank, r in enumerate(per_rank):
        tp_rank = r["tp_rank"]
        assert tp_rank == rank % 2
        problem = _megatron_problem(rank // 2)
        for name, got in r["megatron"].items():
            want = checking.run_reference(problem, name)
            for key, ref in want.items():
                if key == "grad":
                    ref = ref[..., tp_rank * 16 : (tp_rank + 1) * 16]
                err = checking.rel_err(got[key], ref)
                assert err <= FP32_TOL, f"Megatron TP group, rank {rank}, {name}: {key} relative error {err:.2e}"
