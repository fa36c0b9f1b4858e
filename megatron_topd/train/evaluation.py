"""Held-out accuracy: greedy decoding on the student's (or teacher's) SGLang servers, checked by the task's exact
answer checker (megatron_topd/tasks). What a user of a distillation run wants to watch: is the student getting better
at the task, not only closer to the teacher."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass
class EvalConfig:
    heldout_path: str = ""  # JSONL rows {"prompt" (or "messages"), "answer"}; empty: no evaluation
    task: str = "addition"  # whose answer checker reads the responses (megatron_topd.tasks.TASKS)
    interval: int = 0  # evaluate before the first step, every `interval` steps and after the last (0: first + last)
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    limit: int | None = None  # evaluate the first `limit` rows only
    teacher: bool = True  # also evaluate the teacher once, before training (the ceiling the table shows)

    def validate(self) -> None:
        from megatron_topd.tasks import check_task

        check_task(self.task)
        if not isinstance(self.interval, int) or self.interval < 0:
            raise ValueError(f"eval.interval={self.interval!r}: use an integer >= 0 (0: before and after training)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens={self.max_new_tokens}: use an integer >= 1 or null")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit={self.limit}: use an integer >= 1 or null")
        if self.heldout_path and not Path(self.heldout_path).is_file():
            raise FileNotFoundError(f"eval.heldout_path={self.heldout_path} does not exist: write the held-out "
                                    "problems there (JSONL with prompt and answer) or leave it empty")

    @property
    def enabled(self) -> bool:
        return bool(self.heldout_path)

    def due(self, step: int, total_steps: int) -> bool:
        """Evaluate after step `step` (1-based)?"""
        return self.enabled and (step == total_steps or (self.interval > 0 and step % self.interval == 0))


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
