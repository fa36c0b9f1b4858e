"""The TOPD training loop, top to bottom (DESIGN section 3); each phase of a step is one function below:

    generate_rollouts (SGLang student servers) -> replica_rows (this data-parallel replica's share)
    -> score_replica (teacher + student forward, per-token l_t only; skipped for plain OPD)
    -> probe_replica (candidates, near-future windows from the SGLang servers, OT divergence, weights, guidance rows)
    -> train_on_replica (teacher + student over groups of microbatches, TOPD loss, backward, guarded optimizer step)
    -> weight sync to the student servers -> held-out accuracy (every eval.interval steps) -> step_metrics, checkpoint

Memory (docs/training_step.md): nothing of size [rows, S, V/TP] outlives `train.teacher_group_microbatches`
microbatches; what crosses phases is token ids and per-token scalars.

Every rank runs this function (torchrun / srun / the test harness). Global rank 0 owns the SGLang servers; the first
TP rank of each data-parallel replica's first pipeline stage asks them for near-future windows.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_topd import parallel
from megatron_topd.checkpointing import latest_step, load_checkpoint, load_model_weights, save_checkpoint, unwrap
from megatron_topd.config import Config, load_config, save_config
from megatron_topd.models import ModelSpec, build_gpt_model, padded_vocab_size
from megatron_topd.train.batches import (RolloutRows, guidance_microbatches, padding_fraction, rollout_microbatches,
                                         windows_per_row)
from megatron_topd.train.dealing import deal_rows, to_last_stage
from megatron_topd.train.distill_step import distill_step
from megatron_topd.train.guard import NonFiniteError, agree_on_nonfinite
from megatron_topd.train.metrics import MetricsLogger
from megatron_topd.train.objective import ObjectiveScales
from megatron_topd.train import preemption
from megatron_topd.train.optim import build_optimizer, wrap_ddp
from megatron_topd.train.scoring import score_rollouts
from megatron_topd.train.teacher import ColocatedTeacher, RemoteTeacher


def _spec(explicit: ModelSpec | None, checkpoint: str, who: str) -> ModelSpec:
    if explicit is not None:
        return explicit
    path = Path(checkpoint) / "model_spec.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{who}: no model spec given and {path} does not exist; set the spec in the config "
                                "or point the checkpoint at a tools/convert_hf_to_megatron.py output")
    return ModelSpec.load_yaml(path)


def _broadcast(obj, src: int = 0, group=None):
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class Rollouts:
    """Rank 0's SGLang side: student servers (rollouts, student windows) and the teacher's server (teacher windows)."""

    def __init__(self, cfg: Config):
        from megatron_topd.rollout import ServerGroup

        from megatron_topd.rollout.config import student_server_flags

        flags = student_server_flags(cfg.rollout, cfg.train.async_rollouts)  # windows ahead of async rollouts
        self.student_cfg = replace(cfg.rollout, extra_server_args=flags + list(cfg.rollout.extra_server_args))
        self.teacher_cfg = replace(copy.deepcopy(cfg.rollout), model_path=cfg.teacher.hf_path, num_servers=1, ports=[],
                                   urls=[])
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


@dataclass
class StepBatch:
    """One step's rollouts, identical on every rank (token ids and per-token log-probs: no V dimension), except
    `teacher`: a remote teacher's per-row top-k stays on rank 0 (`has_teacher_scores` says it exists) until
    `replica_rows` sends each replica's rows to its last stage."""

    prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    response_logprobs: list[list[float]]
    finish_reasons: list[str]
    weight_versions: list[str]
    dataset_state: dict
    teacher: list[dict] | None = None  # a remote teacher's scores per row (RemoteTeacher.score_rollouts); rank 0
    staleness: float = 0.0  # trainer step - oldest weight version of the samples (async rollouts: 1)
    has_teacher_scores: bool = False  # `teacher` exists (on rank 0)
    servers: list[str] | None = None  # the student server that generated each sample (its radix cache holds the row)


def train(cfg: Config) -> list[dict]:
    """Run `cfg.train.steps` TOPD steps; returns the per-step metrics (on every rank)."""
    from megatron_topd.convert import export_hf_weights
    from megatron_topd.rollout.weight_sync import make_weight_sync

    cfg.validate()
    cfg.parallel.check_machine()
    guidance_layout(cfg)  # shared_prefix asked for with TE layers: refused before anything starts
    layout = parallel.initialize(cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel,
                                 backend=cfg.parallel.backend, seed=cfg.train.seed,
                                 timeout_s=cfg.parallel.timeout_minutes * 60,
                                 context_parallel=cfg.parallel.context_parallel)
    rank0 = dist.get_rank() == 0
    out = Path(cfg.train.output_dir)
    ckpt_root = out / "checkpoints"
    if rank0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    student_spec, student, optimizer, scheduler, teacher = build_models(cfg)
    planned_gb = planned_peak_gb(cfg, student_spec, layout)
    vocab = student_spec.vocab_size
    tokenizer, pad_id = load_tokenizer(cfg)
    dataset = prompt_dataset(cfg, tokenizer)
    start_step = resume(cfg, ckpt_root, student, optimizer, scheduler, dataset)

    heldout = held_out_eval(cfg, tokenizer) if rank0 else None  # rank 0 decodes; every rank takes part in the broadcast
    rollouts = Rollouts(cfg) if rank0 else None
    try:
        student_client, teacher_client, student_urls = connect_servers(cfg, rollouts, vocab)
        teacher = teacher or remote_teacher(cfg, teacher_client, tokenizer, vocab)
        weight_sync = make_weight_sync(replace(cfg.rollout, model_path=cfg.train.student_hf_path), student_urls)
        # Servers we launched start from the student's HF weights; a resumed student, or servers we were pointed at
        # (a fleet that may hold any weights, e.g. a previous run's), are brought to this student first.
        if start_step > 0 or cfg.rollout.urls:
            weight_sync.sync(export_hf_weights(student[0], student_spec), version=str(start_step))
        logger = MetricsLogger(out, enabled=rank0, total_steps=cfg.train.steps, start_step=start_step,
                               wandb_project=cfg.train.wandb_project, config=cfg)
        if cfg.eval.enabled and start_step == 0:                                               # 0. baseline
            logger.log(0, evaluate_heldout(heldout, student_client, teacher_client if cfg.eval.teacher else None))
        from megatron_topd.rollout.async_rollouts import make_rollout_source

        rollout_source = make_rollout_source(cfg, dataset, student_client, out, vocab, rank0,  # train.async_rollouts
                                             scorer=teacher.rollout_scorer)
        history = []
        for step in range(start_step, cfg.train.steps):
            t0 = time.perf_counter()
            timings: dict[str, float] = {}

            batch = generate_rollouts(rollout_source, step)                                        # 1. rollouts
            timings["generation_s"] = time.perf_counter() - t0
            rows = replica_rows(batch, layout)                                                    # 2. DP share
            t = time.perf_counter()
            scores = score_replica(cfg, student, teacher, rows, pad_id, vocab, layout)            # 3. scoring
            timings["scoring_s"] = time.perf_counter() - t
            probe = probe_replica(cfg, step, rows, scores, student, teacher, teacher_client,    # 4-6. probe
                                  student_client, pad_id, vocab, layout, timings)
            t = time.perf_counter()
            result, pass_stats = train_on_replica(cfg, student, optimizer, scheduler, teacher, rows, probe,  # 7.
                                                  pad_id, vocab, layout)
            timings["train_s"] = time.perf_counter() - t
            timings["rollout_wait_s"] = rollout_source.settle()  # async: the prefetch ends on the old weights
            t = time.perf_counter()
            sync_stats = None                                                                     # 8. weight sync
            if not result.skipped:  # a skipped step changed no weight: the servers already hold them
                sync_stats = weight_sync.sync(export_hf_weights(student[0], student_spec), version=str(step + 1))
            timings["sync_s"] = time.perf_counter() - t

            if cfg.eval.due(step + 1, cfg.train.steps):                                           # 9. held-out
                t = time.perf_counter()
                timings.update(evaluate_heldout(heldout, student_client), eval_s=time.perf_counter() - t)
            metrics = step_metrics(result, pass_stats, batch, probe, timings, time.perf_counter() - t0)  # 10.
            metrics["planned_peak_gb"] = planned_gb
            if sync_stats is not None:
                metrics["sync_mb"] = sync_stats.num_bytes / 2**20
            history.append(metrics)
            logger.log(step + 1, metrics)
            saved = (step + 1) % cfg.train.save_interval == 0 or step + 1 == cfg.train.steps
            if saved:
                save_checkpoint(ckpt_root, step + 1, student, optimizer, scheduler,
                                extra={"dataset": batch.dataset_state})
            if step + 1 < cfg.train.steps and preemption.stop_requested():  # a collective: all ranks agree
                if not saved:  # stop here with a checkpoint; the requeued job resumes from it
                    preemption.mark_temporary(save_checkpoint(ckpt_root, step + 1, student, optimizer, scheduler,
                                                              extra={"dataset": batch.dataset_state}))
                break
        logger.close()
        weight_sync.close()
        return history
    finally:
        if rollouts is not None:
            rollouts.stop()


# ---- set-up -----------------------------------------------------------------------------------------------------
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


def remote_teacher(cfg: Config, client, tokenizer, vocab: int) -> RemoteTeacher:
    """The remote teacher behind `teacher.urls` (or the server rank 0 launched), after checking it speaks the
    student's vocabulary: a teacher with another tokenizer would score different strings."""
    from megatron_topd.rollout.weight_sync.admin import call

    if cfg.teacher.kl == "topk" and cfg.teacher.top_k > vocab:
        raise ValueError(f"teacher.top_k={cfg.teacher.top_k} > the vocabulary ({vocab} tokens): use at most {vocab}")
    if dist.get_rank() == 0:
        for url in client.urls:
            try:
                info = call(url, "/model_info", method="GET", timeout_s=cfg.rollout.connect_timeout_s + 20)
            except Exception as exc:
                raise ConnectionError(f"remote teacher {url} did not answer /model_info: {exc}; check teacher.urls "
                                      "and that the server is up") from None
            path = Path(str(info.get("tokenizer_path") or ""))
            if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
                from transformers import AutoTokenizer

                if AutoTokenizer.from_pretrained(str(path)).get_vocab() != tokenizer.get_vocab():
                    raise ValueError(f"the remote teacher at {url} serves the tokenizer of {path}, which differs from "
                                     f"the student's ({cfg.train.student_hf_path}): distil within one tokenizer family")
    return RemoteTeacher(client, kl=cfg.teacher.kl, top_k=cfg.teacher.top_k)


def load_tokenizer(cfg: Config):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.train.student_hf_path)
    if cfg.teacher.hf_path and AutoTokenizer.from_pretrained(cfg.teacher.hf_path).get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"the teacher's tokenizer ({cfg.teacher.hf_path}) differs from the student's "
                         f"({cfg.train.student_hf_path}): token ids would mean different strings; distil between "
                         "models of one tokenizer family")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return tokenizer, pad_id


def held_out_eval(cfg: Config, tokenizer):
    """The held-out problems (eval.heldout_path) for rank 0 to decode, or None when the run has none."""
    from megatron_topd.train.evaluation import HeldOutEval

    if not cfg.eval.enabled:
        return None
    return HeldOutEval(cfg.eval, tokenizer, chat_template=bool(getattr(tokenizer, "chat_template", None)),
                       max_new_tokens=cfg.rollout.max_new_tokens)


def prompt_dataset(cfg: Config, tokenizer):
    """Prompts that leave room for a full response (and a guidance window) within train.max_seq_length."""
    from megatron_topd.rollout.prompts import PromptDataset

    room = cfg.train.max_seq_length - cfg.rollout.max_new_tokens - (cfg.topd.window if cfg.topd.variant == "topd" else 0)
    return PromptDataset(cfg.train.prompts_path, tokenizer, n_samples=cfg.rollout.n_samples, seed=cfg.train.seed,
                         chat_template=bool(getattr(tokenizer, "chat_template", None)), max_prompt_tokens=room)


def resume(cfg: Config, ckpt_root: Path, student, optimizer, scheduler, dataset) -> int:
    """The step to start from: the latest checkpoint of this run, else the converted student at step 0."""
    if latest_step(ckpt_root) is not None:
        info = load_checkpoint(ckpt_root, student, optimizer, scheduler)
        dataset.load_state_dict(info["extra"]["dataset"])
        return info["step"]
    load_model_weights(Path(cfg.train.student_checkpoint) / _ckpt_step_dir(cfg.train.student_checkpoint), student)
    return 0


def connect_servers(cfg: Config, rollouts: "Rollouts | None", vocab: int):
    """Rank 0 starts (or finds) the servers; every rank gets clients for the student and the teacher."""
    from megatron_topd.rollout import SGLangClient

    student_urls, teacher_urls = _broadcast(rollouts.start() if rollouts is not None else None)

    from megatron_topd.rollout.client import WINDOW_PRIORITY
    from megatron_topd.rollout.config import windows_ahead

    def client(urls, window_priority=None):
        r = cfg.rollout
        return SGLangClient(urls, vocab_size=vocab, context_length=r.context_length,
                            request_timeout_s=r.request_timeout_s, connect_timeout_s=r.connect_timeout_s,
                            max_retries=r.max_retries, retry_backoff_s=r.retry_backoff_s,
                            max_inflight_per_server=r.max_inflight_per_server, progress=False,
                            window_priority=window_priority)

    # async rollouts: the probe's windows go ahead of the next step's queued rollouts (rollout.windows_first)
    ahead = WINDOW_PRIORITY if windows_ahead(cfg.rollout, cfg.train.async_rollouts) else None
    return client(student_urls, ahead), client(teacher_urls), student_urls


# ---- the phases of a step ---------------------------------------------------------------------------------------
def generate_rollouts(source, step: int) -> StepBatch:
    """Step `step`'s `prompts_per_step x n_samples` responses on every rank, from the rollout source
    (rollout/async_rollouts.py): sampled now by rank 0 (sync), or prefetched while the previous step trained (async)."""
    return source.next(step)


def replica_rows(batch: StepBatch, layout) -> RolloutRows:
    """This data-parallel replica's rollouts: rows dealt longest-first to the replica with the fewest tokens. A
    remote teacher's scores (on rank 0 only) go to the replica's last pipeline stage alone (train/dealing.py)."""
    replicas = deal_rows([len(p) + len(r) for p, r in zip(batch.prompt_ids, batch.response_ids)],
                         layout.data_parallel)
    mine = replicas[layout.dp_rank]
    if not mine:
        raise ValueError(f"{len(batch.prompt_ids)} rollouts leave data-parallel replica {layout.dp_rank} empty: "
                         "make train.prompts_per_step * rollout.n_samples at least the data-parallel size")
    teacher = to_last_stage(batch.teacher, replicas, layout) if batch.has_teacher_scores else None
    return RolloutRows([batch.prompt_ids[i] for i in mine], [batch.response_ids[i] for i in mine],
                       [batch.response_logprobs[i] for i in mine], teacher,
                       servers=None if batch.servers is None else [batch.servers[i] for i in mine])


def _pad_multiple(cfg: Config) -> int:
    """Microbatch lengths round up to this: 8, and a multiple of TP under sequence parallelism."""
    return math.lcm(8, cfg.parallel.tensor_parallel if cfg.parallel.sequence_parallel else 1)


def score_replica(cfg: Config, student, teacher, rows: RolloutRows, pad_id: int, vocab: int, layout):
    """Per-token l_t (and log-probs, entropy) of this replica's rows on every pipeline stage; None for plain OPD,
    whose training pass needs no candidates (it computes the same scalars itself)."""
    from megatron.core import parallel_state as ps

    if cfg.topd.variant == "opd":
        return None
    width = max(rows.lengths())
    batches = rollout_microbatches(rows, cfg.train.max_tokens_per_microbatch, pad_id, multiple=_pad_multiple(cfg))
    scores = score_rollouts(student, teacher, batches, rows=len(rows), width=width,
                            group_size=cfg.train.teacher_group_microbatches, vocab_size=vocab,
                            chunk_size=cfg.train.loss_chunk_size)
    token_loss = torch.zeros(len(rows), width, dtype=torch.float32, device=parallel.device())
    if scores is not None:
        token_loss.copy_(scores["token_loss"])
    bad = agree_on_nonfinite(not bool(torch.isfinite(token_loss).all()))
    if bad:  # candidates cannot be ranked by NaN: the same decision on every rank, before anyone waits on a probe
        raise NonFiniteError(f"non-finite per-token KL in the scoring pass on rank(s) {bad}: the student or teacher "
                             "produced NaN/Inf logits; check the checkpoints and the learning rate")
    if layout.pipeline_parallel > 1:
        dist.broadcast(token_loss, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return token_loss.cpu()


def probe_replica(cfg: Config, step: int, rows: RolloutRows, token_loss, student, teacher, teacher_client,
                  student_client, pad_id: int, vocab: int, layout, timings: dict) -> dict:
    """Candidates -> near-future windows -> OT -> weights (+ guidance rows), on the first stage, shared over PP.

    The payload is per-token weights [rows, S] and guidance token rows (ids): no V dimension."""
    from megatron.core import parallel_state as ps

    from megatron_topd.topd import embedding_lookup, run_probe

    tokens, response_mask = rows.padded(pad_id)
    payload = None
    if cfg.topd.variant == "opd":
        payload = {"token_weights": torch.ones(tokens.shape), "guidance": None, "n_candidates": 0, "n_divergent": 0,
                   "ot_sum": 0.0, "ot_stats": {}, "timings": {}}
    elif layout.is_first_stage:
        # topd.embedding_source (auto: the co-located teacher's frozen table, else the student's)
        table_owner = student[0] if cfg.topd.embedding_table(cfg.teacher.placement) == "student" else teacher.chunks[0]
        word = unwrap(table_owner).embedding.word_embeddings
        probe_tp_rank0 = ps.get_tensor_model_parallel_rank() == 0
        probe = run_probe(
            tokens, token_loss, response_mask, cfg.topd,
            teacher=teacher_client if probe_tp_rank0 else None,
            student=student_client if probe_tp_rank0 else None,
            embed=embedding_lookup(word.weight.detach(), group=parallel.tensor_parallel_group(),
                                   vocab_start=word.vocab_start_index,
                                   vocab_size=padded_vocab_size(vocab, layout.tensor_parallel)),
            pad_id=pad_id, seed=cfg.train.seed * 7919 + step, group=parallel.tensor_parallel_group(),
            dp_group=ps.get_data_parallel_group(),  # suppression decided over the whole batch
            student_servers=rows.servers,  # each row's windows go to the server whose cache holds the row
        )
        payload = _probe_payload(probe)
        g = payload["guidance"]
        if isinstance(teacher, RemoteTeacher) and g is not None and g["tokens"].shape[0] > 0:
            # a remote teacher's top-k along its windows (TP rank 0 asks; a co-located one has logits instead)
            scores = [teacher.score_guidance(g["tokens"], g["lengths"], g["window_start"]) if probe_tp_rank0 else None]
            if layout.tensor_parallel > 1:
                dist.broadcast_object_list(scores, src=dist.get_global_rank(parallel.tensor_parallel_group(), 0),
                                           group=parallel.tensor_parallel_group())
            g["teacher"] = scores[0]
    if cfg.topd.variant != "opd":
        payload = _broadcast(payload, src=ps.get_pipeline_model_parallel_first_rank(),
                             group=ps.get_pipeline_model_parallel_group())
    timings.update({"window_s": 0.0, "ot_s": 0.0, **payload["timings"]})
    return payload


def guidance_layout(cfg: Config) -> str:
    """``train.guidance_layout`` resolved: shared_prefix where the attention applies a dense mask (not with TE)."""
    from megatron_topd.models import shared_prefix
    from megatron_topd.models.build import use_transformer_engine

    if cfg.train.guidance_layout == "auto":
        return "rows" if use_transformer_engine() else "shared_prefix"
    if cfg.train.guidance_layout == "shared_prefix":
        shared_prefix.check_supported()
    return cfg.train.guidance_layout


def train_on_replica(cfg: Config, student, optimizer, scheduler, teacher, rows: RolloutRows, probe: dict,
                     pad_id: int, vocab: int, layout):
    """The training pass over this replica's rollout and guidance microbatches, then one optimizer step."""
    from megatron.core import parallel_state as ps

    multiple, budget = _pad_multiple(cfg), cfg.train.max_tokens_per_microbatch
    guidance = probe["guidance"]
    n_windows = 0 if guidance is None else guidance["tokens"].shape[0]
    windows, as_rows = None, list(range(n_windows))
    if n_windows and guidance_layout(cfg) == "shared_prefix":
        windows, as_rows = windows_per_row(guidance, rows, budget, multiple)
    batches = rollout_microbatches(rows, budget, pad_id, multiple=multiple, token_weights=probe["token_weights"],
                                   guidance=guidance, windows=windows)
    if as_rows:
        keep = torch.tensor(as_rows)
        teacher_scores = guidance.get("teacher")
        batches += guidance_microbatches(guidance["tokens"][keep], guidance["lengths"][keep],
                                         guidance["logit_weights"][keep], budget, pad_id, multiple=multiple,
                                         teacher=None if teacher_scores is None else [teacher_scores[w] for w in as_rows],
                                         window_start=guidance["window_start"][keep])
    real, padded = padding_fraction(batches)
    n_tokens = sum(len(r) for r in rows.responses)
    counts = torch.tensor([n_tokens, n_windows, real, padded], dtype=torch.float64, device=parallel.device())
    dist.all_reduce(counts, group=ps.get_data_parallel_group())
    n_tokens, n_windows, real, padded = (int(x) for x in counts.cpu().tolist())
    scales = ObjectiveScales(dp_size=layout.data_parallel, global_tokens=n_tokens, global_windows=n_windows,
                             lambda_traj=cfg.topd.lambda_traj if cfg.topd.variant == "topd" else 0.0,
                             variant=cfg.topd.variant,
                             rollout_is_cap=cfg.train.rollout_is_cap if cfg.train.rollout_is_correction else None)
    result = distill_step(student, optimizer, scheduler, teacher, batches, scales,
                          group_size=cfg.train.teacher_group_microbatches, vocab_size=vocab,
                          chunk_size=cfg.train.loss_chunk_size, on_nonfinite=cfg.train.on_nonfinite)
    return result, {"response_tokens": n_tokens, "guidance_windows": n_windows, "train_tokens": real,
                    "padding_fraction": 1.0 - real / max(padded, 1)}


def evaluate_heldout(heldout, student_client, teacher_client=None) -> dict:
    """Held-out accuracy by greedy decoding on the servers (the student's hold this step's weights after the sync);
    rank 0 asks (it alone holds `heldout`), every rank gets the same numbers."""
    out = None
    if heldout is not None:
        out = {"heldout_accuracy": heldout.accuracy(student_client)}
        if teacher_client is not None:
            out["teacher_heldout_accuracy"] = heldout.accuracy(teacher_client)
    return _broadcast(out)


def step_metrics(result, pass_stats: dict, batch: StepBatch, probe: dict, timings: dict, step_s: float) -> dict:
    """Everything a step logs (the same on every rank): objective, per-token statistics, rollout shape, speed."""
    s = result.metrics
    tokens = max(s.get("tokens", 0.0), 1.0)
    lengths = [len(r) for r in batch.response_ids]
    versions = batch.weight_versions
    return {
        "loss": result.loss, "opd_loss": s["opd_loss"], "traj_loss": s["traj_loss"], "grad_norm": result.grad_norm,
        "lr": result.lr, "skipped": float(result.skipped),
        "mean_token_kl": s["kl_sum"] / tokens, "student_entropy": s["entropy_sum"] / tokens,
        "logprob_diff_mean": s["logprob_diff_sum"] / max(s["logprob_diff_count"], 1.0),
        "logprob_diff_max": s["logprob_diff_max"],
        "response_len_mean": sum(lengths) / len(lengths), "response_len_max": float(max(lengths)),
        "truncation_rate": sum(f == "length" for f in batch.finish_reasons) / len(lengths),
        **pass_stats, **_probe_metrics(probe), **timings, "step_s": step_s,
        "train_tokens_per_s": pass_stats["train_tokens"] / max(timings["train_s"], 1e-9),
        "response_tokens_per_s": pass_stats["response_tokens"] / max(step_s, 1e-9),
        "peak_mem_gb": _peak_memory_gb(),
        "rollout_weight_version": max((float(v) for v in versions if v.isdigit()), default=-1.0),
        "rollout_staleness": batch.staleness,
    }


def _peak_memory_gb() -> float:
    """The largest peak over all ranks: allocated CUDA memory on GPUs, the process's peak RSS on CPU."""
    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    t = torch.tensor([peak], dtype=torch.float64, device=parallel.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _ckpt_step_dir(root: str) -> str:
    step = latest_step(root)
    if step is None:
        raise FileNotFoundError(f"{root} holds no checkpoint (no latest_step.txt): convert the HF model with "
                                "tools/convert_hf_to_megatron.py first")
    return f"step_{step:08d}"


def _probe_payload(probe) -> dict:
    g = probe.guidance
    return {
        "token_weights": probe.token_weights.float().cpu(),
        "guidance": None if g is None else {"tokens": g.tokens.cpu(), "lengths": g.lengths.cpu(),
                                            "window_start": g.window_start.cpu(),
                                            "row": torch.tensor([probe.requests.owners[c][0] for c in g.candidate],
                                                                dtype=torch.long),
                                            "logit_weights": g.logit_weights.float().cpu()},
        "n_candidates": int(probe.divergent.numel()),
        "n_divergent": int(probe.divergent.sum()),
        "ot_sum": float(probe.ot_distances.double().sum()) if probe.ot_distances.numel() else 0.0,
        "ot_stats": dict(probe.ot_stats),  # over the whole batch already (the same on every rank)
        "timings": probe.timings,
    }


def _probe_metrics(p: dict) -> dict:
    """The paper's diagnostics, summed over data-parallel replicas, and the OT distances' quantiles and the mean OT
    of the suppressed / kept candidates over the whole batch (for calibrating topd.threshold; 0.0 without a probe)."""
    from megatron.core import parallel_state as ps

    from megatron_topd.topd.weights import OT_STAT_KEYS

    t = torch.tensor([p["n_candidates"], p["n_divergent"], p["ot_sum"]], dtype=torch.float64, device=parallel.device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    n, div, ot_sum = t.cpu().tolist()
    stats = p.get("ot_stats") or {}
    return {"candidates": n, "divergent": div, "low_divergence_share": (n - div) / n if n else 0.0,
            "mean_ot_distance": ot_sum / n if n else 0.0, **{k: float(stats.get(k, 0.0)) for k in OT_STAT_KEYS}}


def main(command: str, config_path: str | None, overrides: list[str]) -> int:
    if command == "demo":
        from megatron_topd import demo

        return demo.main(config_path, overrides)
    train(load_config(config_path, overrides))
    parallel.destroy()
    return 0
