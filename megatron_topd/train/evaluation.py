"""Held-out accuracy: greedy decoding on the student's (or teacher's) SGLang servers, checked by the task's exact
answer checker (megatron_topd/tasks). What a user of a distillation run wants to watch: is the student getting better
at the task, not only closer to the teacher."""
from __future__ import annotations

import json
import math
from pathlib import Path

from megatron_topd.train.config import EvalConfig


class HeldOutEval:
    """The held-out prompts, tokenized like the training prompts, and their answers."""

    def __init__(self, cfg: EvalConfig, tokenizer, *, chat_template: bool, max_new_tokens: int):
        from megatron_topd.rollout.prompts import PromptDataset
        from megatron_topd.tasks import make_task

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.task = make_task(cfg.task)
        data = PromptDataset(cfg.heldout_path, tokenizer, n_samples=1, chat_template=chat_template, shuffle=False)
        n = len(data) if cfg.limit is None else min(cfg.limit, len(data))
        self.prompts, self.answers = [], []
        for i in range(n):
            prompt = data.tokenize(i)
            if "answer" not in prompt.row:
                raise ValueError(f"{cfg.heldout_path} row {i} has no 'answer': held-out rows need the exact answer")
            self.prompts.append(prompt.ids)
            self.answers.append(str(prompt.row["answer"]))
        self.max_new_tokens = cfg.max_new_tokens or max_new_tokens

    def accuracy(self, client) -> float:
        """Greedy (temperature 0) decoding of every held-out prompt on `client`'s servers; the share answered right."""
        from megatron_topd.rollout import SamplingParams

        gens = client.generate(self.prompts, SamplingParams(max_new_tokens=self.max_new_tokens, temperature=0.0, n=1))
        correct = 0
        for row, answer in zip(gens, self.answers):
            text = self.tokenizer.decode(row[0].token_ids, skip_special_tokens=True)
            correct += self.task.is_correct(text, answer)
        return correct / len(self.answers)


def write_baseline(path: str | Path, *, heldout_path: str, student: str, accuracies: dict) -> None:
    """Record the start's held-out accuracies (`accuracies`: heldout_accuracy and, optionally,
    teacher_heldout_accuracy) for every run that starts from ``student`` (train.student_checkpoint) and evaluates
    ``heldout_path``: such runs read it (eval.baseline_file) instead of decoding the same set again."""
    Path(path).write_text(json.dumps({"heldout_path": str(Path(heldout_path).resolve()),
                                      "student": str(Path(student).resolve()), **accuracies}, indent=1))


def read_baseline(cfg: EvalConfig, student: str, *, teacher_too: bool) -> dict:
    """The step-0 metrics from ``cfg.baseline_file``, after checking it was measured for this run's held-out set and
    initial student (a baseline of other runs would put a wrong start in every table)."""
    path = cfg.baseline_file
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"eval.baseline_file={path}: not a readable JSON file ({e})") from e
    for field, mine in (("heldout_path", cfg.heldout_path), ("student", student)):
        if data.get(field) != str(Path(mine).resolve()):
            raise ValueError(f"eval.baseline_file={path} was measured with {field}={data.get(field)!r}, this run has "
                             f"{Path(mine).resolve()}: measure this run's start (leave eval.baseline_file empty)")
    wanted = ["heldout_accuracy"] + (["teacher_heldout_accuracy"] if teacher_too else [])
    for key in wanted:
        value = data.get(key)
        if not isinstance(value, (int, float)) or not math.isfinite(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"eval.baseline_file={path}: {key}={value!r} must be an accuracy in [0, 1]"
                             + (" (or set eval.teacher=false)" if key.startswith("teacher") else ""))
    return {key: float(data[key]) for key in wanted}
