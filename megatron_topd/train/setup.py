"""Everything a run needs before its first step, in one place: process groups, the student (DDP + optimizer) and a
co-located teacher, the tokenizer and prompts, the resume point, the SGLang servers and their clients, the weight
sync, the metrics logger and the rollout source. `set_up` hands the loop (train/loop.py) one `Run`; the loop then
only runs steps.

Every rank calls `set_up` (torchrun / srun / the test harness). Global rank 0 owns the SGLang servers it launches
and stops them when the run ends, however it ends.
"""
from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from megatron_topd import parallel
from megatron_topd.checkpointing import latest_step, load_checkpoint, load_model_weights
from megatron_topd.config import Config, save_config
from megatron_topd.models import ModelSpec, build_gpt_model
from megatron_topd.train.metrics import MetricsLogger
from megatron_topd.train.optim import build_optimizer, wrap_ddp
from megatron_topd.train.teacher import ColocatedTeacher, RemoteTeacher, TeacherSignal


@dataclass
class Run:
    """What every step of a run uses (the same fields on every rank; rank-0-only ones are None elsewhere)."""

    cfg: Config
    layout: parallel.ParallelLayout
    out: Path  # train.output_dir: config, metrics, rollouts, checkpoints
    student_spec: ModelSpec
    student: list  # DDP-wrapped model chunks
    optimizer: object
    scheduler: object
    teacher: TeacherSignal  # ColocatedTeacher or RemoteTeacher
    tokenizer: object
    pad_id: int
    dataset: object  # rollout.prompts.PromptDataset
    start_step: int  # 0, or the step of the checkpoint this run resumed from
    heldout: object | None  # train.evaluation.HeldOutEval on rank 0 when eval.heldout_path is set
    student_client: object  # rollout.SGLangClient of the student's servers
    teacher_client: object  # the teacher's (windows; scoring when remote)
    weight_sync: object  # rollout.weight_sync.WeightSync
    logger: MetricsLogger
    rollout_source: object  # rollout.async_rollouts.SyncRollouts / AsyncRollouts
    planned_peak_gb: float  # the planner's prediction for this rank's stage, logged beside the measured peak

    @property
    def vocab(self) -> int:
        return self.student_spec.vocab_size

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


@contextmanager
def set_up(cfg: Config) -> Iterator[Run]:
    """Validate, build and connect everything; stop the servers this rank launched when the block ends."""
    from megatron_topd.convert import export_hf_weights
    from megatron_topd.rollout.async_rollouts import make_rollout_source
    from megatron_topd.rollout.weight_sync import make_weight_sync

    # Microbatches vary in shape (token budget, guidance rows): without expandable segments the caching allocator
    # fragments into blocks no later shape fits. Set before anything touches CUDA; a user's own setting wins.
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    cfg.validate()
    cfg.parallel.check_machine()
    guidance_layout(cfg)  # shared_prefix asked for with TE layers: refused before anything starts
    layout = parallel.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                 backend=cfg.parallel.backend, seed=cfg.train.seed,
                                 timeout_s=cfg.parallel.timeout_minutes * 60,
                                 context_parallel=cfg.parallel.context_parallel)
    rank0 = dist.get_rank() == 0
    out = Path(cfg.train.output_dir)
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    tokenizer, pad_id = load_tokenizer(cfg)
    dataset = prompt_dataset(cfg, tokenizer)  # every prompt checked before any model is built
    student_spec, student, optimizer, scheduler, teacher = build_models(cfg)
    planned_gb = planned_peak_gb(cfg, student_spec, layout)
    vocab = student_spec.vocab_size
    start_step = resume(cfg, out / "checkpoints", student, optimizer, scheduler, dataset)
    heldout = held_out_eval(cfg, tokenizer) if rank0 else None  # rank 0 decodes; every rank takes part in the broadcast

    servers = LaunchedServers(cfg) if rank0 else None
    try:
        student_client, teacher_client, student_urls = connect_servers(cfg, servers, vocab)
        teacher = teacher or remote_teacher(cfg, teacher_client, tokenizer, vocab)
        weight_sync = make_weight_sync(replace(cfg.rollout, model_path=cfg.train.student_hf_path), student_urls)
        # Servers we launched start from the student's HF weights; a resumed student, or servers we were pointed at
        # (a fleet that may hold any weights, e.g. a previous run's), are brought to this student first.
        if start_step > 0 or cfg.rollout.urls:
            weight_sync.sync(export_hf_weights(student[0], student_spec), version=str(start_step))
        logger = MetricsLogger(out, enabled=rank0, total_steps=cfg.train.steps, start_step=start_step,
                               wandb_project=cfg.train.wandb_project, config=cfg)
        rollout_source = make_rollout_source(cfg, dataset, student_client, out, vocab, rank0,  # train.async_rollouts
                                             scorer=teacher.rollout_scorer)
        yield Run(cfg, layout, out, student_spec, student, optimizer, scheduler, teacher, tokenizer, pad_id, dataset,
                  start_step, heldout, student_client, teacher_client, weight_sync, logger, rollout_source, planned_gb)
        logger.close()
        weight_sync.close()
    finally:
        if servers is not None:
            servers.stop()


def _spec(explicit: ModelSpec | None, checkpoint: str, who: str) -> ModelSpec:
    if explicit is not None:
        return explicit
    path = Path(checkpoint) / "model_spec.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{who}: no model spec given and {path} does not exist; set the spec in the config "
                                "or point the checkpoint at a tools/convert_hf_to_megatron.py output")
    return ModelSpec.load_yaml(path)


def _ckpt_step_dir(root: str) -> str:
    step = latest_step(root)
    if step is None:
        raise FileNotFoundError(f"{root} holds no checkpoint (no latest_step.txt): convert the HF model with "
                                "tools/convert_hf_to_megatron.py first")
    return f"step_{step:08d}"


def guidance_layout(cfg: Config) -> str:
    """``train.guidance_layout`` resolved: shared_prefix where the attention applies a dense mask (not with TE)."""
    from megatron_topd.models import shared_prefix
    from megatron_topd.models.precision import use_transformer_engine

    if cfg.train.guidance_layout == "auto":
        return "rows" if use_transformer_engine() else "shared_prefix"
    if cfg.train.guidance_layout == "shared_prefix":
        shared_prefix.check_supported()
    return cfg.train.guidance_layout


def build_models(cfg: Config):
    """The student (DDP + optimizer) and the co-located teacher (frozen, same TP/PP layout, forward-only, its own
    precision); with a remote teacher no teacher model is built (the teacher is None until its servers are known)."""
    student_spec = _spec(cfg.student, cfg.train.student_checkpoint, "student")
    overrides = cfg.parallel.model_overrides()
    student = [wrap_ddp(build_gpt_model(student_spec, precision=cfg.precision, **overrides),
                        use_distributed_optimizer=cfg.optim.use_distributed_optimizer)]
    optimizer, scheduler = build_optimizer(student, cfg.optim, params_dtype=cfg.precision.torch_dtype,
                                           total_steps=cfg.train.steps)
    if cfg.teacher.placement == "remote":
        return student_spec, student, optimizer, scheduler, None
    teacher_spec = _spec(cfg.teacher_spec, cfg.teacher.checkpoint, "teacher")
    if student_spec.vocab_size != teacher_spec.vocab_size:
        raise ValueError(f"student vocab_size {student_spec.vocab_size} != teacher vocab_size {teacher_spec.vocab_size}: "
                         "on-policy distillation scores the student's tokens with the teacher, so both need one tokenizer")
    teacher_overrides = {k: v for k, v in overrides.items() if not k.startswith("recompute")}  # no backward: no recompute
    precision = cfg.teacher.precision or replace(cfg.precision, fp8=None)  # FP8 only when asked for explicitly
    teacher_model = build_gpt_model(teacher_spec, precision=precision, **teacher_overrides)
    load_model_weights(Path(cfg.teacher.checkpoint) / _ckpt_step_dir(cfg.teacher.checkpoint), [teacher_model])
    return student_spec, student, optimizer, scheduler, ColocatedTeacher([teacher_model])


def planned_peak_gb(cfg: Config, student_spec: ModelSpec, layout) -> float:
    """The planner's allocated-memory prediction for this rank's pipeline stage (megatron_topd.plan), logged each step
    beside the measured peak so a drifting memory model shows up in the run's own metrics."""
    from megatron_topd.plan import predict_memory

    teacher_spec = None if cfg.teacher.placement == "remote" else _spec(cfg.teacher_spec, cfg.teacher.checkpoint, "teacher")
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else 2**40
    plan = predict_memory(cfg, student_spec, teacher_spec, gpu_mem_gb=total / 1e9, data_parallel=layout.data_parallel)
    return plan.stages[layout.pp_rank].allocated / 2**30


def load_tokenizer(cfg: Config):
    """The student's tokenizer and pad id. With `teacher.hf_path`, the teacher's tokenizer is compared with it first
    (`teacher.tokenizer`: auto | same | cross): ``same`` on vocabularies that differ is refused, and a ``cross``
    teacher must be one the loop can use (remote, `teacher.kl=sampled`, `eval.teacher=false`)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.train.student_hf_path)
    if cfg.teacher.hf_path:
        teacher_tokenizer_mode(cfg, tokenizer, AutoTokenizer.from_pretrained(cfg.teacher.hf_path), cfg.teacher.hf_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def teacher_tokenizer_mode(cfg: Config, student_tokenizer, teacher_tokenizer, where: str) -> str:
    """`teacher.tokenizer` resolved against the two tokenizers (topd/cross_tokenizer.py `resolve_tokenizer_mode`):
    ``same`` or ``cross``; a ``cross`` teacher is checked against what runs across tokenizers (config.py)."""
    from megatron_topd.config import check_cross_tokenizer, check_cross_tokenizer_eval
    from megatron_topd.topd.cross_tokenizer import resolve_tokenizer_mode, tokenizer_relation

    try:
        mode = resolve_tokenizer_mode(cfg.teacher.tokenizer, student_tokenizer, teacher_tokenizer)
    except ValueError as exc:
        raise ValueError(f"the teacher's tokenizer ({where}) vs the student's ({cfg.train.student_hf_path}): {exc}") from None
    if mode == "cross" and cfg.teacher.tokenizer != "cross":  # detected (auto): the config was not checked for it
        reason = tokenizer_relation(student_tokenizer, teacher_tokenizer).reason
        why = (f"a teacher whose tokenizer ({where}) differs from the student's ({cfg.train.student_hf_path}: "
               f"{reason}; teacher.tokenizer=auto detected cross)")
        check_cross_tokenizer(cfg.teacher.placement, cfg.teacher.kl, why)
        check_cross_tokenizer_eval(cfg.eval.enabled and cfg.eval.teacher, why)
    return mode


def prompt_dataset(cfg: Config, tokenizer):
    """Prompts that leave room for a full response (and a guidance window) within train.max_seq_length, every one
    checked before any model is built (train.prompt_overflow). Rank 0 measures them first (and caches the lengths
    beside the file); a prompt error reaches every rank at once instead of leaving them in a collective."""
    from megatron_topd.rollout.prompts import PromptDataset

    room = cfg.train.max_seq_length - cfg.rollout.max_new_tokens - (cfg.topd.window if cfg.topd.variant == "topd" else 0)

    def make():
        return PromptDataset(cfg.train.prompts_path, tokenizer, n_samples=cfg.rollout.n_samples, seed=cfg.train.seed,
                             chat_template=bool(getattr(tokenizer, "chat_template", None)), max_prompt_tokens=room,
                             overflow=cfg.train.prompt_overflow)

    dataset = parallel.on_rank0(make, errors=(ValueError, OSError))  # rank 0's, or None
    if dist.get_rank() != 0:  # the lengths are cached now: the other ranks read them
        dataset = make()
    if dist.get_rank() == 0 and dataset.skipped:
        print(f"train.prompt_overflow=skip: {len(dataset.skipped)} of {len(dataset)} prompts are longer than {room} "
              f"tokens and are left out (first rows: {dataset.skipped[:5]})", flush=True)
    return dataset


def resume(cfg: Config, ckpt_root: Path, student, optimizer, scheduler, dataset) -> int:
    """The step to start from: the latest checkpoint of this run, else the converted student at step 0."""
    if latest_step(ckpt_root) is not None:
        info = load_checkpoint(ckpt_root, student, optimizer, scheduler)
        dataset.load_state_dict(info["extra"]["dataset"])
        return info["step"]
    load_model_weights(Path(cfg.train.student_checkpoint) / _ckpt_step_dir(cfg.train.student_checkpoint), student)
    return 0


def held_out_eval(cfg: Config, tokenizer):
    """The held-out problems (eval.heldout_path) for rank 0 to decode, or None when the run has none."""
    from megatron_topd.train.evaluation import HeldOutEval

    if not cfg.eval.enabled:
        return None
    return HeldOutEval(cfg.eval, tokenizer, chat_template=bool(getattr(tokenizer, "chat_template", None)),
                       max_new_tokens=cfg.rollout.max_new_tokens)


class LaunchedServers:
    """Rank 0's SGLang side: student servers (rollouts, student windows) and the teacher's server (teacher windows)."""

    def __init__(self, cfg: Config):
        from megatron_topd.rollout import ServerGroup

        from megatron_topd.rollout.config import student_server_flags

        flags = student_server_flags(cfg.rollout, cfg.train.async_rollouts)  # windows ahead of async rollouts
        self.student_cfg = replace(cfg.rollout, extra_server_args=flags + list(cfg.rollout.extra_server_args))
        self.teacher_cfg = replace(copy.deepcopy(cfg.rollout), model_path=cfg.teacher.hf_path, num_servers=1, ports=[],
                                   urls=[], context_length=teacher_context_length(cfg))
        self.student = ServerGroup.from_config(self.student_cfg) if not cfg.rollout.urls else None
        self.teacher_urls = list(cfg.teacher.urls)  # set (e.g. by a Slurm role split): launch no teacher server
        self.teacher = ServerGroup.from_config(self.teacher_cfg) if not self.teacher_urls else None

    def start(self) -> tuple[list[str], list[str]]:
        """Spawn every server at once and wait for all (start-ups overlap); returns (student urls, teacher urls)."""
        from megatron_topd.rollout import ServerGroup

        own = [s for group in (self.student, self.teacher) if group is not None for s in group.servers]
        self.all = ServerGroup(own).start()
        student_urls = self.student.urls if self.student is not None else list(self.student_cfg.urls)
        return student_urls, self.teacher.urls if self.teacher is not None else self.teacher_urls

    def stop(self) -> None:
        if getattr(self, "all", None) is not None:
            self.all.stop()


def connect_servers(cfg: Config, servers: "LaunchedServers | None", vocab: int):
    """Rank 0 starts (or finds) the servers; every rank gets clients for the student and the teacher."""
    from megatron_topd.rollout import SGLangClient

    student_urls, teacher_urls = parallel.broadcast_object(servers.start() if servers is not None else None)

    from megatron_topd.rollout.client import WINDOW_PRIORITY
    from megatron_topd.rollout.config import windows_ahead

    def client(urls, window_priority=None, kind=SGLangClient, context_length=cfg.rollout.context_length, **extra):
        r = cfg.rollout
        return kind(urls, vocab_size=vocab, context_length=context_length,
                    request_timeout_s=r.request_timeout_s, connect_timeout_s=r.connect_timeout_s,
                    max_retries=r.max_retries, retry_backoff_s=r.retry_backoff_s,
                    max_inflight_per_server=r.max_inflight_per_server, progress=False,
                    window_priority=window_priority, **extra)

    # async rollouts: the probe's windows go ahead of the next step's queued rollouts (rollout.windows_first)
    ahead = WINDOW_PRIORITY if windows_ahead(cfg.rollout, cfg.train.async_rollouts) else None
    t = cfg.teacher
    if t.api == "openai":  # scores from /v1/completions (config.py check_openai_teacher: OPD only)
        from megatron_topd.rollout.openai_client import OpenAICompletionsClient

        teacher = client(teacher_urls, kind=OpenAICompletionsClient, model=t.api_model, max_top_k=t.api_max_top_k,
                         api_key_env=t.api_key_env, context_length=teacher_context_length(cfg))
    else:
        teacher = client(teacher_urls, context_length=teacher_context_length(cfg))
    return client(student_urls, ahead), teacher, student_urls


def teacher_context_length(cfg: Config) -> int | None:
    """The teacher server's context length: `teacher.context_length`, else the rollouts' (`rollout.context_length`)."""
    return cfg.teacher.context_length if cfg.teacher.context_length is not None else cfg.rollout.context_length


def remote_teacher(cfg: Config, client, tokenizer, vocab: int) -> RemoteTeacher:
    """The remote teacher behind `teacher.urls` (or the server rank 0 launched), after comparing its tokenizer with
    the student's (`teacher.tokenizer`): the same vocabulary gives a `RemoteTeacher` scoring the student's ids; another
    one a `CrossTokenizerTeacher` (its tokenizer from `teacher.hf_path`, else the server's `tokenizer_path`) that
    scores its own tokenization of each response (on rank 0, which alone scores; other ranks get the mode, and for
    TOPD the teacher's tokenizer and vocabulary rows too: every rank moves the probe's candidates to span starts, and
    each data-parallel replica's first rank asks the teacher's server for its rows' windows)."""
    from transformers import AutoTokenizer

    from megatron_topd.rollout.weight_sync.admin import call
    from megatron_topd.train.teacher import CrossTokenizerTeacher

    if cfg.teacher.kl == "topk" and cfg.teacher.top_k > vocab:
        raise ValueError(f"teacher.top_k={cfg.teacher.top_k} > the vocabulary ({vocab} tokens): use at most {vocab}")
    # Rank 0 reads the servers and the teacher's tokenizer (it alone scores); the mode and any error reach every rank.
    def read_teacher():
        found = _teacher_tokenizer_path(cfg, client, call)  # (tokenizer folder, model folder) or None
        if found is not None:
            teacher_tok = AutoTokenizer.from_pretrained(found[0])
            return teacher_tokenizer_mode(cfg, tokenizer, teacher_tok, found[0]), found, teacher_tok
        if cfg.teacher.tokenizer == "cross":
            raise ValueError("teacher.tokenizer=cross needs the teacher's tokenizer on this machine: set "
                             "teacher.hf_path to the teacher's HF folder (its tokenizer files are enough)")
        return "same", None, None

    mode, found, teacher_tok = parallel.on_rank0(read_teacher, errors=(ConnectionError, ValueError)) or (
        None, None, None)
    mode = parallel.broadcast_object(mode)
    signal = dict(temperature=cfg.teacher.scoring_temperature(cfg.rollout.temperature),
                  deadline_s=cfg.teacher.deadline_s)
    if mode == "same":
        return RemoteTeacher(client, kl=cfg.teacher.kl, top_k=cfg.teacher.top_k, **signal)
    rows = (_model_rows(found[1]) or len(teacher_tok)) if found is not None else None  # rank 0
    if cfg.topd.variant != "opd":  # the probe: every rank places candidates, each replica's first rank asks
        found, rows = parallel.broadcast_object((found, rows))
        if teacher_tok is None:
            teacher_tok = AutoTokenizer.from_pretrained(found[0])
    scoring = client
    if rows is not None:  # the teacher's ids (scored, or continued in windows) are range-checked against its rows
        scoring = copy.copy(client)
        scoring.vocab_size = rows
    return CrossTokenizerTeacher(scoring, student_tokenizer=tokenizer, teacher_tokenizer=teacher_tok,
                                 top_k=cfg.teacher.top_k, **signal)


def _teacher_tokenizer_path(cfg: Config, client, call) -> tuple[str, str] | None:
    """Every teacher URL answers /model_info; (tokenizer folder, model folder) of the teacher when readable here:
    `teacher.hf_path` first, else the first server's `tokenizer_path`. A server whose tokenizer differs from
    `teacher.hf_path`'s is refused (the scores would be of other tokens than the ones aligned)."""
    from transformers import AutoTokenizer

    def readable(path: Path) -> bool:
        return (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()

    found = (cfg.teacher.hf_path, cfg.teacher.hf_path) if cfg.teacher.hf_path else None
    if cfg.teacher.api == "openai":  # no /model_info there: the tokenizer is teacher.hf_path's, or the student's
        return found
    reference = AutoTokenizer.from_pretrained(cfg.teacher.hf_path).get_vocab() if found else None
    for url in client.urls:
        try:
            info = call(url, "/model_info", method="GET", timeout_s=cfg.rollout.connect_timeout_s + 20)
        except Exception as exc:
            raise ConnectionError(f"remote teacher {url} did not answer /model_info: {exc}; check teacher.urls "
                                  "and that the server is up") from None
        path = Path(str(info.get("tokenizer_path") or ""))
        if not readable(path):
            continue
        served = AutoTokenizer.from_pretrained(str(path)).get_vocab()
        if reference is None:
            found, reference = (str(path), str(info.get("model_path") or path)), served
        elif served != reference:
            raise ValueError(f"the remote teacher at {url} serves the tokenizer of {path}, which differs from "
                             f"{found[0]}'s: point teacher.hf_path and teacher.urls at one teacher")
    return found


def _model_rows(model_dir: str) -> int | None:
    """The model's vocabulary rows from its config.json, when readable here."""
    import json

    path = Path(model_dir) / "config.json"
    try:
        return int(json.loads(path.read_text())["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
