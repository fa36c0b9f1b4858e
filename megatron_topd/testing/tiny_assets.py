"""Tiny random student and teacher (HF + converted Megatron checkpoints) and a prompt file, built offline in seconds.

The integration and Slurm tests exercise the system's mechanics on these (shapes, sync, resume, roles); they need
real checkpoints, not trained ones. The demo trains its models on a task instead (megatron_topd/task_assets.py).
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def build_tiny_assets(root: Path) -> dict[str, Path]:
    from megatron_topd.testing.tiny_hf import build_tiny_model

    root = Path(root)
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
