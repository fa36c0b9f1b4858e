"""Synthetic tasks with exact-answer checkers, built offline: the demo's and the experiment's workload."""
from megatron_topd.tasks.addition import AdditionTask, Problem, build_tokenizer

TASKS = {"addition": AdditionTask}


def make_task(name: str, **kwargs):
    if name not in TASKS:
        raise ValueError(f"eval.task={name!r} is not a known task: use one of {', '.join(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["AdditionTask", "Problem", "TASKS", "build_tokenizer", "make_task"]
