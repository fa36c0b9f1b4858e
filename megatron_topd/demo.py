"""The CPU demo (`make demo`): a real TOPD run in which a small student gets better at a task.

1. Assets (megatron_topd/task_assets.py, built once and cached under runs/demo/assets): 4-digit addition with a
   digit-by-digit chain of thought, one character-level tokenizer, a teacher trained on it through the project's own
   Megatron step (SFT) and exported to HF, and a smaller student given a short SFT warm start.
2. TOPD through the real system: torchrun on 2 CPU ranks (TP=2 over gloo); rank 0 starts the SGLang CPU servers of
   the student (rollouts, windows, evaluation) and of the teacher (windows). Held-out accuracy is measured by greedy
   decoding on the student's server before training and every `eval.interval` steps.
3. A table: accuracy before -> after, and the teacher's. Output: runs/demo/run (metrics.jsonl, metrics.png with the
   accuracy curve beside the diagnostics, tensorboard/, rollouts/, checkpoints/).
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Sequence

REPO = Path(__file__).resolve().parents[1]


def build_assets(root: Path, options: Sequence[str] = ()) -> dict[str, Path]:
    """The task's models and prompt files (a subprocess: it runs its own one-rank process group); ``options``: more
    of task_assets' command line (the experiment's presets pick the task and the teacher arm)."""
    from megatron_topd.task_assets import asset_paths

    subprocess.run([sys.executable, "-m", "megatron_topd.task_assets", "--out", str(root), *options], cwd=REPO,
                   check=True, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")})
    return asset_paths(root)


def asset_overrides(paths: dict[str, Path]) -> list[str]:
    """The config fields the assets fill in (the demo, the experiment, bench_step); the held-out file only when the
    assets have one (the tiny random assets of megatron_topd/testing do not)."""
    heldout = [f"eval.heldout_path={paths['heldout']}"] if "heldout" in paths else []
    return [f"train.student_checkpoint={paths['student_ckpt']}", f"train.student_hf_path={paths['student_hf']}",
            f"teacher.checkpoint={paths['teacher_ckpt']}", f"teacher.hf_path={paths['teacher_hf']}",
            f"rollout.model_path={paths['student_hf']}", f"train.prompts_path={paths['prompts']}", *heldout]


def torchrun(config_path: str, overrides: list[str], world: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
            "-m", "megatron_topd.cli", "train", "--config", config_path, *overrides]


def world_size(config_path: str, overrides: list[str]) -> int:
    """Ranks = TP x PP x (data parallel 1): what the config asks for, after overrides."""
    from megatron_topd.config import load_config

    cfg = load_config(config_path, overrides)
    return cfg.parallel.tensor_parallel * cfg.parallel.pipeline_parallel


def run_summary(run_dir: Path) -> dict:
    """A run's held-out accuracy (curve, before -> after, the teacher's), its mean training step time (evaluation
    excluded) and mean diagnostics, from its metrics.jsonl: the demo's table and each experiment run read this."""
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    acc = [(r["step"], r["heldout_accuracy"]) for r in rows if "heldout_accuracy" in r]
    steps = [r for r in rows if "step_s" in r]
    return {"curve": acc, "before": acc[0][1], "after": acc[-1][1], "steps": len(steps),
            "teacher": next((r["teacher_heldout_accuracy"] for r in rows if "teacher_heldout_accuracy" in r), None),
            "step_s": _mean([r["step_s"] - r.get("eval_s", 0.0) for r in steps]),
            "low_divergence_share": _mean([r["low_divergence_share"] for r in steps if "low_divergence_share" in r]),
            "mean_ot_distance": _mean([r["mean_ot_distance"] for r in steps if "mean_ot_distance" in r])}


def _mean(values: list[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def print_summary(s: dict, run_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="TOPD demo: held-out accuracy (greedy, exact answer)")
    for col in ("student before", "student after", "change", "teacher", "steps", "s/step (train)"):
        table.add_column(col, justify="right")
    teacher = "-" if s["teacher"] is None else f"{s['teacher']:.1%}"
    table.add_row(f"{s['before']:.1%}", f"{s['after']:.1%}", f"{100 * (s['after'] - s['before']):+.1f} pts", teacher,
                  str(s["steps"]), f"{s['step_s']:.1f}")
    console = Console()
    console.print(table)
    console.print("curve: " + "  ".join(f"{step}:{a:.0%}" for step, a in s["curve"]))
    console.print(f"plots: {run_dir / 'metrics.png'}   metrics: {run_dir / 'metrics.jsonl'}   "
                  f"tensorboard --logdir {run_dir / 'tensorboard'}")


def main(config_path: str | None, overrides: list[str]) -> int:
    config_path = config_path or str(REPO / "examples" / "cpu_demo.yaml")
    root = REPO / "runs" / "demo"
    paths = build_assets(root / "assets")
    run_dir = root / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # every `make demo` is a fresh run (assets are reused)
    return run_and_summarise(config_path, [*asset_overrides(paths), f"train.output_dir={run_dir}", *overrides], run_dir)


def run_and_summarise(config_path: str, overrides: list[str], run_dir: Path) -> int:
    """torchrun the training (one CPU thread per rank) and print the table of ``run_dir`` when it succeeds (the demo,
    and scripts/demo_cross.py)."""
    cmd = torchrun(config_path, overrides, world_size(config_path, overrides))
    print("+", " ".join(cmd), flush=True)
    code = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
    if code == 0:
        print_summary(run_summary(run_dir), run_dir)
    return code
