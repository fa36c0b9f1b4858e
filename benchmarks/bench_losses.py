"""Vocabulary-parallel KL vs the naive all-gather KL vs Megatron-Core's cross-entropy, over gloo on CPU.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_losses.py            # T=1024 all three, ours at 4096, 16384
    .venv/bin/python benchmarks/bench_losses.py --tokens 256 --ours-tokens 1024 --no-naive   # quick look

Each method runs in fresh rank processes (one thread each), so one method's freed memory cannot hide another's peak.
Per rank: build the inputs, warm up on 8 tokens, reset the kernel's peak-RSS counter (/proc/self/clear_refs), then
time forward+backward of sum(per-token loss). "extra" = peak RSS minus RSS with the inputs in place; it includes the
[T, V_local] gradient every method must return, so "extra - grad" is the loss's own workspace.
Megatron's cross-entropy is one distribution (the floor): it saves its softmax and overwrites its input logits.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import time

import torch
import torch.distributed as dist

GIB = 1 << 30


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _random_logits(tokens: int, v_local: int, dtype, g) -> torch.Tensor:
    """Filled 256 rows at a time, so building bf16 inputs never holds a full fp32 copy."""
    x = torch.empty(tokens, v_local, dtype=dtype)
    for r in range(0, tokens, 256):
        x[r : r + 256] = torch.randn(min(256, tokens - r), v_local, generator=g) * 2
    return x


def _naive_kl(student, teacher, group):
    """What one would write first: gather both shards, full log_softmax, KL; backward through the full logits."""
    world = dist.get_world_size(group)
    parts_s = [torch.empty_like(student) for _ in range(world)]
    parts_t = [torch.empty_like(teacher) for _ in range(world)]
    dist.all_gather(parts_s, student.detach(), group=group)
    dist.all_gather(parts_t, teacher, group=group)
    full_s = torch.cat(parts_s, -1).requires_grad_()
    del parts_s
    full_t = torch.cat(parts_t, -1)
    del parts_t
    ls, lt = torch.log_softmax(full_s.float(), -1), torch.log_softmax(full_t.float(), -1)
    kl = (ls.exp() * (ls - lt)).sum(-1)
    kl.sum().backward()
    rank, v = dist.get_rank(group), student.shape[-1]
    return kl.detach(), full_s.grad[:, rank * v : (rank + 1) * v]


def _run_once(method, student, teacher, ids, group):
    if student.grad is not None:
        student.grad = None
    if method == "ours":
        from megatron_topd.losses import vocab_parallel_kl

        vocab_parallel_kl(student, teacher, group=group).sum().backward()
        return student.grad
    if method == "ours_fused":
        from megatron_topd.losses import vocab_parallel_opd_scores

        vocab_parallel_opd_scores(student, teacher, ids, group=group).reverse_kl.sum().backward()
        return student.grad
    if method == "naive":
        return _naive_kl(student, teacher, group)[1]
    if method == "megatron_ce":
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        vocab_parallel_cross_entropy(student, ids, tp_group=group).sum().backward()
        return student.grad
    raise ValueError(method)


def bench_rank(method: str, tokens: int, vocab: int, dtype: str, reps: int) -> dict:
    group = dist.group.WORLD
    world, rank = dist.get_world_size(), dist.get_rank()
    v_local = vocab // world
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(1000 + rank)
    student, teacher = _random_logits(tokens, v_local, dt, g).requires_grad_(), _random_logits(tokens, v_local, dt, g)
    ids = torch.randint(0, vocab, (tokens,), generator=torch.Generator().manual_seed(7))
    _run_once(method, student[:8].detach().requires_grad_(), teacher[:8], ids[:8], group)  # warm-up: lazy inits
    gc.collect()
    times, cpu_times, peak_extra = [], [], None
    for i in range(reps):
        dist.barrier()
        student.grad = None
        gc.collect()
        base = _rss_kib("VmRSS")
        _reset_peak()
        t0, c0 = time.perf_counter(), time.process_time()
        grad = _run_once(method, student, teacher, ids, group)
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
        if i == 0:
            peak_extra = (_rss_kib("VmHWM") - base) * 1024
        del grad
    return {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu_times), "extra_bytes": peak_extra,
            "grad_bytes": student.numel() * student.element_size()}


HEADER = (f"{'method':<12} {'T':>6} {'dtype':>9} {'wall s':>8} {'cpu s':>8} {'extra GiB':>10} {'grad GiB':>9} "
          f"{'extra-grad':>11}")


def _row(r: dict) -> str:
    return (f"{r['method']:<12} {r['tokens']:>6} {r['dtype']:>9} {r['time_s']:>8.3f} {r['cpu_s']:>8.3f} "
            f"{r['extra_gib']:>10.3f} {r['grad_gib']:>9.3f} {r['extra_gib'] - r['grad_gib']:>11.3f}")


def run(method, tokens, vocab, dtype, reps, world):
    from megatron_topd.parallel.spawn import run_on_ranks

    res = run_on_ranks(bench_rank, world, method, tokens, vocab, dtype, reps, timeout=1800)
    row = {"method": method, "tokens": tokens, "dtype": dtype,
           "time_s": max(r["time_s"] for r in res), "cpu_s": max(r["cpu_s"] for r in res),
           "extra_gib": max(r["extra_bytes"] for r in res) / GIB, "grad_gib": res[0]["grad_bytes"] / GIB}
    print("done:", _row(row), flush=True)  # progress, in case a later (bigger) run is killed
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1024, help="T for the three-way comparison")
    ap.add_argument("--ours-tokens", default="4096,16384", help="extra T values for ours alone (comma list)")
    ap.add_argument("--ours-dtype", default="float32,bfloat16",
                    help="dtype per --ours-tokens entry (16384 fp32 inputs+grad need 15 GiB per rank)")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-naive", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    rows = [run(m, args.tokens, args.vocab, "float32", args.reps, args.tp)
            for m in ["megatron_ce", "ours", "ours_fused"] + ([] if args.no_naive else ["naive"])]
    extra_t = [int(x) for x in args.ours_tokens.split(",") if x]
    dtypes = (args.ours_dtype.split(",") + ["bfloat16"] * len(extra_t))[: len(extra_t)]
    rows += [run("ours", t, args.vocab, d, args.reps, args.tp) for t, d in zip(extra_t, dtypes)]

    print(f"\nTP={args.tp} gloo, vocab={args.vocab}, 1 thread per rank, forward+backward of sum(per-token loss), "
          f"median of {args.reps}; wall and CPU seconds and memory: max over ranks; memory = peak RSS over RSS with "
          f"the inputs in place")
    print(HEADER)
    for r in rows:
        print(_row(r))
    by = {r["method"]: r for r in rows if r["tokens"] == args.tokens}
    ours, ce = by["ours"], by["megatron_ce"]
    for m in ("ours", "ours_fused"):
        print(f"{m} / megatron_ce: wall {by[m]['time_s'] / ce['time_s']:.2f}x, cpu {by[m]['cpu_s'] / ce['cpu_s']:.2f}x")
    if "naive" in by:
        nv = by["naive"]
        print(f"naive / ours: wall {nv['time_s'] / ours['time_s']:.1f}x, cpu {nv['cpu_s'] / ours['cpu_s']:.1f}x, "
              f"peak extra memory {nv['extra_gib'] / ours['extra_gib']:.1f}x")

if __name__ == "__main__":
    main()
