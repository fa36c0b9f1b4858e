"""The run's configuration: nested dataclasses, a YAML file, dotted CLI overrides (`train.steps=10`).

Every section validates itself with errors that name the field and the fix; `load_config` fails on unknown keys
(a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_topd.models.precision import PrecisionConfig
from megatron_topd.models.spec import ModelSpec
from megatron_topd.rollout.config import RolloutConfig
from megatron_topd.topd.config import TopdConfig
from megatron_topd.train.optim import OptimConfig


@dataclass
class ParallelConfig:
    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    backend: str | None = None  # None: nccl on GPU, gloo on CPU

    def validate(self) -> None:
        if self.tensor_parallel < 1 or self.pipeline_parallel < 1:
            raise ValueError("parallel.tensor_parallel and parallel.pipeline_parallel must be >= 1")
        if self.backend not in (None, "nccl", "gloo"):
            raise ValueError(f"parallel.backend={self.backend!r}: use nccl, gloo or null (auto)")


@dataclass
class TeacherConfig:
    """The teacher: co-located in the trainer (exact full-vocab KL, the default) or remote (top-k KL)."""

    placement: str = "colocated"  # colocated | remote
    checkpoint: str = ""  # Megatron checkpoint folder (tools/convert_hf_to_megatron.py output)
    hf_path: str = ""  # HF folder the teacher's SGLang server loads (near-future windows, remote scoring)
    top_k: int = 64  # remote placement: top-k log-probs per position

    def validate(self) -> None:
        if self.placement not in ("colocated", "remote"):
            raise ValueError(f"teacher.placement={self.placement!r}: use colocated or remote")
        if self.top_k < 1:
            raise ValueError(f"teacher.top_k={self.top_k} must be >= 1")


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 8  # x rollout.n_samples responses per step
    micro_batch_size: int = 1
    max_seq_length: int = 2048
    seed: int = 1234
    prompts_path: str = ""  # JSONL with a "prompt" (or "messages") field per line
    student_checkpoint: str = ""  # Megatron checkpoint to start from (converted HF student)
    student_hf_path: str = ""  # HF folder of the same student (for its SGLang servers and tokenizer)
    output_dir: str = "runs/topd"
    save_interval: int = 50
    log_interval: int = 1
    loss_chunk_size: int | None = 1024  # tokens per chunk in the vocabulary-parallel loss
    wandb_project: str | None = None

    def validate(self) -> None:
        for name in ("steps", "prompts_per_step", "micro_batch_size", "max_seq_length", "save_interval", "log_interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)} must be >= 1")


@dataclass
class Config:
    student: ModelSpec | None = None  # None: read from the student checkpoint's model_spec.yaml
    teacher_spec: ModelSpec | None = None
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    topd: TopdConfig = field(default_factory=TopdConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)

    def validate(self) -> "Config":
        for section in (self.parallel, self.precision, self.optim, self.train, self.teacher, self.topd):
            section.validate()
        for spec in (self.student, self.teacher_spec):
            if spec is not None:
                spec.validate(self.parallel.tensor_parallel, self.parallel.pipeline_parallel)
        if self.student and self.teacher_spec and self.student.vocab_size != self.teacher_spec.vocab_size:
            raise ValueError(
                f"student.vocab_size={self.student.vocab_size} != teacher_spec.vocab_size="
                f"{self.teacher_spec.vocab_size}: on-policy distillation needs one shared tokenizer; "
                "pick a student and teacher of the same tokenizer family"
            )
        return self


# ---- dict <-> dataclass ----------------------------------------------------------------------------------------
def _is_dataclass_type(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _strip_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def from_dict(cls, data: dict[str, Any], path: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys are an error naming the key and the known ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {[f'{path}{k}' for k in unknown]}; known keys under "
                         f"{path.rstrip('.') or 'the top level'}: {sorted(known)}")
    kwargs = {}
    for name, value in data.items():
        tp = _strip_optional(hints[name])
        if _is_dataclass_type(tp) and isinstance(value, dict):
            if tp is ModelSpec:
                value = ModelSpec.from_dict(value)
            else:
                value = from_dict(tp, value, f"{path}{name}.")
        kwargs[name] = value
    return cls(**kwargs)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML: numbers, booleans, null, lists)."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {part} is not a section")
        node[parts[-1]] = _parse_value(raw)
    return data


def _parse_value(raw: str):
    """YAML scalars, plus floats such as 3e-5 that YAML 1.1 would leave as strings."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data = apply_overrides(data or {}, overrides or [])
    return from_dict(Config, data).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
