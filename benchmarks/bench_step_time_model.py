"""The step-time model (plan/step_time.py) against a measured CPU demo step: predicted vs measured share per phase.

One run of examples/cpu_demo.yaml as `make demo` runs it (its trained assets, torchrun on 2 ranks, real SGLang CPU
servers), for ``--steps`` steps instead of 120 (the model is per step); step 1 is a warm-up and left out of the
means. The measured seconds per phase are the loop's own metrics (generation_s, scoring_s, window_s, ot_s, train_s,
sync_s); the prediction is `step_time` on the `CPU_2CORE` profile (plan/devices.py, measured by
benchmarks/calibrate_cpu_profile.py, never from a demo step) with the step's shape from the config and from the
run's own rollout records (prompt and response lengths: the model's inputs, not its outputs). Shares are of the
phases both sides have; the checkpoint (written after a step's metrics, amortised over train.save_interval) is
predicted only.

    flock /tmp/topd-heavy.lock .venv/bin/python benchmarks/bench_step_time_model.py       # --steps 8
    .venv/bin/python benchmarks/bench_step_time_model.py --run-dir runs/bench_step_model  # re-read a finished run
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEASURED = {"generation": "generation_s", "scoring": "scoring_s", "windows": "window_s", "ot": "ot_s",
            "training": "train_s", "weight_sync": "sync_s"}
CONFIG = REPO / "examples" / "cpu_demo.yaml"


def run_demo(run_dir: Path, steps: int) -> None:
    from megatron_topd.demo import asset_overrides, build_assets, torchrun, world_size

    paths = build_assets(REPO / "runs" / "demo" / "assets")
    overrides = [*asset_overrides(paths), f"train.output_dir={run_dir}", f"train.steps={steps}"]
    cmd = torchrun(str(CONFIG), overrides, world_size(str(CONFIG), overrides))
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)


def measured(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Mean seconds per phase over the steps after the first, and the steps' shape from the rollout records."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    steps = [r for r in rows if "step_s" in r][1:]
    if not steps:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no step after the warm-up: run at least 2 steps")
    means = {k: statistics.fmean(r[key] for r in steps) for k, key in MEASURED.items()}
    means["step (no eval)"] = statistics.fmean(r["step_s"] - r.get("eval_s", 0.0) for r in steps)
    prompts, responses, longest = [], [], []
    for path in sorted((run_dir / "rollouts").glob("*.jsonl"))[1:]:
        recs = [json.loads(line) for line in open(path) if line.strip()]
        prompts += [len(r["prompt_ids"]) for r in recs]
        responses += [len(r["response_ids"]) for r in recs]
        longest.append(max(len(r["response_ids"]) for r in recs))
    shape = {"prompt_tokens": statistics.fmean(prompts), "response_tokens": statistics.fmean(responses),
             "longest_response": statistics.fmean(longest), "steps": len(steps),
             "guidance_windows": statistics.fmean(r["guidance_windows"] for r in steps)}
    return means, shape


def predicted(shape: dict):
    from megatron_topd.config import load_config
    from megatron_topd.plan import load_spec
    from megatron_topd.plan.devices import CPU_2CORE
    from megatron_topd.plan.layout import Layout
    from megatron_topd.plan.step_time import TopdStep, step_time

    assets = REPO / "runs" / "demo" / "assets"
    cfg = load_config(CONFIG, [])
    student, teacher = load_spec(str(assets / "student_hf")), load_spec(str(assets / "teacher_hf"))
    p, t, r = cfg.parallel, cfg.train, cfg.rollout
    layout = Layout(tp=p.tensor_parallel, pp=p.pipeline_parallel, max_tokens_per_microbatch=t.max_tokens_per_microbatch,
                    teacher_group_microbatches=t.teacher_group_microbatches, placement=cfg.teacher.placement)
    step = TopdStep(rows=t.prompts_per_step * r.n_samples, prompt_tokens=round(shape["prompt_tokens"]),
                    response_tokens=round(shape["response_tokens"]), longest_response=round(shape["longest_response"]),
                    candidates_per_row=cfg.topd.top_k, window=cfg.topd.window,
                    divergent_share=1 - cfg.topd.low_fraction, student_servers=r.num_servers, teacher_servers=1,
                    decode_batch=t.prompts_per_step * r.n_samples, server_kv_tokens=4096,  # CPU_DEFAULT_ARGS
                    save_interval=t.save_interval, sync_bucket_mb=r.sync_bucket_mb, variant=cfg.topd.variant,
                    guidance_layout="shared_prefix",
                    dtype_bytes=4)
    return step_time(student, teacher, layout, step, seq=t.max_seq_length, microbatches_per_step=1,
                     gpus_per_node=1, device=CPU_2CORE), CPU_2CORE


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--run-dir", default=None, help="read this finished run instead of running one")
    args = ap.parse_args()
    run_dir = Path(args.run_dir) if args.run_dir else REPO / "runs" / "bench_step_model"
    if not args.run_dir:
        run_demo(run_dir, args.steps)
    got, shape = measured(run_dir)
    est, device = predicted(shape)
    common = list(MEASURED)
    pred_total, got_total = sum(est.phases[k] for k in common), sum(got[k] for k in common)
    print(f"device profile: {device}")
    print(f"step shape (rollout records, {shape['steps']} steps after the warm-up): prompt {shape['prompt_tokens']:.1f}"
          f" tokens, response {shape['response_tokens']:.1f} (longest {shape['longest_response']:.1f}), "
          f"guidance windows {shape['guidance_windows']:.0f}")
    print(f"{'phase':<14}{'pred s':>9}{'meas s':>9}{'pred share':>12}{'meas share':>12}{'ratio':>8}")
    worst = 0.0
    for k in common:
        ps, ms = est.phases[k] / pred_total, got[k] / got_total
        ratio = ps / ms if ms else float("inf")
        worst = max(worst, abs(ratio - 1))
        print(f"{k:<14}{est.phases[k]:>9.3f}{got[k]:>9.3f}{ps:>12.1%}{ms:>12.1%}{ratio:>8.2f}")
    for part, s in est.detail.items():
        print(f"  {part:<12}{s:>9.3f}")
    print(f"{'total':<14}{pred_total:>9.3f}{got_total:>9.3f}   (measured step without eval: "
          f"{got['step (no eval)']:.3f} s; checkpoint predicted {est.phases['checkpoint']:.4f} s/step)")
    print(f"largest share error: {worst:.0%} ({'within' if worst <= 0.30 else 'NOT within'} 30%)")


if __name__ == "__main__":
    main()
