"""The shared start of an experiment's runs (eval.baseline_file): read back only for the held-out set and initial
student it was measured with, with every accuracy the run reports; and the teacher arms' shared student assets."""
from __future__ import annotations

import json

import pytest

from megatron_topd.experiment import share_student
from megatron_topd.train.config import EvalConfig
from megatron_topd.train.evaluation import read_baseline, write_baseline


def setup_files(tmp_path, **accuracies):
    heldout, student = tmp_path / "heldout.jsonl", tmp_path / "student_megatron"
    heldout.write_text('{"prompt": "1+2=", "answer": "3"}\n')
    student.mkdir()
    path = tmp_path / "baseline.json"
    write_baseline(path, heldout_path=str(heldout), student=str(student), accuracies=accuracies)
    return EvalConfig(heldout_path=str(heldout), baseline_file=str(path)), str(student)


def test_baseline_round_trip(tmp_path):
    cfg, student = setup_files(tmp_path, heldout_accuracy=0.392, teacher_heldout_accuracy=0.998)
    cfg.validate()
    assert read_baseline(cfg, student, teacher_too=True) == {"heldout_accuracy": 0.392,
                                                             "teacher_heldout_accuracy": 0.998}
    assert read_baseline(cfg, student, teacher_too=False) == {"heldout_accuracy": 0.392}


def test_baseline_of_another_student_or_heldout_set_is_refused(tmp_path):
    cfg, student = setup_files(tmp_path, heldout_accuracy=0.5)
    other = tmp_path / "other_student"
    with pytest.raises(ValueError, match=r"was measured with student=.*student_megatron.*this run has .*other_student"):
        read_baseline(cfg, str(other), teacher_too=False)
    (tmp_path / "other.jsonl").write_text("")
    cfg.heldout_path = str(tmp_path / "other.jsonl")
    with pytest.raises(ValueError, match=r"was measured with heldout_path="):
        read_baseline(cfg, student, teacher_too=False)


def test_baseline_missing_teacher_or_bad_accuracy_is_named(tmp_path):
    cfg, student = setup_files(tmp_path, heldout_accuracy=0.5)
    with pytest.raises(ValueError, match=r"teacher_heldout_accuracy=None must be an accuracy in \[0, 1\] \(or set "
                                         r"eval.teacher=false\)"):
        read_baseline(cfg, student, teacher_too=True)
    data = json.loads(open(cfg.baseline_file).read())
    data["heldout_accuracy"] = float("nan")
    open(cfg.baseline_file, "w").write(json.dumps(data))
    with pytest.raises(ValueError, match=r"heldout_accuracy=nan must be an accuracy"):
        read_baseline(cfg, student, teacher_too=False)
    cfg.baseline_file = str(tmp_path / "absent.json")
    with pytest.raises(FileNotFoundError, match=r"eval.baseline_file=.*absent.json does not exist"):
        cfg.validate()


def test_second_teacher_arm_starts_from_the_first_arms_assets(tmp_path):
    robust, clean = tmp_path / "assets_robust", tmp_path / "assets_clean"
    share_student(clean, [robust])  # nothing built yet: nothing to share
    assert not clean.exists()
    (robust / "student_hf").mkdir(parents=True)
    (robust / "student_hf" / "config.json").write_text("{}")
    (robust / "assets.json").write_text("{}")
    share_student(clean, [robust])
    assert (clean / "student_hf" / "config.json").read_text() == "{}" and (clean / "assets.json").is_file()
    (robust / "assets.json").write_text('{"changed": 1}')
    share_student(clean, [robust])  # an existing folder is left as it is
    assert (clean / "assets.json").read_text() == "{}"
