"""Synthetic tasks with exact-answer checkers, built offline: the demo's and the experiment's workload."""
from megatron_topd.tasks.addition import AdditionTask, Problem, build_tokenizer
from megatron_topd.tasks.addition_forms import AdditionFormsTask

TASKS = {"addition": AdditionTask, "addition_forms": AdditionFormsTask}


def check_task(name: str) -> None:
    if name not in TASKS:
        raise ValueError(f"eval.task={name!r} is not a known task: use one of {', '.join(TASKS)}")


def make_task(name: str, **kwargs):
    check_task(name)
    return TASKS[name](**kwargs)


__all__ = ["AdditionFormsTask", "AdditionTask", "Problem", "TASKS", "build_tokenizer", "check_task", "make_task"]
