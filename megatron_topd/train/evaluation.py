"""Held-out accuracy: greedy decoding on the student's (or teacher's) SGLang servers, checked by the task's exact
answer checker (megatron_topd/tasks). What a user of a distillation run wants to watch: is the student getting better
at the task, not only closer to the teacher."""
from __future__ import annotations

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
