"""OPD and TOPD steps on the same tiny CPU setup (TP=2 over gloo, real SGLang servers), sync and async rollouts, in
one run: per-phase times and the ratios issue 14 asks for.

Setup: examples/cpu_demo.yaml with tiny random models (megatron_topd/testing/tiny_assets.py) and the values in
SETUP below (pinned here, so a change to the demo's config does not move the benchmark): 16 prompts x 4 samples,
48 new tokens, TOPD top-3 candidates per response (min gap 4), window 8, no held-out evaluation. Each
configuration is a fresh 2-rank run that starts its own servers; the first step of each run is a warm-up and is left
out of the means. Overrides after the options change every run (e.g. longer responses:
`rollout.max_new_tokens=192 train.max_seq_length=256 rollout.context_length=256`).

    .venv/bin/python benchmarks/bench_step.py                 # all four; --steps 5 --variants opd,topd
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUP = ["train.prompts_per_step=16", "rollout.n_samples=4", "rollout.max_new_tokens=48", "topd.top_k=3",
         "topd.min_gap=4", "topd.window=8", "eval.heldout_path="]  # no held-out evaluation
PHASES = ("generation_s", "scoring_s", "window_s", "ot_s", "train_s", "rollout_wait_s", "sync_s", "step_s")


def _train(overrides: list[str]) -> list[dict]:
    from megatron_topd.config import load_config
    from megatron_topd.train.loop import train

    return train(load_config(REPO / "examples" / "cpu_demo.yaml", overrides))


def _mean(rows: list[dict], key: str) -> float:
    vals = [r.get(key, 0.0) for r in rows]
    return sum(vals) / max(len(vals), 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", default="opd,topd")
    ap.add_argument("--modes", default="sync,async")
    ap.add_argument("--root", default=str(REPO / "runs" / "bench_step"))
    ap.add_argument("--json", default=None, help="also write the per-step metrics here")
    ap.add_argument("overrides", nargs="*", help="extra section.key=value overrides for every run")
    args = ap.parse_args()

    sys.path.insert(0, str(REPO))
    from megatron_topd.demo import asset_overrides
    from megatron_topd.testing.tiny_assets import build_tiny_assets as build_assets
    from megatron_topd.parallel.spawn import run_on_ranks
    from tests.integration.conftest import sglang_python

    root = Path(args.root)
    assets = build_assets(root / "assets")
    base = [*asset_overrides(assets), f"rollout.server_python={sglang_python()}", f"train.steps={args.steps}",
            f"train.save_interval={args.steps}", *SETUP, *args.overrides]
    results: dict[tuple[str, str], list[dict]] = {}
    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            out = root / f"{variant}_{mode}"
            shutil.rmtree(out, ignore_errors=True)
            t = time.perf_counter()
            rows = run_on_ranks(_train, 2, base + [f"topd.variant={variant}", f"train.output_dir={out}",
                                                   f"rollout.server_log_dir={out}/logs",
                                                   f"train.async_rollouts={'true' if mode == 'async' else 'false'}"],
                                timeout=3600)[0]
            results[(variant, mode)] = rows
            print(f"{variant:5s} {mode:5s}: {len(rows)} steps in {time.perf_counter() - t:.0f} s (incl. start-up)",
                  flush=True)

    steady = {k: v[1:] for k, v in results.items()}  # the first step is a warm-up
    cols = list(steady)
    print(f"\nmeans over steps 2..{args.steps} (seconds), TP=2, 2 CPU cores shared with the servers")
    print(f"{'phase':16s}" + "".join(f"{v + ' ' + m:>14s}" for v, m in cols))
    for key in PHASES + ("rollout_staleness", "response_len_mean", "candidates", "guidance_windows"):
        print(f"{key:16s}" + "".join(f"{_mean(steady[c], key):14.3f}" for c in cols))
    print()
    for mode in args.modes.split(","):
        if ("opd", mode) in steady and ("topd", mode) in steady:
            r = _mean(steady[("topd", mode)], "step_s") / _mean(steady[("opd", mode)], "step_s")
            print(f"TOPD / OPD step time ({mode}): {r:.2f}  (target <= 1.2; paper 1.41)")
    for variant in args.variants.split(","):
        if (variant, "sync") in steady and (variant, "async") in steady:
            s = steady[(variant, "sync")]
            gen = _mean(s, "generation_s")
            trainer = _mean(s, "step_s") - gen  # everything the trainer does in a sync step: score, probe, train, sync
            a = _mean(steady[(variant, "async")], "step_s")
            print(f"{variant}: async step {a:.3f} s / max(generation {gen:.3f}, trainer {trainer:.3f}) = "
                  f"{a / max(gen, trainer):.2f}  (target <= 1.15); sync step {_mean(s, 'step_s'):.3f} s, "
                  f"async/sync {a / _mean(s, 'step_s'):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({f"{v}_{m}": rows for (v, m), rows in results.items()}, indent=1))


if __name__ == "__main__":
    main()
