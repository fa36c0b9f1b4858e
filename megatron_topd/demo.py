"""The CPU demo (`make demo`): a real TOPD run, small.

Builds, offline, a tiny random Llama student and a bigger tiny random Llama teacher that share one BPE tokenizer,
converts both to Megatron checkpoints with tools/convert_hf_to_megatron.py, writes arithmetic prompts, then launches
the trainer with torchrun on 2 CPU ranks (TP=2 over gloo). Rank 0 starts two real SGLang CPU servers (student and
teacher). Output: runs/demo/ (metrics.jsonl, metrics.png, tensorboard/, rollouts/, checkpoints/).
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def build_assets(root: Path) -> dict[str, Path]:
    from megatron_topd.testing.tiny_hf import build_tiny_model

    paths = {"student_hf": root / "student_hf", "teacher_hf": root / "teacher_hf",
             "student_ckpt": root / "student_megatron", "teacher_ckpt": root / "teacher_megatron",
             "prompts": root / "prompts.jsonl"}
    # One tokenizer (it is trained from the seed): the teacher differs in size and weights, not in vocabulary.
    if not (paths["student_hf"] / "config.json").exists():
        build_tiny_model(paths["student_hf"], arch="llama", seed=0)
    if not (paths["teacher_hf"] / "config.json").exists():
        build_tiny_model(paths["teacher_hf"], arch="llama", seed=0, hidden_size=96, intermediate_size=192,
                         num_layers=3)
    for hf, ckpt in (("student_hf", "student_ckpt"), ("teacher_hf", "teacher_ckpt")):
        if not (paths[ckpt] / "latest_step.txt").exists():
            subprocess.run([sys.executable, str(REPO / "tools" / "convert_hf_to_megatron.py"), "--hf", str(paths[hf]),
                            "--out", str(paths[ckpt]), "--dtype", "fp32"], check=True)
    if not paths["prompts"].exists():
        rng = random.Random(0)
        with open(paths["prompts"], "w") as f:
            for _ in range(64):
                a, b = rng.randint(2, 99), rng.randint(2, 99)
                f.write(json.dumps({"prompt": f"What is {a} plus {b}? Think step by step."}) + "\n")
    return paths


def main(config_path: str | None, overrides: list[str]) -> int:
    config_path = config_path or str(REPO / "examples" / "cpu_demo.yaml")
    root = REPO / "runs" / "demo"
    root.mkdir(parents=True, exist_ok=True)
    paths = build_assets(root / "assets")
    shutil.rmtree(root / "run", ignore_errors=True)  # every `make demo` is a fresh run (assets are reused)
    world = 2
    for item in overrides:
        if item.startswith("parallel.tensor_parallel="):
            world = int(item.split("=", 1)[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
           "-m", "megatron_topd.cli", "train", "--config", config_path,
           f"train.student_checkpoint={paths['student_ckpt']}", f"train.student_hf_path={paths['student_hf']}",
           f"teacher.checkpoint={paths['teacher_ckpt']}", f"teacher.hf_path={paths['teacher_hf']}",
           f"rollout.model_path={paths['student_hf']}", f"train.prompts_path={paths['prompts']}",
           f"train.output_dir={root / 'run'}", *overrides]
    print("+", " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env).returncode
