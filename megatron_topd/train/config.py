"""The `optim:` and `eval:` sections and the teacher's KL estimator names: dataclasses the root config
(megatron_topd/config.py) reads without importing the training code (it sits below train/ in the layering)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

KL_ESTIMATORS = ("full", "topk", "sampled")  # teacher.kl: train/estimators.py implements each


OPTIMIZERS = ("adam", "sgd")


@dataclass
class OptimConfig:
    optimizer: str = "adam"  # adam | sgd (plain gradient descent without momentum: the update is -lr * grad)
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.98
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    lr_decay_style: str = "constant"  # constant | linear | cosine
    lr_decay_steps: int | None = None  # None: the run's total steps
    use_distributed_optimizer: bool = True

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optim.optimizer={self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.optimizer == "sgd" and self.use_distributed_optimizer:
            raise ValueError("optim.optimizer=sgd needs optim.use_distributed_optimizer=false (Megatron's distributed "
                             "optimizer shards Adam state only)")
        if self.lr <= 0:
            raise ValueError(f"optim.lr={self.lr} must be positive")
        if self.lr_decay_style not in ("constant", "linear", "cosine"):
            raise ValueError(f"optim.lr_decay_style={self.lr_decay_style!r}: use constant, linear or cosine")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad} must be >= 0 (0 disables clipping)")


@dataclass
class EvalConfig:
    heldout_path: str = ""  # JSONL rows {"prompt" (or "messages"), "answer"}; empty: no evaluation
    task: str = "addition"  # whose answer checker reads the responses (megatron_topd.tasks.TASKS)
    interval: int = 0  # evaluate before the first step, every `interval` steps and after the last (0: first + last)
    max_new_tokens: int | None = None  # None: rollout.max_new_tokens
    limit: int | None = None  # evaluate the first `limit` rows only
    teacher: bool = True  # also evaluate the teacher once, before training (the ceiling the table shows)
    # The start's accuracies measured once for several runs from the same initial student and held-out set (an
    # experiment's arm: train/evaluation.py write_baseline); empty: every run measures them before its first step
    baseline_file: str = ""

    def validate(self) -> None:
        from megatron_topd.tasks import check_task

        check_task(self.task)
        if not isinstance(self.interval, int) or self.interval < 0:
            raise ValueError(f"eval.interval={self.interval!r}: use an integer >= 0 (0: before and after training)")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"eval.max_new_tokens={self.max_new_tokens}: use an integer >= 1 or null")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"eval.limit={self.limit}: use an integer >= 1 or null")
        if self.baseline_file and not Path(self.baseline_file).is_file():
            raise FileNotFoundError(f"eval.baseline_file={self.baseline_file} does not exist: write it with "
                                    "train.evaluation.write_baseline, or leave it empty to measure the start")
        if self.heldout_path and not Path(self.heldout_path).is_file():
            raise FileNotFoundError(f"eval.heldout_path={self.heldout_path} does not exist: write the held-out "
                                    "problems there (JSONL with prompt and answer) or leave it empty")

    @property
    def enabled(self) -> bool:
        return bool(self.heldout_path)

    def due(self, step: int, total_steps: int) -> bool:
        """Evaluate after step `step` (1-based)?"""
        return self.enabled and (step == total_steps or (self.interval > 0 and step % self.interval == 0))
