"""Planner and trainer agree (issue 24): every layout the planner searches, at 8B, 70B and 405B shapes, passes the
trainer's own config validation (the same `Config.validate` a run calls), and the chosen co-located teacher group
runs its pipeline schedules at >= 85% efficiency where memory allows."""
from pathlib import Path

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


def test_plan_layout_takes_the_models_and_the_nodes_from_the_config(tmp_path):
    """--config alone: the student from its checkpoint's model_spec.yaml, the teacher inline, the trainer nodes and
    GPUs per node from launch:, the step's shape from train/rollout/topd."""
    import json
    import subprocess
    import sys

    import yaml

    from megatron_topd.plan.fixtures import FIXTURES

    student_ckpt = tmp_path / "student_megatron"
    student_ckpt.mkdir()
    load_spec("Llama-3.1-8B").save_yaml(student_ckpt / "model_spec.yaml")
    teacher = json.loads((FIXTURES / "Llama-3.1-70B.json").read_text())
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "parallel": {"tensor_parallel": 8}, "teacher_spec": None,
        "train": {"student_checkpoint": str(student_ckpt), "max_seq_length": 16384, "prompts_per_step": 64,
                  "max_tokens_per_microbatch": 16384, "teacher_group_microbatches": 1},
        "teacher": {"placement": "colocated", "hf_path": str(tmp_path / "teacher_hf")},
        "rollout": {"n_samples": 4, "max_new_tokens": 8000, "num_servers": 2},
        "launch": {"trainer_nodes": 2, "gpus_per_node": 8, "teacher_nodes": 2}}))
    (tmp_path / "teacher_hf").mkdir()
    (tmp_path / "teacher_hf" / "config.json").write_text(json.dumps(teacher))
    out = subprocess.run([sys.executable, "tools/plan_layout.py", "--config", str(config), "--json"],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["nodes"]["trainer"] == 2 and doc["given"]["layout"]["dp"] == 2  # 16 GPUs at TP8
    assert doc["assumptions"]["rollouts_per_step"] == 256 and doc["given"]["fits"]
    phases = doc["step_phases_seconds"]
    assert set(phases) >= {"generation", "scoring", "windows", "teacher_windows", "student_windows", "training",
                           "weight_sync", "checkpoint"}
    assert phases["windows"] == max(phases["teacher_windows"], phases["student_windows"])  # asked at once
    assert all(v > 0 for v in phases.values())
