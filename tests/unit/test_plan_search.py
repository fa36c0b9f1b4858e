"""Planner and trainer agree (issue 24): every layout the planner searches, at 8B, 70B and 405B shapes, passes the
trainer's own config validation (the same `Config.validate` a run calls), and the chosen co-located teacher group
runs its pipeline schedules at >= 85% efficiency where memory allows."""
import pytest

from megatron_topd.config import Config, from_dict
from megatron_topd.overrides import apply_overrides
from megatron_topd.plan import load_spec
from megatron_topd.plan.search import Problem, choose_on, layouts

CASES = {  # student, teacher, trainer GPUs searched
    "8B": ("Llama-3.1-8B", "Llama-3.1-70B", 16),
    "70B": ("Llama-3.1-70B", "Llama-3.1-70B", 64),
    "405B": ("Llama-3.1-405B", None, 128),
}


def _trainer_config(layout, student, seq: int) -> Config:
    """What the launcher hands the trainer for this layout, validated as the trainer validates it."""
    dotted = [f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
              for k, v in layout.overrides().items()]
    dotted += [f"train.max_seq_length={seq}", "precision.params_dtype=bf16", "rollout.max_new_tokens=1024"]
    cfg = from_dict(Config, apply_overrides({}, dotted))
    cfg.student = student
    return cfg.validate()


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_layout_the_planner_searches_is_one_the_trainer_accepts(case):
    student_name, teacher_name, gpus = CASES[case]
    student = load_spec(student_name)
    problem = Problem(student=student, teacher=load_spec(teacher_name) if teacher_name else None)
    searched = list(layouts(problem, gpus))
    assert len(searched) > 100
    for layout in searched:
        cfg = _trainer_config(layout, student, problem.seq)  # raises on a layout the trainer would refuse
        assert cfg.parallel.context_parallel == 1
    assert {layout.cp for layout in searched} == {1}


def test_context_parallelism_is_refused_by_the_config_on_any_machine():
    with pytest.raises(ValueError, match="context_parallel=2: the distillation loss does not yet slice"):
        from_dict(Config, apply_overrides({}, ["parallel.context_parallel=2"])).validate()


def test_the_70b_choice_runs_its_teacher_schedules_at_85_percent_or_more():
    p = Problem(student=load_spec("Llama-3.1-70B"), teacher=load_spec("Llama-3.1-70B"))
    best = choose_on(p, 8)[0][0].layout  # examples/topd_70b.yaml: 8 trainer nodes
    assert best.placement == "colocated"
    group = best.teacher_group_microbatches
    assert group / (group + best.pp - 1) >= 0.85, best.short()
