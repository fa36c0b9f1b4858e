"""The demo's models are trained through the project's Megatron step and exported to HF: the export decodes exactly
like the Megatron model did (held-out accuracy measured by transformers equals the one Megatron measured), the SFT
loss falls, and a second build with the same recipe reuses everything."""
from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import TASK_ASSET_ARGS

REPO = Path(__file__).resolve().parents[2]


def hf_accuracy(model_dir: Path, heldout: Path) -> float:
    """Greedy decoding with transformers (float64 log-softmax, full recompute) and the task's checker; measured once
    per session for the same files (the experiment test measures the assets this module's test measured)."""
    stamp = tuple((p.name, p.stat().st_mtime_ns) for p in sorted(Path(model_dir).glob("*.safetensors")))
    return _hf_accuracy(str(Path(model_dir).resolve()), str(Path(heldout).resolve()), stamp)


@functools.lru_cache(maxsize=None)
def _hf_accuracy(model_dir: str, heldout: str, _weights_stamp: tuple) -> float:
    from transformers import AutoTokenizer

    from megatron_topd.tasks import AdditionTask
    from megatron_topd.tasks.addition import EOS_ID
    from megatron_topd.testing.tiny_hf import hf_greedy, load_hf_model

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = load_hf_model(model_dir)
    task = AdditionTask()
    rows = [json.loads(line) for line in open(heldout)]
    correct = 0
    for row in rows:
        ids, _ = hf_greedy(model, tok(row["prompt"])["input_ids"], 64, eos_id=EOS_ID)
        correct += task.is_correct(tok.decode(ids, skip_special_tokens=True), row["answer"])
    return correct / len(rows)


@pytest.mark.slow
def test_sft_assets_learn_export_and_are_cached(task_assets):
    out = task_assets["root"]
    report = json.loads((out / "assets.json").read_text())
    teacher, student = report["teacher"], report["student"]
    assert teacher["final_loss"] < 0.3 * teacher["first_loss"]
    assert teacher["heldout_accuracy"] > 0.5, "250 SFT steps teach a 3-layer model 2-digit addition"
    assert student["steps"] == 30 and student["heldout_accuracy"] < teacher["heldout_accuracy"]
    # The HF export (what SGLang serves) answers exactly as the Megatron model did on the same held-out problems.
    assert hf_accuracy(out / "teacher_hf", out / "heldout.jsonl") == pytest.approx(teacher["heldout_accuracy"])
    assert hf_accuracy(out / "student_hf", out / "heldout.jsonl") == pytest.approx(student["heldout_accuracy"])
    for name in ("teacher_megatron", "student_megatron"):
        assert (out / name / "model_spec.yaml").is_file() and (out / name / "latest_step.txt").read_text() == "0"
    # Same recipe: nothing is rebuilt.
    stamp = (out / "teacher_hf" / "model.safetensors").stat().st_mtime_ns
    subprocess.run([sys.executable, "-m", "megatron_topd.task_assets", "--out", str(out), *TASK_ASSET_ARGS],
                   cwd=REPO, check=True, capture_output=True)
    assert (out / "teacher_hf" / "model.safetensors").stat().st_mtime_ns == stamp
