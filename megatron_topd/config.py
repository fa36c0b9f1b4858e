"""The run's configuration: nested dataclasses, a YAML file, dotted CLI overrides (`train.steps=10`).

Every section validates itself with errors that name the field and the fix; `load_config` fails on unknown keys
(a typo must not silently fall back to a default).
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from megatron_topd.launch.config import LaunchConfig
from megatron_topd.overrides import apply_overrides
from megatron_topd.models.precision import PrecisionConfig
from megatron_topd.models.spec import ModelSpec
from megatron_topd.rollout.config import RolloutConfig
from megatron_topd.topd.config import TEACHER_PLACEMENTS, TopdConfig
from megatron_topd.train.config import KL_ESTIMATORS, EvalConfig, OptimConfig


RECOMPUTE = ("none", "selective", "full")


@dataclass
class ParallelConfig:
    """The student's (and co-located teacher's) layout and the long-context knobs (docs/training_step.md)."""

    tensor_parallel: int = 1
    pipeline_parallel: int = 1
    context_parallel: int = 1  # splits each sequence over ranks; needs Transformer Engine on a GPU
    sequence_parallel: bool = False  # shards LayerNorm/dropout activations over TP ranks (needs TP > 1)
    recompute: str = "none"  # none | selective (core attention) | full (every layer's activations)
    first_stage_layers: int | None = None  # uneven pipeline stages: layers on the first / last stage
    last_stage_layers: int | None = None
    timeout_minutes: float = 120.0  # every process group: ranks wait in collectives while generation runs
    backend: str | None = None  # None: nccl on GPU, gloo on CPU

    def validate(self) -> None:
        for name in ("tensor_parallel", "pipeline_parallel", "context_parallel"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"parallel.{name}={getattr(self, name)!r} must be an integer >= 1")
        if self.backend not in (None, "nccl", "gloo"):
            raise ValueError(f"parallel.backend={self.backend!r}: use nccl, gloo or null (auto)")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"parallel.recompute={self.recompute!r}: use one of {', '.join(RECOMPUTE)}")
        if self.sequence_parallel and self.tensor_parallel < 2:
            raise ValueError("parallel.sequence_parallel=true needs parallel.tensor_parallel >= 2 (it shards "
                             "activations over the tensor-parallel ranks); set it false at TP=1")
        if self.context_parallel > 1:  # on any machine: the planner never proposes it (plan/search.py)
            raise ValueError(f"parallel.context_parallel={self.context_parallel}: the distillation loss does not yet "
                             "slice its per-token inputs by context-parallel rank; use sequence_parallel + recompute")
        if not self.timeout_minutes > 0:
            raise ValueError(f"parallel.timeout_minutes={self.timeout_minutes} must be > 0; it should exceed the "
                             "longest generation phase, since ranks wait in a collective meanwhile")

    def check_machine(self) -> None:
        """Knobs this machine cannot run, as clear errors (called where the trainer starts, not on a login node)."""
        from megatron_topd.models.precision import use_transformer_engine

        if self.sequence_parallel and not use_transformer_engine():
            raise ValueError("parallel.sequence_parallel=true needs Transformer Engine layers on a GPU (Megatron's "
                             "local torch norm refuses sequence parallelism); set it false on this machine")
        if self.context_parallel > 1 and not use_transformer_engine():
            raise ValueError(f"parallel.context_parallel={self.context_parallel} needs Transformer Engine attention "
                             "on a GPU (Megatron's local attention has no context parallelism); set it to 1 here")

    def model_overrides(self) -> dict:
        """The TransformerConfig fields these knobs set (passed to `build_gpt_model`)."""
        out: dict = {"sequence_parallel": self.sequence_parallel, "context_parallel_size": self.context_parallel}
        if self.recompute != "none":
            out["recompute_granularity"] = self.recompute
        if self.recompute == "full":
            out.update(recompute_method="uniform", recompute_num_layers=1)
        if self.first_stage_layers is not None:
            out["num_layers_in_first_pipeline_stage"] = self.first_stage_layers
        if self.last_stage_layers is not None:
            out["num_layers_in_last_pipeline_stage"] = self.last_stage_layers
        if self.pipeline_parallel > 1:  # microbatches differ in shape: stages exchange shapes first
            out["variable_seq_lengths"] = True
        return out


@dataclass
class TeacherConfig:
    """The teacher: co-located in the trainer (exact full-vocab KL, the default) or remote on SGLang servers
    (top-k or sampled-token KL; the trainer then builds no teacher model). docs/remote_teacher.md."""

    placement: str = "colocated"  # colocated | remote
    kl: str = "full"  # full (co-located only, exact) | topk (top-k + tail bucket) | sampled (per-token estimator)
    checkpoint: str = ""  # Megatron checkpoint folder (tools/convert_hf_to_megatron.py output); co-located only
    hf_path: str = ""  # HF folder the teacher's SGLang server loads (near-future windows, remote scoring)
    top_k: int = 64  # topk: top-k log-probs per position (also the guidance windows' top-k under topk / sampled)
    precision: PrecisionConfig | None = None  # co-located: its own precision; null = the student's dtype, no FP8
    urls: list[str] = field(default_factory=list)  # running teacher SGLang servers; when set rank 0 launches none
    # auto (same when the vocabularies match, cross otherwise) | same | cross (a remote teacher with its own
    # tokenizer, teacher.kl=sampled: docs/remote_teacher.md "Teachers with another tokenizer")
    tokenizer: str = "auto"
    # sglang (its /generate) | openai (an OpenAI-compatible /v1/completions: scores only, top-k values capped at
    # api_max_top_k, key from the environment variable api_key_env): docs/remote_teacher.md "OpenAI-compatible"
    api: str = "sglang"
    api_model: str = "default"
    api_max_top_k: int = 20
    api_key_env: str = ""
    deadline_s: float = 0.0  # remote: a row not scored within it (retries included) is dropped and counted; 0: none
    temperature: float | None = None  # remote scores at this temperature; null: rollout.temperature (0 -> 1)
    # the teacher server's context length (the one rank 0 launches, and the client's longest-input check); null:
    # rollout.context_length. A teacher whose tokenizer writes a row in more tokens needs more than the student
    context_length: int | None = None

    def validate(self) -> None:
        if self.api not in TEACHER_APIS:
            raise ValueError(f"teacher.api={self.api!r}: use {' or '.join(TEACHER_APIS)}")
        if self.api == "openai" and (self.placement != "remote" or self.kl == "topk"):
            raise ValueError(f"teacher.api=openai with teacher.placement={self.placement}, teacher.kl={self.kl}: an "
                             "OpenAI-compatible endpoint is a remote teacher whose top-k comes keyed by token text, "
                             "not id; use teacher.placement=remote, teacher.kl=sampled")
        if isinstance(self.api_max_top_k, bool) or not isinstance(self.api_max_top_k, int) or self.api_max_top_k < 1:
            raise ValueError(f"teacher.api_max_top_k={self.api_max_top_k!r}: the server's cap on logprobs, >= 1")
        if not isinstance(self.deadline_s, (int, float)) or not 0 <= self.deadline_s < math.inf:
            raise ValueError(f"teacher.deadline_s={self.deadline_s!r}: seconds per row, >= 0 (0: no deadline)")
        if self.context_length is not None and (isinstance(self.context_length, bool)
                                                or not isinstance(self.context_length, int) or self.context_length < 8):
            raise ValueError(f"teacher.context_length={self.context_length!r}: the teacher server's context in its "
                             "tokens, an integer >= 8 (SGLang takes inputs up to 7 below it), or null for "
                             "rollout.context_length")
        if self.temperature is not None and not 0 < self.temperature < math.inf:
            raise ValueError(f"teacher.temperature={self.temperature!r}: use a number > 0, or null for the rollout's")
        if self.placement not in TEACHER_PLACEMENTS:
            raise ValueError(f"teacher.placement={self.placement!r}: use {' or '.join(TEACHER_PLACEMENTS)}")
        if self.tokenizer not in TEACHER_TOKENIZERS:
            raise ValueError(f"teacher.tokenizer={self.tokenizer!r}: use one of {', '.join(TEACHER_TOKENIZERS)}")
        if self.tokenizer == "cross":
            check_cross_tokenizer(self.placement, self.kl, "teacher.tokenizer=cross")
        if self.top_k < 1:
            raise ValueError(f"teacher.top_k={self.top_k} must be >= 1")
        if self.kl not in KL_ESTIMATORS:
            raise ValueError(f"teacher.kl={self.kl!r}: use one of {', '.join(KL_ESTIMATORS)}")
        if self.placement == "remote" and self.kl == "full":
            raise ValueError("teacher.kl=full needs the teacher's full logits, i.e. teacher.placement=colocated; "
                             "with a remote teacher use teacher.kl=topk or sampled")
        if self.placement == "colocated" and self.kl != "full":
            raise ValueError(f"teacher.kl={self.kl} is for a remote teacher: a co-located one gives the exact KL "
                             "(teacher.kl=full)")
        if self.precision is not None:
            self.precision.validate()
        for i, url in enumerate(self.urls):
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise ValueError(f"teacher.urls[{i}]={url!r}: use a full URL such as http://node07:30000")

    def scoring_temperature(self, rollout_temperature: float) -> float:
        """The temperature of a remote teacher's scores: ``temperature``, else the rollouts' (greedy: 1)."""
        if self.temperature is not None:
            return float(self.temperature)
        return float(rollout_temperature) if rollout_temperature > 0 else 1.0


TEACHER_APIS = ("sglang", "openai")
TEACHER_TOKENIZERS = ("auto", "same", "cross")  # topd/cross_tokenizer.py's TOKENIZER_MODES (a layer above)


def check_cross_tokenizer(placement: str, kl: str, why: str) -> None:
    """A teacher with another tokenizer: remote and scored by the sampled-token estimator only (its distribution is
    over another vocabulary, so there is no top-k or full KL against the student's). ``why`` says what made it cross."""
    if placement != "remote":
        raise ValueError(f"{why} needs teacher.placement=remote (a co-located teacher shares the student's "
                         "vocabulary and layout); serve the teacher on SGLang: teacher.placement=remote, "
                         "teacher.kl=sampled")
    if kl != "sampled":
        raise ValueError(f"{why} needs teacher.kl=sampled, not {kl}: top-k and full KL compare distributions over "
                         "one shared vocabulary, which a teacher with another tokenizer does not have")


def check_cross_tokenizer_eval(eval_teacher: bool, why: str) -> None:
    """What the loop does not do across tokenizers: the teacher's held-out evaluation (it would be fed the student's
    prompt ids). Every topd.variant runs (TOPD's probe across tokenizers: train/cross_probe.py)."""
    if eval_teacher:
        raise ValueError(f"{why} with eval.teacher=true: the teacher's held-out evaluation feeds it the student's "
                         "prompt ids, which mean other strings to it; set eval.teacher=false")


def check_openai_teacher(cfg: "Config") -> None:
    """What an OpenAI-compatible teacher cannot do: continue prefixes (TOPD's windows) or generate for the held-out
    evaluation (it only scores), or give more top-k values than the server allows (they are asked for at a
    temperature other than 1, to renormalise)."""
    t = cfg.teacher
    if cfg.topd.variant != "opd":
        raise ValueError(f"teacher.api=openai with topd.variant={cfg.topd.variant}: the probe needs the teacher to "
                         "continue prefixes (SGLang's /generate); use topd.variant=opd, or teacher.api=sglang")
    if cfg.eval.enabled and cfg.eval.teacher:
        raise ValueError("teacher.api=openai with eval.teacher=true: the teacher's held-out evaluation generates "
                         "through SGLang's /generate; set eval.teacher=false")
    if t.scoring_temperature(cfg.rollout.temperature) != 1.0 and t.top_k > t.api_max_top_k:
        raise ValueError(f"teacher.top_k={t.top_k} > teacher.api_max_top_k={t.api_max_top_k}: at temperature "
                         f"{t.scoring_temperature(cfg.rollout.temperature)} the teacher's top-k renormalises its "
                         f"scores and the server gives at most {t.api_max_top_k}; set teacher.top_k <= "
                         f"{t.api_max_top_k}")


PROMPT_OVERFLOW = ("error", "skip")
NONFINITE = ("skip", "stop")
GUIDANCE_LAYOUTS = ("auto", "shared_prefix", "rows")


@dataclass
class TrainConfig:
    steps: int = 100
    prompts_per_step: int = 8  # x rollout.n_samples responses per step
    max_seq_length: int = 2048  # prompt + response (and guidance prefix + window) must fit
    max_tokens_per_microbatch: int = 4096  # rows are packed into microbatches of at most this many (padded) tokens
    teacher_group_microbatches: int = 4  # G: co-located teacher logits live for at most G microbatches
    on_nonfinite: str = "stop"  # skip | stop: a non-finite loss or gradient on any rank
    seed: int = 1234
    prompts_path: str = ""  # JSONL with a "prompt" (or "messages") field per line
    student_checkpoint: str = ""  # Megatron checkpoint to start from (converted HF student)
    student_hf_path: str = ""  # HF folder of the same student (for its SGLang servers and tokenizer)
    output_dir: str = "runs/topd"
    save_interval: int = 50
    keep_checkpoints: int = 0  # keep the newest N checkpoints, delete older ones (0: keep all; ~1 TB each at 70B)
    loss_chunk_size: int | None = 1024  # tokens per chunk in the vocabulary-parallel loss
    wandb_project: str | None = None
    # Throughput (docs/throughput.md): sample step k+1's rollouts while step k trains (one step off-policy), and
    # optionally correct the OPD term per token by min(pi_trainer / pi_rollout, cap) (truncated importance sampling).
    async_rollouts: bool = False
    rollout_is_correction: bool = False
    rollout_is_cap: float = 2.0
    # Guidance windows inside their rollout row (shared_prefix: K tokens each instead of prefix + K; needs Megatron's
    # local attention) or as rows of their own (rows); auto: shared_prefix unless Transformer Engine layers are used.
    guidance_layout: str = "auto"
    # A prompt longer than max_seq_length - rollout.max_new_tokens (- topd.window) is found before any model is
    # built: error (list them, stop) or skip (drop and count them; the run's metrics say how many).
    prompt_overflow: str = "error"

    def validate(self) -> None:
        if self.prompt_overflow not in PROMPT_OVERFLOW:
            raise ValueError(f"train.prompt_overflow={self.prompt_overflow!r}: use {' or '.join(PROMPT_OVERFLOW)}")
        for name in ("steps", "prompts_per_step", "max_seq_length", "max_tokens_per_microbatch",
                     "teacher_group_microbatches", "save_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name}={getattr(self, name)!r} must be an integer >= 1")
        if isinstance(self.keep_checkpoints, bool) or not isinstance(self.keep_checkpoints, int) or \
                self.keep_checkpoints < 0:
            raise ValueError(f"train.keep_checkpoints={self.keep_checkpoints!r} must be an integer >= 0 (0: keep all)")
        if self.on_nonfinite not in NONFINITE:
            raise ValueError(f"train.on_nonfinite={self.on_nonfinite!r}: use skip or stop")
        if self.max_tokens_per_microbatch < self.max_seq_length:
            raise ValueError(f"train.max_tokens_per_microbatch={self.max_tokens_per_microbatch} < train.max_seq_length="
                             f"{self.max_seq_length}: a full-length row must fit one microbatch; raise the budget")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(f"train.loss_chunk_size={self.loss_chunk_size} must be >= 1 (or null: automatic)")
        for name in ("async_rollouts", "rollout_is_correction"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"train.{name}={getattr(self, name)!r} must be true or false")
        if self.guidance_layout not in GUIDANCE_LAYOUTS:
            raise ValueError(f"train.guidance_layout={self.guidance_layout!r}: use one of {', '.join(GUIDANCE_LAYOUTS)}")
        cap = self.rollout_is_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap < 1.0:
            raise ValueError(f"train.rollout_is_cap={cap!r} must be a finite number >= 1 (the largest per-token "
                             "importance weight pi_trainer / pi_rollout; 1 = never up-weight a token)")


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
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # Slurm role split (megatron_topd/launch/)
    eval: EvalConfig = field(default_factory=EvalConfig)  # held-out accuracy on the servers (train/evaluation.py)

    def validate(self) -> "Config":
        if not self.rollout.model_path and not self.rollout.urls:  # the student's servers start from its HF folder
            self.rollout.model_path = self.train.student_hf_path
        for section in (self.parallel, self.precision, self.optim, self.train, self.teacher, self.topd, self.launch,
                        self.eval):
            section.validate()
        self.topd.embedding_table(self.teacher.placement)  # teacher table + remote teacher: a clear error, early
        # The paths are empty until the demo or the launcher fills them in: check everything else already.
        self.rollout.validate(require_model=bool(self.train.student_hf_path))
        # Rows: prompt + response; guidance rows: prefix (< the rollout) + window. Prompts longer than what is left
        # are rejected when the batch is drawn (train/rows.py), with the numbers.
        longest = self.rollout.max_new_tokens + 1 + (self.topd.window if self.topd.variant == "topd" else 0)
        if longest > self.train.max_seq_length:
            raise ValueError(f"rollout.max_new_tokens={self.rollout.max_new_tokens} (+ topd.window={self.topd.window} "
                             f"for guidance rows) leaves no room for a prompt in train.max_seq_length="
                             f"{self.train.max_seq_length}: raise max_seq_length or lower max_new_tokens")
        for spec in (self.student, self.teacher_spec):
            if spec is not None:
                spec.validate(self.parallel.tensor_parallel, self.parallel.pipeline_parallel,
                              first_stage_layers=self.parallel.first_stage_layers,
                              last_stage_layers=self.parallel.last_stage_layers)
        if self.teacher.api == "openai":
            check_openai_teacher(self)
        if self.teacher.tokenizer == "cross":
            check_cross_tokenizer_eval(self.eval.enabled and self.eval.teacher, "teacher.tokenizer=cross")
        elif self.student and self.teacher_spec and self.student.vocab_size != self.teacher_spec.vocab_size:
            raise ValueError(
                f"student.vocab_size={self.student.vocab_size} != teacher_spec.vocab_size="
                f"{self.teacher_spec.vocab_size}: on-policy distillation needs one shared tokenizer; "
                "pick a student and teacher of the same tokenizer family, or serve the teacher remotely with "
                "teacher.tokenizer=cross (teacher.placement=remote, teacher.kl=sampled)"
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


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = yaml.safe_load(Path(path).read_text()) if path else {}
    data = apply_overrides(data or {}, overrides or [])
    return from_dict(Config, data).validate()


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
