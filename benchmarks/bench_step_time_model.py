"""The step-time model (plan/step_time.py) against a measured CPU demo step: predicted vs measured share per phase.

One run of examples/cpu_demo.yaml as `make demo` runs it (its trained assets, torchrun on 2 ranks, real SGLang CPU
servers), for ``--steps`` steps instead of 120 (the model is per step); step 1 is a warm-up and left out of the
means. The measured seconds per phase are the loop's own metrics (generation_s, scoring_s, window_s, ot_s, train_s,
sync_s); the prediction is `step_time` on the `CPU_2CORE` profile (plan/devices.py, measured by
benchmarks/calibrate_cpu_profile.py, never from a demo step) with the step's shape from the config and from the
run's own rollout records (prompt and response lengths, and the microbatches the trainer packs those rows into)
and metrics (the guidance windows the probe kept: the rows the training pass trains on): the model's inputs, not
its outputs. The checkpoint is
the run's own save after its last step (train.steps always saves), from the files' times: from the last write of
metrics.jsonl (the loop logs a step, then saves) to the write of checkpoints/latest_step.txt (the save's last act),
amortised over train.save_interval as the model amortises it. The run saves every ``--save-interval`` steps (4,
not the demo's 60) so that the measured save is not the process's first (which pays Megatron's one-time set-up,
about 3 s here: calibrate_cpu_profile.py measures both), and both sides amortise over that interval. Shares are of
the seven phases.

    flock /tmp/topd-heavy.lock .venv/bin/python benchmarks/bench_step_time_model.py       # --steps 8
    .venv/bin/python benchmarks/bench_step_time_model.py --run-dir runs/bench_step_model  # re-read a finished run

`--profile-json FILE`: the CPU profile from a calibration's print (calibrate_cpu_profile.py --out FILE) instead of
plan/devices.py's: `make bench-step-model` calibrates, then runs the step on that calibration's figures.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MEASURED = {"generation": "generation_s", "scoring": "scoring_s", "windows": "window_s", "ot": "ot_s",
            "training": "train_s", "weight_sync": "sync_s"}  # the loop's metrics; the checkpoint: its files' times
CONFIG = REPO / "examples" / "cpu_demo.yaml"


def run_demo(run_dir: Path, steps: int, save_interval: int) -> None:
    from megatron_topd.demo import asset_overrides, build_assets, torchrun, world_size

    paths = build_assets(REPO / "runs" / "demo" / "assets")
    shutil.rmtree(run_dir, ignore_errors=True)  # a checkpoint left there would resume the run instead
    overrides = [*asset_overrides(paths), f"train.output_dir={run_dir}", f"train.steps={steps}",
                 f"train.save_interval={save_interval}"]
    cmd = torchrun(str(CONFIG), overrides, world_size(str(CONFIG), overrides))
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)


def measured(run_dir: Path) -> tuple[dict[str, float], dict[str, float]]:
    """Mean seconds per phase over the steps after the first, and the steps' shape from the rollout records (the
    rows' lengths, and the microbatches the trainer packs them into)."""
    from megatron_topd.train.batches import pack_rows, pad_multiple

    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    steps = [r for r in rows if "step_s" in r][1:]
    if not steps:
        raise SystemExit(f"{run_dir}/metrics.jsonl has no step after the warm-up: run at least 2 steps")
    means = {k: statistics.fmean(r[key] for r in steps) for k, key in MEASURED.items()}
    means["step (no eval)"] = statistics.fmean(r["step_s"] - r.get("eval_s", 0.0) for r in steps)
    means["save_s"] = _last_save_seconds(run_dir)
    means["checkpoint"] = means["save_s"] / _config(run_dir).train.save_interval
    prompts, responses, longest, microbatches = [], [], [], []
    cfg = _config(run_dir)
    multiple = pad_multiple(cfg.parallel.tensor_parallel, sequence_parallel=cfg.parallel.sequence_parallel,
                            fp8=cfg.precision.fp8 is not None, context_parallel=cfg.parallel.context_parallel)
    for path in sorted((run_dir / "rollouts").glob("*.jsonl"))[1:]:
        recs = [json.loads(line) for line in open(path) if line.strip()]
        prompts += [len(r["prompt_ids"]) for r in recs]
        responses += [len(r["response_ids"]) for r in recs]
        longest.append(max(len(r["response_ids"]) for r in recs))
        # the step's rows packed as the trainer packs them (one replica: the demo's data parallelism is 1)
        rows = [len(r["prompt_ids"]) + len(r["response_ids"]) for r in recs]
        microbatches.append(len(pack_rows(rows, cfg.train.max_tokens_per_microbatch, multiple)))
    shape = {"prompt_tokens": statistics.fmean(prompts), "response_tokens": statistics.fmean(responses),
             "longest_response": statistics.fmean(longest), "steps": len(steps),
             "rollout_microbatches": statistics.fmean(microbatches),
             "guidance_windows": statistics.fmean(r["guidance_windows"] for r in steps),
             "save_interval": _config(run_dir).train.save_interval}
    return means, shape


def _last_save_seconds(run_dir: Path) -> float:
    """The save after the run's last step: metrics.jsonl's last write (that step's line) to latest_step.txt's."""
    tracker, log = run_dir / "checkpoints" / "latest_step.txt", run_dir / "metrics.jsonl"
    last = max(json.loads(line)["step"] for line in open(log) if line.strip())
    if not tracker.exists() or int(tracker.read_text()) != last:
        raise SystemExit(f"{tracker} does not name step {last}, the run's last: no save after it to measure")
    return tracker.stat().st_mtime - log.stat().st_mtime


def _config(run_dir: Path):
    from megatron_topd.config import load_config

    return load_config(run_dir / "config.yaml", [])


def predicted(shape: dict, profile_json: str | None = None):
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
    rows = t.prompts_per_step * r.n_samples
    step = TopdStep(rows=rows, prompt_tokens=round(shape["prompt_tokens"]),
                    response_tokens=round(shape["response_tokens"]), longest_response=round(shape["longest_response"]),
                    candidates_per_row=cfg.topd.top_k, window=cfg.topd.window,
                    divergent_share=shape["guidance_windows"] / (rows * cfg.topd.top_k),  # the windows kept
                    student_servers=r.num_servers, teacher_servers=1,
                    decode_batch=rows, server_kv_tokens=4096,  # CPU_DEFAULT_ARGS
                    save_interval=shape["save_interval"], sync_bucket_mb=r.sync_bucket_mb, variant=cfg.topd.variant,
                    guidance_layout="shared_prefix", dtype_bytes=4,
                    rollout_microbatches=shape.get("rollout_microbatches"))
    device = CPU_2CORE
    if profile_json:  # a calibration's print: its "profile" fields over plan/devices.py's
        fields = json.loads(Path(profile_json).read_text())["profile"]
        device = replace(CPU_2CORE, name=f"{CPU_2CORE.name}, fields from {profile_json}", **fields)
    return step_time(student, teacher, layout, step, seq=t.max_seq_length, microbatches_per_step=1,
                     gpus_per_node=1, device=device), device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--save-interval", type=int, default=4, help="a save inside the run, so the last is not its first")
    ap.add_argument("--run-dir", default=None, help="read this finished run instead of running one")
    ap.add_argument("--profile-json", default=None, help="the CPU profile from calibrate_cpu_profile.py --out")
    args = ap.parse_args()
    run_dir = Path(args.run_dir) if args.run_dir else REPO / "runs" / "bench_step_model"
    if not args.run_dir:
        if args.steps % args.save_interval or args.steps < 2 * args.save_interval:
            raise SystemExit(f"--steps {args.steps} --save-interval {args.save_interval}: the last save must be on "
                             "the interval and not the run's first (e.g. --steps 8 --save-interval 4)")
        run_demo(run_dir, args.steps, args.save_interval)
    got, shape = measured(run_dir)
    est, device = predicted(shape, args.profile_json)
    common = [*MEASURED, "checkpoint"]
    pred_total, got_total = sum(est.phases[k] for k in common), sum(got[k] for k in common)
    print(f"device profile: {device}")
    print(f"step shape (rollout records, {shape['steps']} steps after the warm-up): prompt {shape['prompt_tokens']:.1f}"
          f" tokens, response {shape['response_tokens']:.1f} (longest {shape['longest_response']:.1f}), "
          f"guidance windows {shape['guidance_windows']:.0f}, rollout microbatches {shape['rollout_microbatches']:.2f}")
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
          f"{got['step (no eval)']:.3f} s; the save after the last step: {got['save_s']:.3f} s measured, "
          f"{est.phases['checkpoint'] * shape['save_interval']:.3f} s predicted, each / save_interval "
          f"{shape['save_interval']})")
    print(f"largest share error: {worst:.0%} ({'within' if worst <= 0.30 else 'NOT within'} 30%)")


if __name__ == "__main__":
    main()
