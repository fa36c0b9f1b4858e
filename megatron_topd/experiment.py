"""`megatron-topd experiment`: the paper's comparison at CPU scale, with one command.

Variants (same assets, same step budget, same seeds), each a set of config overrides:

    opd              plain on-policy distillation (reverse KL on every response token)
    opd_suppress     OPD with the low-OT candidates suppressed (the paper's surface-form filter)
    suppress_high    the paper's control: a matched number of the *highest*-OT candidates suppressed
    suppress_random  a matched number of randomly chosen candidates suppressed
    topd             low-OT suppression + trajectory guidance along the teacher's windows

The SGLang student and teacher servers start once; every run is its own torchrun job pointed at them
(`rollout.urls` / `teacher.urls`), and the trainer brings the student's servers to the run's initial weights
before its first step. Runs whose metrics already reach the last step are reused, so an interrupted experiment
continues where it stopped. Output under --out: one folder per run, results.json, results.md (mean +- sd of the
final held-out accuracy and step time per variant) and results.png (accuracy curves, mean +- sd over seeds).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from megatron_topd.demo import REPO, asset_overrides, build_assets, run_summary, torchrun, world_size

VARIANTS = {
    "opd": ["topd.variant=opd"],
    "opd_suppress": ["topd.variant=opd_suppress", "topd.suppress=low"],
    "suppress_high": ["topd.variant=opd_suppress", "topd.suppress=high"],
    "suppress_random": ["topd.variant=opd_suppress", "topd.suppress=random"],
    "topd": ["topd.variant=topd", "topd.suppress=low"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="megatron-topd experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "examples" / "experiment.yaml"))
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds (rollouts and probes follow)")
    p.add_argument("--out", default=str(REPO / "runs" / "experiment"))
    p.add_argument("--fresh", action="store_true", help="rerun every run instead of reusing finished ones")
    p.add_argument("--assets", default=None, help="use this asset folder as it is (megatron_topd/task_assets.py "
                   "output) instead of building the demo's under runs/demo/assets")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")
    return p.parse_args(argv)


def run_finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(json.loads(line).get("step") == steps for line in open(path) if line.strip())


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def aggregate(results: dict[str, dict[int, dict]]) -> dict[str, dict]:
    table = {}
    for variant, runs in results.items():
        finals = [r["after"] for r in runs.values()]
        table[variant] = {"n": len(finals), "final_mean": statistics.fmean(finals), "final_sd": _sd(finals),
                          "before": statistics.fmean(r["before"] for r in runs.values()),
                          "step_s_mean": statistics.fmean(r["step_s"] for r in runs.values()),
                          "finals": finals}
    return table


def write_report(out: Path, table: dict, results: dict, meta: dict) -> None:
    lines = ["| variant | seeds | held-out accuracy before | after (mean +- sd) | change | s/step |",
             "|---|---|---|---|---|---|"]
    for variant, t in table.items():
        lines.append(f"| {variant} | {t['n']} | {t['before']:.1%} | {t['final_mean']:.1%} +- {t['final_sd']:.1%} | "
                     f"{100 * (t['final_mean'] - t['before']):+.1f} pts | {t['step_s_mean']:.2f} |")
    teacher = next((r["teacher"] for runs in results.values() for r in runs.values() if r["teacher"] is not None), None)
    text = "\n".join(lines) + "\n"
    if teacher is not None:
        text += f"\nTeacher held-out accuracy: {teacher:.1%}.\n"
    text += (f"\nPer run (final accuracy by seed): " + "; ".join(
        f"{v}: " + ", ".join(f"{a:.1%}" for a in t["finals"]) for v, t in table.items()) + "\n")
    text += f"\nCommand: `{meta['command']}`; wall time {meta['wall_s'] / 60:.1f} min on {meta['machine']}.\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"table": table, "runs": results, "meta": meta}, indent=1))
    plot(out / "results.png", results)


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, runs in results.items():
        curves = [dict(r["curve"]) for r in runs.values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [sum(c[s] for c in curves) / len(curves) for s in steps]
        sd = [_sd([c[s] for c in curves]) for s in steps]
        ax.plot(steps, mean, marker="o", label=variant)
        ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    from megatron_topd.config import load_config
    from megatron_topd.task_assets import asset_paths
    from megatron_topd.train.setup import LaunchedServers

    args = parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if args.assets:
        paths = asset_paths(args.assets)
        if not paths["report"].is_file():
            raise SystemExit(f"--assets {args.assets}: no assets.json there; build it with python -m "
                             "megatron_topd.task_assets --out DIR")
    else:
        paths = build_assets(REPO / "runs" / "demo" / "assets")
    base = [*asset_overrides(paths), *args.overrides]
    cfg = load_config(args.config, base + [f"train.output_dir={out}"])
    world = world_size(args.config, base)
    # One thread per process, as in the demo (its servers inherit torchrun's setting): the servers and the trainer
    # share 2 cores, and oversubscribed torch threads made generation 30x slower (31 s instead of 0.4 s a step).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Seed-major order: an interrupted experiment has every variant at the seeds it finished.
    runs = [(seed, variant) for seed in seeds for variant in variants]
    todo = [(s, v) for s, v in runs if args.fresh or not run_finished(out / f"{v}-seed{s}", cfg.train.steps)]
    servers = LaunchedServers(cfg) if todo else None
    try:
        if servers is not None:
            student_urls, teacher_urls = servers.start()
            urls = [f"rollout.urls=[{','.join(student_urls)}]", f"teacher.urls=[{','.join(teacher_urls)}]"]
        for seed, variant in todo:
            run_dir = out / f"{variant}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = torchrun(args.config, [*base, *VARIANTS[variant], *urls, f"train.seed={seed}",
                                         f"train.output_dir={run_dir}"], world)
            print(f"== {variant} seed {seed}: {' '.join(cmd)}", flush=True)
            code = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
            if code != 0:
                raise SystemExit(f"{variant} seed {seed} failed (exit {code}); its logs are in {run_dir}")
            print(f"== {variant} seed {seed}: held-out accuracy " + "{before:.1%} -> {after:.1%}".format(
                **run_summary(run_dir)), flush=True)
    finally:
        if servers is not None:
            servers.stop()
    results: dict[str, dict[int, dict]] = {v: {s: run_summary(out / f"{v}-seed{s}") for s in seeds} for v in variants}
    meta = {"command": "megatron-topd experiment " + " ".join(sys.argv[2:] if argv is None else argv),
            "wall_s": time.perf_counter() - t0, "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
            "variants": variants, "seeds": seeds, "steps": cfg.train.steps}
    table = aggregate(results)
    write_report(out, table, results, meta)
    print((out / "results.md").read_text())
    return 0
