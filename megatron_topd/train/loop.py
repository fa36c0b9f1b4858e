"""The TOPD training loop, top to bottom (DESIGN section 3); each phase of a step is one function below:

    generate_rollouts (SGLang student servers) -> replica_rows (this data-parallel replica's share)
    -> score_replica (teacher + student forward, per-token l_t only; skipped for plain OPD)
    -> probe_replica (candidates, near-future windows from the SGLang servers, OT divergence, weights, guidance rows)
    -> record_candidates (each candidate's OT distance, and its label when the task has one: candidates/step_k.jsonl)
    -> train_on_replica (teacher + student over groups of microbatches, TOPD loss, backward, guarded optimizer step)
    -> sync_weights (to the student servers) -> evaluate_heldout (every eval.interval steps) -> step_metrics
    -> save_checkpoint

What each phase hands the next is a dataclass (train/handoffs.py, rollout/step_batch.py). Set-up (models,
tokenizer, prompts, resume, servers, clients) is train/setup.py. Memory (docs/training_step.md): nothing of size
[rows, S, V/TP] outlives `train.teacher_group_microbatches` microbatches; what crosses phases is token ids and
per-token scalars.

Every rank runs `train` (torchrun / srun / the test harness). Global rank 0 owns the SGLang servers; the first TP rank
of each data-parallel replica's first pipeline stage asks them for near-future windows.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_topd import parallel
from megatron_topd.checkpointing import prune_checkpoints, save_checkpoint, unwrap
from megatron_topd.config import Config
from megatron_topd.models import padded_vocab_size
from megatron_topd.rollout.step_batch import StepBatch
from megatron_topd.rollout.weight_sync import SyncStats
from megatron_topd.train import preemption
from megatron_topd.train.batches import (guidance_microbatches, pad_multiple, padding_fraction, rollout_microbatches,
                                         windows_per_row)
from megatron_topd.train.dealing import deal_rows, to_last_stage
from megatron_topd.train.distill_step import distill_step
from megatron_topd.train.evaluation import read_baseline
from megatron_topd.train.guard import NonFiniteError, agree_on_nonfinite
from megatron_topd.train.handoffs import PassStats, ProbeOutcome, RolloutRows
from megatron_topd.train.metrics import step_metrics, sync_metrics
from megatron_topd.train.objective import ObjectiveScales
from megatron_topd.train.scoring import score_rollouts
from megatron_topd.train.setup import Run, guidance_layout, set_up
from megatron_topd.train.step import StepResult
from megatron_topd.train.teacher import RemoteTeacher


def train(cfg: Config) -> list[dict]:
    """Run `cfg.train.steps` TOPD steps; returns the per-step metrics (on every rank)."""
    with set_up(cfg) as run:
        if cfg.eval.enabled and run.start_step == 0:                                          # 0. baseline
            run.logger.log(0, evaluate_start(run))
        history = []
        for step in range(run.start_step, cfg.train.steps):
            metrics, batch = train_step(run, step)
            history.append(metrics)
            run.logger.log(step + 1, metrics)
            if not save_checkpoint_if_due(run, step, batch):
                break  # a stop was requested (preemption): the requeued job resumes from the checkpoint just saved
        return history


def train_step(run: Run, step: int) -> tuple[dict, StepBatch]:
    """One TOPD step, phase by phase; returns its metrics (the same on every rank) and its rollouts."""
    cfg, t0 = run.cfg, time.perf_counter()
    timings: dict[str, float] = {}

    batch = generate_rollouts(run, step)                                                      # 1. rollouts
    timings["generation_s"] = time.perf_counter() - t0
    rows = replica_rows(batch, run.layout)                                                    # 2. DP share
    t = time.perf_counter()
    token_loss = score_replica(run, rows)                                                     # 3. scoring
    timings["scoring_s"] = time.perf_counter() - t
    probe = probe_replica(run, step, rows, token_loss)                                        # 4-6. probe
    timings.update({"window_s": 0.0, "ot_s": 0.0, **probe.timings})
    record_candidates(run, step, rows, token_loss, probe)                                     # 6b. their log
    t = time.perf_counter()
    result, stats = train_on_replica(run, rows, probe)                                        # 7. training pass
    timings["train_s"] = time.perf_counter() - t
    timings["rollout_wait_s"] = run.rollout_source.settle()  # async: the prefetch ends on the old weights
    t = time.perf_counter()
    synced = sync_weights(run, step, result)                                                  # 8. weight sync
    timings["sync_s"] = time.perf_counter() - t
    if cfg.eval.due(step + 1, cfg.train.steps):                                               # 9. held-out
        t = time.perf_counter()
        timings.update(evaluate_heldout(run), eval_s=time.perf_counter() - t)
    metrics = step_metrics(result, stats, batch, probe, timings, time.perf_counter() - t0)   # 10. metrics
    metrics.update(planned_peak_gb=run.planned_peak_gb, prompts_skipped=float(len(run.dataset.skipped)),
                   **run.teacher.step_metrics(batch))  # a cross-tokenizer teacher's masked tokens and rows
    if synced is not None:
        metrics.update(sync_metrics(synced))
    return metrics, batch


# ---- the phases of a step ---------------------------------------------------------------------------------------
def generate_rollouts(run: Run, step: int) -> StepBatch:
    """Step `step`'s `prompts_per_step x n_samples` responses on every rank, from the rollout source
    (rollout/async_rollouts.py): sampled now by rank 0 (sync), or prefetched while the previous step trained (async)."""
    return run.rollout_source.next(step)


def replica_rows(batch: StepBatch, layout) -> RolloutRows:
    """This data-parallel replica's rollouts: rows dealt longest-first to the replica with the fewest tokens. A
    remote teacher's scores (on rank 0 only) go to the replica's last pipeline stage alone (train/dealing.py)."""
    replicas = deal_rows(batch.row_lengths(), layout.data_parallel)
    mine = replicas[layout.dp_rank]
    if not mine:
        raise ValueError(f"{len(batch)} rollouts leave data-parallel replica {layout.dp_rank} empty: "
                         "make train.prompts_per_step * rollout.n_samples at least the data-parallel size")
    teacher = to_last_stage(batch.teacher, replicas, layout) if batch.has_teacher_scores else None
    return RolloutRows(*batch.rows(mine), teacher,
                       servers=None if batch.servers is None else [batch.servers[i] for i in mine])


def score_replica(run: Run, rows: RolloutRows) -> torch.Tensor | None:
    """Per-token l_t [rows, S] (float32, on CPU) of this replica's rows on every pipeline stage; None for plain OPD,
    whose training pass needs no candidates (it computes the same scalars itself)."""
    from megatron.core import parallel_state as ps

    cfg = run.cfg
    if cfg.topd.variant == "opd":
        return None
    width = max(rows.lengths())
    batches = rollout_microbatches(rows, cfg.train.max_tokens_per_microbatch, run.pad_id, multiple=_pad_multiple(cfg))
    scores = score_rollouts(run.student, run.teacher, batches, rows=len(rows), width=width,
                            group_size=cfg.train.teacher_group_microbatches, vocab_size=run.vocab,
                            chunk_size=cfg.train.loss_chunk_size)
    token_loss = torch.zeros(len(rows), width, dtype=torch.float32, device=parallel.device())
    if scores is not None:  # the last pipeline stage
        token_loss.copy_(scores.token_loss)
    bad = agree_on_nonfinite(not bool(torch.isfinite(token_loss).all()))
    if bad:  # candidates cannot be ranked by NaN: the same decision on every rank, before anyone waits on a probe
        raise NonFiniteError(f"non-finite per-token KL in the scoring pass on rank(s) {bad}: the student or teacher "
                             "produced NaN/Inf logits; check the checkpoints and the learning rate")
    if run.layout.pipeline_parallel > 1:
        dist.broadcast(token_loss, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return token_loss.cpu()


def probe_replica(run: Run, step: int, rows: RolloutRows, token_loss: torch.Tensor | None) -> ProbeOutcome:
    """Candidates -> near-future windows -> OT -> weights (+ guidance rows), on the first stage, shared over PP."""
    from megatron.core import parallel_state as ps

    from megatron_topd.topd import embedding_lookup, run_probe
    from megatron_topd.train.cross_probe import probe_samplers

    cfg, layout = run.cfg, run.layout
    tokens, response_mask = rows.padded(run.pad_id)
    if cfg.topd.variant == "opd":
        return ProbeOutcome(token_weights=torch.ones(tokens.shape))
    outcome = None
    if layout.is_first_stage:
        # topd.embedding_source (auto: the co-located teacher's frozen table, else the student's)
        owner = run.student[0] if cfg.topd.embedding_table(cfg.teacher.placement) == "student" else run.teacher.chunks[0]
        word = unwrap(owner).embedding.word_embeddings
        asks = ps.get_tensor_model_parallel_rank() == 0  # one rank per replica talks to the servers
        # the servers' clients; for a teacher of another tokenizer, samplers that write both windows in the
        # student's tokens and probe each candidate at its span's start (train/cross_probe.py)
        teacher_side, student_side, place = probe_samplers(run.teacher, run.teacher_client, run.student_client, rows,
                                                           asks=asks)
        probe = run_probe(
            tokens, token_loss, response_mask, cfg.topd,
            teacher=teacher_side if asks else None, student=student_side if asks else None,
            embed=embedding_lookup(word.weight.detach(), group=parallel.tensor_parallel_group(),
                                   vocab_start=word.vocab_start_index,
                                   vocab_size=padded_vocab_size(run.vocab, layout.tensor_parallel)),
            pad_id=run.pad_id, seed=cfg.train.seed * 7919 + step, group=parallel.tensor_parallel_group(),
            dp_group=ps.get_data_parallel_group(),  # suppression decided over the whole batch
            student_servers=rows.servers,  # each row's windows go to the server whose cache holds the row
            place_candidates=place,
        )
        outcome = ProbeOutcome.from_probe(probe)
        if isinstance(run.teacher, RemoteTeacher) and outcome.n_windows:
            # a remote teacher's top-k along its windows (TP rank 0 asks; a co-located one has logits instead)
            g = outcome.guidance
            g.teacher = run.teacher.score_guidance(g.tokens, g.lengths, g.window_start) if asks else None
            if layout.tensor_parallel > 1:
                tp = parallel.tensor_parallel_group()
                g.teacher = parallel.broadcast_object(g.teacher, src=dist.get_global_rank(tp, 0), group=tp)
    return parallel.broadcast_object(outcome, src=ps.get_pipeline_model_parallel_first_rank(),
                                     group=ps.get_pipeline_model_parallel_group())


def record_candidates(run: Run, step: int, rows: RolloutRows, token_loss: torch.Tensor | None,
                      probe: ProbeOutcome) -> None:
    """candidates/step_k.jsonl (one file per data-parallel replica beyond the first): each candidate's OT distance,
    l_t, whether it was suppressed and its ground-truth label when the task (eval.task) has one; written by each
    replica's first rank (train/candidate_log.py)."""
    from megatron.core import parallel_state as ps

    from megatron_topd.tasks import make_task
    from megatron_topd.train.candidate_log import candidate_rows, write_candidates

    if not probe.candidates or ps.get_tensor_model_parallel_rank() != 0 or not run.layout.is_first_stage:
        return
    suffix = "" if run.layout.dp_rank == 0 else f".dp{run.layout.dp_rank}"
    write_candidates(run.out / "candidates" / f"step_{step:08d}{suffix}.jsonl",
                     candidate_rows(make_task(run.cfg.eval.task), run.tokenizer, rows, token_loss, probe.candidates))


def train_on_replica(run: Run, rows: RolloutRows, probe: ProbeOutcome) -> tuple[StepResult, PassStats]:
    """The training pass over this replica's rollout and guidance microbatches, then one optimizer step."""
    from megatron.core import parallel_state as ps

    cfg = run.cfg
    multiple, budget = _pad_multiple(cfg), cfg.train.max_tokens_per_microbatch
    guidance, n_windows = probe.guidance, probe.n_windows
    windows, as_rows = None, list(range(n_windows))
    if n_windows and guidance_layout(cfg) == "shared_prefix":  # windows ride inside their rollout row
        windows, as_rows = windows_per_row(guidance, rows, budget, multiple)
    batches = rollout_microbatches(rows, budget, run.pad_id, multiple=multiple, token_weights=probe.token_weights,
                                   guidance=guidance, windows=windows)
    if as_rows:  # the rest train as rows of their own
        rest = guidance.select(as_rows)
        batches += guidance_microbatches(rest.tokens, rest.lengths, rest.logit_weights, budget, run.pad_id,
                                         multiple=multiple, teacher=rest.teacher, window_start=rest.window_start)
    real, padded = padding_fraction(batches)
    counts = torch.tensor([sum(len(r) for r in rows.responses), n_windows, real, padded], dtype=torch.float64,
                          device=parallel.device())
    dist.all_reduce(counts, group=ps.get_data_parallel_group())
    n_tokens, n_windows, real, padded = (int(x) for x in counts.cpu().tolist())
    scales = ObjectiveScales(dp_size=run.layout.data_parallel, global_tokens=n_tokens, global_windows=n_windows,
                             lambda_traj=cfg.topd.lambda_traj if cfg.topd.variant == "topd" else 0.0,
                             variant=cfg.topd.variant,
                             rollout_is_cap=cfg.train.rollout_is_cap if cfg.train.rollout_is_correction else None)
    result = distill_step(run.student, run.optimizer, run.scheduler, run.teacher, batches, scales,
                          group_size=cfg.train.teacher_group_microbatches, vocab_size=run.vocab,
                          chunk_size=cfg.train.loss_chunk_size, on_nonfinite=cfg.train.on_nonfinite)
    return result, PassStats(response_tokens=n_tokens, guidance_windows=n_windows, train_tokens=real,
                             padding_fraction=1.0 - real / max(padded, 1))


def sync_weights(run: Run, step: int, result: StepResult) -> SyncStats | None:
    """Push the updated student to its servers as weight version step + 1 (the distributed sync: each pipeline stage
    pushes its own layers); its stats, on every rank (None when a skipped step changed no weight: the servers already
    hold them)."""
    if result.skipped:
        return None
    return parallel.broadcast_object(run.weight_sync.sync_model(run.student[0], run.student_spec, str(step + 1)))


def evaluate_heldout(run: Run, teacher_too: bool = False) -> dict | None:
    """Held-out accuracy by greedy decoding on the servers (the student's hold this step's weights after the sync);
    rank 0 asks (it alone holds the held-out set), every rank gets the same numbers."""
    out = None
    if run.heldout is not None:
        out = {"heldout_accuracy": run.heldout.accuracy(run.student_client)}
        if teacher_too:
            out["teacher_heldout_accuracy"] = run.heldout.accuracy(run.teacher_client)
    return parallel.broadcast_object(out)


def evaluate_start(run: Run) -> dict | None:
    """Held-out accuracy before the first step: measured, or read from eval.baseline_file when it was measured once
    for every run that starts from this student (an experiment's arm)."""
    cfg = run.cfg
    if cfg.eval.baseline_file:
        return read_baseline(cfg.eval, cfg.train.student_checkpoint, teacher_too=cfg.eval.teacher)
    return evaluate_heldout(run, teacher_too=cfg.eval.teacher)


def save_checkpoint_if_due(run: Run, step: int, batch: StepBatch) -> bool:
    """Checkpoint every train.save_interval steps and after the last; False when the run must stop now (a stop
    request, agreed on by every rank), after a checkpoint so the requeued job resumes at the next step."""
    cfg, done = run.cfg, step + 1
    extra = {"dataset": batch.dataset_state}
    saved = done % cfg.train.save_interval == 0 or done == cfg.train.steps
    if saved:
        save_checkpoint(run.checkpoints, done, run.student, run.optimizer, run.scheduler, extra=extra)
        if dist.get_rank() == 0:  # every rank has finished writing it (save_checkpoint ends with a barrier)
            prune_checkpoints(run.checkpoints, cfg.train.keep_checkpoints)
    if done < cfg.train.steps and preemption.stop_requested():  # a collective: all ranks agree
        if not saved:
            preemption.mark_temporary(save_checkpoint(run.checkpoints, done, run.student, run.optimizer,
                                                      run.scheduler, extra=extra))
        return False
    return True


def _pad_multiple(cfg: Config) -> int:
    """Microbatch widths round up to this (train/batches.py `pad_multiple`: TP under SP, 16 per shard under FP8)."""
    p = cfg.parallel
    return pad_multiple(p.tensor_parallel, sequence_parallel=p.sequence_parallel, fp8=cfg.precision.fp8 is not None,
                        context_parallel=p.context_parallel)
