"""CPU time of TOPD's own work on a realistic batch, next to one vocabulary-parallel KL forward on the same batch.

TOPD's extra trainer-side work per step: candidate selection, window building (requests and guidance rows), the
embedding lookup and the exact OT of every (teacher, student) window pair, and the weights. Generation of the windows
is the SGLang servers' time and is not measured: windows here are random ids (half the student windows share most of
the teacher's tokens, as greedy probes often do). The KL forward is measured on ``--kl-tokens`` tokens and scaled
linearly to the batch (it is chunked over tokens, so its time is linear in tokens).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_topd.py            # 64 x 2048, K=50, hidden 4096
"""
from __future__ import annotations

import argparse
import time

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


def _timed(fn):
    start = time.process_time()
    wall = time.perf_counter()
    out = fn()
    return out, time.process_time() - start, time.perf_counter() - wall


def _kl_forward(student: torch.Tensor, teacher: torch.Tensor):
    try:
        from megatron_topd.losses import vocab_parallel_kl
    except ImportError:
        s = torch.log_softmax(student.float(), -1)
        t = torch.log_softmax(teacher.float(), -1)
        name = "torch log_softmax KL (stand-in: megatron_topd.losses not importable)"
        return name, lambda: (s.exp() * (s - t)).sum(-1)
    return "megatron_topd.losses.vocab_parallel_kl (TP=1)", lambda: vocab_parallel_kl(student, teacher)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--window", type=int, default=50)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=151936, help="embedding rows and logits width (TP=1 shard)")
    ap.add_argument("--kl-tokens", type=int, default=256, help="tokens the KL forward is timed on, then scaled")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    b, s, k = args.batch, args.seq, args.window

    tokens = torch.randint(0, args.vocab, (b, s), generator=g)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    pos = torch.arange(s)[None]
    mask = (pos >= args.prompt) & (pos < lengths[:, None])
    loss = torch.rand(b, s, generator=g)
    table = torch.randn(args.vocab, args.hidden, generator=g, dtype=torch.float32).to(torch.bfloat16)
    embed = embedding_lookup(table)

    candidates, t_cand, w_cand = _timed(lambda: select_candidates(loss, mask, top_k=args.top_k, min_gap=8))
    requests, t_req, w_req = _timed(lambda: build_requests(tokens, candidates))
    n = len(requests)
    teacher_w = [[torch.randint(0, args.vocab, (k,), generator=g).tolist()] for _ in range(n)]
    student_w = []
    for c in range(n):
        w = list(teacher_w[c][0]) if c % 2 else torch.randint(0, args.vocab, (k,), generator=g).tolist()
        if c % 2:
            w[-10:] = torch.randint(0, args.vocab, (10,), generator=g).tolist()  # shared prefix, different tail
        student_w.append([w])
    div, t_ot, w_ot = _timed(lambda: window_divergence(teacher_w, student_w, embed))
    (weights, divergent), t_w, w_w = _timed(lambda: divergence_weights(div.distance, low_fraction=0.3))
    tw, t_tw, w_tw = _timed(lambda: token_weights(mask, candidates, weights))
    guidance, t_g, w_g = _timed(lambda: build_guidance(requests, teacher_w, divergent, pad_id=0))

    kl_tokens = min(args.kl_tokens, b * s)
    student_logits = torch.randn(kl_tokens, args.vocab, generator=g).to(torch.bfloat16)
    teacher_logits = torch.randn(kl_tokens, args.vocab, generator=g).to(torch.bfloat16)
    kl_name, kl_fn = _kl_forward(student_logits, teacher_logits)
    kl_fn()  # warm-up
    _, t_kl, w_kl = _timed(kl_fn)
    scale = (b * s) / kl_tokens

    topd_cpu = t_cand + t_req + t_ot + t_w + t_tw + t_g
    print(f"batch {b} x {s} tokens ({int(mask.sum())} response), {n} candidates (top_k={args.top_k}, min_gap=8), "
          f"K={k}, hidden {args.hidden}, vocab {args.vocab}, threads {torch.get_num_threads()}")
    print(f"{'part':38s} {'cpu s':>9s} {'wall s':>9s}")
    for name, t, w in [
        ("candidate selection", t_cand, w_cand),
        ("continuation requests (prefix ids)", t_req, w_req),
        (f"embedding lookup + exact OT ({n} pairs)", t_ot, w_ot),
        ("divergence weights", t_w, w_w),
        ("token weights", t_tw, w_tw),
        (f"guidance rows ({guidance.num_windows} windows)", t_g, w_g),
    ]:
        print(f"{name:38s} {t:9.3f} {w:9.3f}")
    print(f"{'TOPD total':38s} {topd_cpu:9.3f} {w_cand + w_req + w_ot + w_w + w_tw + w_g:9.3f}")
    print(f"KL forward: {kl_name}")
    print(f"{'KL forward, ' + str(kl_tokens) + ' tokens (measured)':38s} {t_kl:9.3f} {w_kl:9.3f}")
    print(f"{'KL forward, whole batch (x' + format(scale, '.0f') + ')':38s} {t_kl * scale:9.3f} {w_kl * scale:9.3f}")
    print(f"TOPD work / one KL forward (cpu): {topd_cpu / (t_kl * scale):.3f}")


if __name__ == "__main__":
    main()
