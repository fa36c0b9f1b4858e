"""`teacher.tokenizer` (auto | same | cross): what a teacher with another tokenizer needs, refused at validation with
errors that name the field and the fix (issue 27; docs/remote_teacher.md "Teachers with another tokenizer")."""
from __future__ import annotations

import pytest

from megatron_topd.config import Config, load_config
from megatron_topd.models import ModelSpec

REMOTE_CROSS = ["teacher.placement=remote", "teacher.kl=sampled", "teacher.tokenizer=cross", "topd.variant=opd"]


def cfg(overrides: list[str], tmp_path) -> Config:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    return load_config(path, overrides)


def test_default_is_auto_and_a_remote_sampled_opd_teacher_validates(tmp_path):
    assert Config().teacher.tokenizer == "auto"
    cfg(REMOTE_CROSS, tmp_path).validate()  # remote, sampled: what runs across tokenizers, with every variant
    for variant in ("topd", "opd_suppress"):
        cfg(REMOTE_CROSS + [f"topd.variant={variant}"], tmp_path).validate()
    for mode in ("auto", "same"):  # same-tokenizer teachers: every variant and estimator as before
        cfg([f"teacher.tokenizer={mode}", "teacher.placement=remote", "teacher.kl=topk"], tmp_path).validate()
        cfg([f"teacher.tokenizer={mode}"], tmp_path).validate()


def test_unknown_mode_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"teacher.tokenizer='bpe': use one of auto, same, cross"):
        cfg(["teacher.tokenizer=bpe"], tmp_path).validate()


@pytest.mark.parametrize("overrides, message", [
    (["teacher.placement=colocated", "teacher.kl=full"], r"teacher.tokenizer=cross needs teacher.placement=remote"),
    (["teacher.kl=topk"], r"teacher.tokenizer=cross needs teacher.kl=sampled, not topk: top-k and full KL"),
    (["teacher.api=openai", "topd.variant=topd"], r"teacher.api=openai with topd.variant=topd: the probe needs the "
                                                  r"teacher to continue prefixes"),
])
def test_cross_refuses_what_needs_a_shared_vocabulary_or_a_teacher_that_generates(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        cfg(REMOTE_CROSS + overrides, tmp_path).validate()


def test_cross_refuses_the_teachers_heldout_evaluation(tmp_path):
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"prompt": "1+2=", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"eval.teacher=true: .* set eval.teacher=false"):
        cfg(REMOTE_CROSS + [f"eval.heldout_path={heldout}"], tmp_path).validate()
    cfg(REMOTE_CROSS + [f"eval.heldout_path={heldout}", "eval.teacher=false"], tmp_path).validate()


def test_vocab_check_relaxed_for_cross_only(tmp_path):
    """Explicit specs with different vocabularies: refused for a same-tokenizer teacher (naming the cross mode),
    accepted with teacher.tokenizer=cross."""
    student = ModelSpec(vocab_size=1000, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                        ffn_hidden_size=128)
    teacher = ModelSpec(vocab_size=300, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                        ffn_hidden_size=128)
    same = cfg(["teacher.placement=remote", "teacher.kl=sampled"], tmp_path)
    same.student, same.teacher_spec = student, teacher
    with pytest.raises(ValueError, match=r"teacher.tokenizer=cross"):
        same.validate()
    cross = cfg(REMOTE_CROSS, tmp_path)
    cross.student, cross.teacher_spec = student, teacher
    cross.validate()


@pytest.mark.parametrize("value", [0, 7, 1.5, True, "long"])
def test_teacher_context_length_is_checked(tmp_path, value):
    with pytest.raises(ValueError, match=r"teacher.context_length=.*integer >= 8 .* or null for rollout.context_length"):
        cfg([f"teacher.context_length={value}"], tmp_path).validate()
    assert cfg(["teacher.context_length=256"], tmp_path).validate().teacher.context_length == 256
