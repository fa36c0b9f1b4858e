"""The probe's window generation against a real SGLang server, three request layouts side by side in one run:
one HTTP request per prefix (the first code), the prefixes grouped per server (`window_prompts_per_request`), and
prefix families (`client.window_request_plan`: each row's longest prefix first, the row's shorter prefixes after it
to the same server; the second request forced, `min_shared_tokens=0`, whatever the prefixes' length).

Setup (bench_step's TOPD step on one server): the tiny student of `testing/tiny_assets.py`, 16 prompts x 4 samples of
48 tokens, 3 candidates per response and a window of 8 tokens: ~190 prefixes. Two cache states: "warm" - the server
holds the rollout rows' KV (a student server that generated them), "cold" - it holds nothing (the teacher's server,
which never sees the rollouts). Every round draws new candidates and times each layout once per state (cache flushed,
then the rows prefilled for "warm"), alternating the order; the greedy windows of the layouts are compared.

    .venv/bin/python benchmarks/bench_windows.py --rounds 5
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--response", type=int, default=48)
    ap.add_argument("--candidates", type=int, default=3)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--root", default=str(REPO / "runs" / "bench_windows"))
    ap.add_argument("--server-args", default="", help="extra SGLang flags, e.g. '--max-total-tokens 16384'")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from megatron_topd.rollout import SGLangClient, SGLangServer
    from megatron_topd.rollout.client import prefix_families, window_prompts_per_request, window_request_plan
    from megatron_topd.rollout.sampling import SamplingParams
    from megatron_topd.testing.tiny_assets import build_tiny_assets
    from megatron_topd.testing.tiny_hf import load_spec
    from tests.integration.conftest import ServerLog, flush_cache, sglang_python

    root = Path(args.root)
    model = build_tiny_assets(root / "assets")["student_hf"]
    vocab = load_spec(model).vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(3, vocab) for _ in range(12)] for _ in range(args.prompts)]
    with SGLangServer(model, python=sglang_python(), dtype="float32", context_length=512,
                      log_dir=root / "logs", startup_timeout_s=600, extra_args=args.server_args.split()) as server:
        client = SGLangClient([server.url], vocab_size=vocab, context_length=512, progress=False)
        rollout = SamplingParams(max_new_tokens=args.response, n=args.samples, temperature=1.0, seed=1,
                                 ignore_eos=True)
        window = SamplingParams(max_new_tokens=args.window, n=1, temperature=0.0, stream="window")

        plans = {  # name -> agenerate's grouping of these prefixes
            "one request per prefix": lambda ps: {"prompts_per_request": 1},
            "grouped per server": lambda ps: {"prompts_per_request": window_prompts_per_request(len(ps), 1)},
            "prefix families": lambda ps: {"request_plan": lambda checked: window_request_plan(
                checked, client.urls, min_shared_tokens=0)},
        }

        def windows(prefixes, grouping):
            """Seconds, the windows, and (tokens prefilled, tokens found in the radix cache) from the server's log."""
            log = ServerLog(server)
            t = time.perf_counter()
            gens = asyncio.run(client.agenerate(prefixes, window, return_logprobs=False, _what="prefixes", **grouping))
            seconds = time.perf_counter() - t
            return seconds, [[g.token_ids for g in row] for row in gens], log.prefill_tokens()

        times = {(state, name): [] for state in ("warm", "cold") for name in plans}
        tokens = {key: [] for key in times}  # (tokens prefilled, tokens found in the radix cache) per call
        same: list[float] = []  # greedy windows equal across layouts (float32 batching can flip a near-tie)
        for r in range(args.rounds):
            flush_cache(server)
            rows = [p + g.token_ids for p, gens in zip(prompts, client.generate(prompts, rollout)) for g in gens]
            prefixes = [row[:t] for row in rows for t in sorted(rng.sample(range(13, len(row)), args.candidates))]
            for state in ("warm", "cold"):
                outs = []
                for name in list(plans) if r % 2 == 0 else list(plans)[::-1]:
                    flush_cache(server)
                    if state == "warm":  # the rows' KV in the radix cache, as a student server holds it
                        client.generate(rows, SamplingParams(max_new_tokens=1, temperature=0.0))
                    seconds, out, prefilled = windows(prefixes, plans[name](prefixes))
                    times[(state, name)].append(seconds)
                    tokens[(state, name)].append(prefilled)
                    outs.append(out)
                same += [sum(a == b for a, b in zip(outs[0], o)) / len(o) for o in outs[1:]]
            print(f"round {r}: " + ", ".join(f"{s} / {n} {v[-1]:.3f} s" for (s, n), v in times.items()), flush=True)
    print(f"\n{len(prefixes)} prefixes ({len(prefix_families(prefixes))} rows' families) x {args.window}-token greedy "
          f"windows, one server, {args.rounds} rounds; identical windows across layouts: {100 * min(same):.1f}% "
          "(worst round)")
    for state in ("warm", "cold"):
        base = statistics.median(times[(state, "one request per prefix")])
        for name in plans:
            v = times[(state, name)]
            med = statistics.median(v)
            new, cached = (statistics.mean(x) for x in zip(*tokens[(state, name)]))
            print(f"{state} cache, {name:24s} median {med:.3f} s  best {min(v):.3f} s  speed-up {base / med:.2f}x  "
                  f"prefilled {new:.0f} tokens, {cached:.0f} from the cache")

if __name__ == "__main__":
    main()
