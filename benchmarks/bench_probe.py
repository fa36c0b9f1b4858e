"""The probe's trainer-side work at the paper's shape, before (today's per-candidate code path, reproduced here) and
after (batched cost product, assignment for equal lengths, solves split over TP ranks), side by side in one run.

Shape: 64 responses x 2048 tokens, top-3 candidates per response (192), K = 50, hidden 4096, vocabulary 151936,
embedding table bf16. Windows are random ids with the mix a sampled probe gives: 1/4 identical (greedy agreement:
distance 0), 1/4 sharing most tokens, 1/4 independent, 1/4 cut short by an early EOS on one side (unequal lengths).
Window generation is the servers' time (measured by bench_step.py as window_s); here only the trainer's part:
candidate selection, requests, embedding lookup + OT, weights, guidance rows. "after, TP=2" runs on two gloo ranks,
each with its half of the table (the lookup all-reduces) and half of the solves; the slower rank's time is shown.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_probe.py
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from megatron_topd.topd import (
    build_guidance,
    build_requests,
    divergence_weights,
    embedding_lookup,
    select_candidates,
    token_weights,
    window_divergence,
)
from megatron_topd.topd.divergence import WindowDivergence
from megatron_topd.topd.ot import emd


def old_window_divergence(teacher_windows, student_windows, embed, *, with_transport=False):
    """Today's path before issue 14 (commit 1a593b6): one cost product and one POT network-simplex solve per
    (candidate, teacher window, student window), in Python, on every TP rank."""
    all_ids = [i for side in (teacher_windows, student_windows) for ws in side for w in ws for i in w]
    vocab_ids = torch.unique(torch.tensor(all_ids, dtype=torch.long))
    rows = embed(vocab_ids).detach().float().cpu()
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(torch.finfo(rows.dtype).tiny)

    def local(w):
        return torch.searchsorted(vocab_ids, torch.tensor(list(w), dtype=torch.long))

    distance = torch.zeros(len(teacher_windows), dtype=torch.float64)
    pair_distance, transport = [], ([] if with_transport else None)
    for c, (tw, sw) in enumerate(zip(teacher_windows, student_windows)):
        t_idx, s_idx = [local(w) for w in tw], [local(w) for w in sw]
        pd = np.zeros((len(t_idx), len(s_idx)))
        flows = [np.zeros(len(i)) for i in t_idx]
        for a, ia in enumerate(t_idx):
            for b, ib in enumerate(s_idx):
                cost = (1.0 - unit[ia] @ unit[ib].T).double().clamp_(0.0, 2.0)
                cost[ia[:, None] == ib[None, :]] = 0.0
                m = cost.numpy()
                pd[a, b], plan = emd(m)
                if with_transport:
                    flows[a] += (plan * m).sum(axis=1) / len(s_idx)
        distance[c] = float(pd.mean())
        pair_distance.append(pd)
        if transport is not None:
            transport.append(flows)
    return WindowDivergence(distance, pair_distance, transport)


def make_inputs(args):
    g = torch.Generator().manual_seed(args.seed)
    b, s, k = args.batch, args.seq, args.window
    tokens = torch.randint(0, args.vocab, (b, s), generator=g)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    pos = torch.arange(s)[None]
    mask = (pos >= args.prompt) & (pos < lengths[:, None])
    loss = torch.rand(b, s, generator=g)
    table = torch.randn(args.vocab, args.hidden, generator=g, dtype=torch.float32).to(torch.bfloat16)
    n = sum(len(c) for c in select_candidates(loss, mask, top_k=args.top_k, min_gap=8))
    rng = np.random.default_rng(args.seed)
    teacher_w, student_w = [], []
    for c in range(n):
        t = rng.integers(0, args.vocab, size=k).tolist()
        kind = c % 4
        if kind == 0:
            st = list(t)
        elif kind == 1:
            st = list(t)
            st[-10:] = rng.integers(0, args.vocab, size=10).tolist()
        elif kind == 2:
            st = rng.integers(0, args.vocab, size=k).tolist()
        else:
            st = t[: int(rng.integers(5, k))]  # early EOS
        teacher_w.append([t])
        student_w.append([st])
    return tokens, mask, loss, table, teacher_w, student_w


def probe_work(tokens, mask, loss, embed, teacher_w, student_w, args, divergence_fn, **div_kw):
    """Everything run_probe does on the trainer besides asking the servers; returns (parts, distances)."""
    parts = {}
    t = time.perf_counter()
    candidates = select_candidates(loss, mask, top_k=args.top_k, min_gap=8)
    requests = build_requests(tokens, candidates)
    parts["candidates + requests"] = time.perf_counter() - t
    t = time.perf_counter()
    div = divergence_fn(teacher_w, student_w, embed, **div_kw)
    parts["lookup + OT"] = time.perf_counter() - t
    t = time.perf_counter()
    weights, divergent = divergence_weights(div.distance, low_fraction=0.3)
    token_weights(mask, candidates, weights)
    build_guidance(requests, teacher_w, divergent, pad_id=0)
    parts["weights + guidance"] = time.perf_counter() - t
    parts["total"] = sum(parts.values())
    return parts, div.distance


def _tp_rank(args):
    """One gloo rank of a TP group: before (float32 rows all-reduced, every rank solves every pair) and after."""
    import torch.distributed as dist

    tokens, mask, loss, table, teacher_w, student_w = make_inputs(args)
    world, rank = dist.get_world_size(), dist.get_rank()
    shard = table.shape[0] // world
    local = table[rank * shard:(rank + 1) * shard].clone()
    del table
    out = {}
    for name, fn, dtype, kw in (("before", old_window_divergence, torch.float32, {}),
                                ("after", window_divergence, None, {"group": dist.group.WORLD})):
        embed = embedding_lookup(local, group=dist.group.WORLD, vocab_start=rank * shard, vocab_size=shard * world,
                                 dtype=dtype)
        best = None
        for _ in range(args.repeats):
            dist.barrier()
            parts, d = probe_work(tokens, mask, loss, embed, teacher_w, student_w, args, fn, **kw)
            best = (parts, d) if best is None or parts["total"] < best[0]["total"] else best
        out[name] = best
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=3, help="best of this many runs per column")
    ap.add_argument("--tp", type=int, default=2, help="also run 'after' on this many gloo ranks (0: skip)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    tokens, mask, loss, table, teacher_w, student_w = make_inputs(args)
    cols = {}
    for name, fn, dtype in (("before", old_window_divergence, torch.float32), ("after, TP=1", window_divergence, None)):
        embed = embedding_lookup(table, dtype=dtype)  # before: the float32 lookup of today's path
        runs = [probe_work(tokens, mask, loss, embed, teacher_w, student_w, args, fn) for _ in range(args.repeats)]
        cols[name] = min(runs, key=lambda r: r[0]["total"])
    del table, embed
    if args.tp > 1:
        from megatron_topd.parallel.spawn import run_on_ranks

        per_rank = run_on_ranks(_tp_rank, args.tp, args, timeout=1800)
        for which in ("before", "after"):  # the slower rank sets the step's pace
            cols[f"{which}, TP={args.tp}"] = max((r[which] for r in per_rank), key=lambda r: r[0]["total"])
    before = cols["before"][1].numpy()
    n = len(teacher_w)
    print(f"probe at {args.batch} x {args.seq} tokens, {n} candidates, K={args.window}, hidden {args.hidden}, "
          f"vocab {args.vocab}, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    for name, (_, d) in cols.items():
        diff = float(np.abs(d.numpy() - before).max())
        zeros = int((d == 0).sum())
        print(f"  {name:14s} max |d - before| = {diff:.2e}, exact zeros {zeros}/{n}")
    names = list(cols)
    print(f"{'part (s)':24s}" + "".join(f"{c:>15s}" for c in names))
    for part in cols["before"][0]:
        print(f"{part:24s}" + "".join(f"{cols[c][0][part]:15.4f}" for c in names))
    def base(c):  # each column against today's path at the same TP
        return cols[f"before, TP={args.tp}"] if c.endswith(f"TP={args.tp}") and args.tp > 1 else cols["before"]

    for part in ("total", "lookup + OT"):
        print(f"{'speed-up (' + part + ')':24s}" + "".join(f"{base(c)[0][part] / cols[c][0][part]:14.1f}x"
                                                            for c in names))


if __name__ == "__main__":
    main()
