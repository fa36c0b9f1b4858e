"""The probe's window generation against a real SGLang server: one HTTP request per prefix (before) against the
prefixes grouped per server (`client.window_prompts_per_request`, after), side by side in one run.

Setup (bench_step's TOPD step on one server): the tiny student of `testing/tiny_assets.py`, 16 prompts x 4 samples of
48 tokens generated first (so the server's radix cache holds the rollouts, as the student's does in a step), then
3 candidates per response and a window of 8 tokens: ~190 prefixes. Every round flushes the cache, regenerates the
rollouts (untimed) and times each layout once, alternating which goes first; the greedy windows of both
layouts are compared.

    .venv/bin/python benchmarks/bench_windows.py --rounds 5
"""
from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _flush(url: str) -> None:
    urllib.request.urlopen(urllib.request.Request(url + "/flush_cache", data=b"", method="POST"), timeout=60).read()


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
    from megatron_topd.rollout.client import window_prompts_per_request
    from megatron_topd.rollout.sampling import SamplingParams
    from megatron_topd.testing.tiny_assets import build_tiny_assets
    from megatron_topd.testing.tiny_hf import load_spec
    from tests.integration.conftest import sglang_python

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

        def windows(prefixes, per_request):
            t = time.perf_counter()
            gens = asyncio.run(client.agenerate(prefixes, window, return_logprobs=False, _what="prefixes",
                                                prompts_per_request=per_request))
            return time.perf_counter() - t, [[g.token_ids for g in row] for row in gens]

        times: dict[str, list[float]] = {"one request per prefix": [], "grouped per server": []}
        same: list[float] = []  # greedy windows equal under both layouts (float32 batching can flip a near-tie)
        for r in range(args.rounds):
            layouts = list(times)
            for name in layouts if r % 2 == 0 else layouts[::-1]:
                _flush(server.url)
                rows = [p + g.token_ids for p, gens in zip(prompts, client.generate(prompts, rollout)) for g in gens]
                prefixes = [row[:t] for row in rows
                            for t in sorted(rng.sample(range(13, len(row)), args.candidates))]
                per_request = 1 if name.startswith("one") else window_prompts_per_request(len(prefixes), 1)
                seconds, out = windows(prefixes, per_request)
                again = windows(prefixes, 1 if per_request > 1 else window_prompts_per_request(len(prefixes), 1))[1]
                same.append(sum(a == b for a, b in zip(out, again)) / len(out))
                times[name].append(seconds)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()), flush=True)
    print(f"\n{len(prefixes)} prefixes x {args.window}-token greedy windows, one server, {args.rounds} rounds; "
          f"identical windows under both layouts: {100 * min(same):.1f}% (worst round)")
    base = statistics.median(times["one request per prefix"])
    for name, v in times.items():
        med = statistics.median(v)
        print(f"{name:24s} median {med:.3f} s  best {min(v):.3f} s  speed-up {base / med:.2f}x")


if __name__ == "__main__":
    main()
