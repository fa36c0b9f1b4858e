"""Where a step's rollouts come from (`train.async_rollouts`): sampled at the top of the step, or prefetched.

`SyncRollouts` (the default): rank 0 samples step k's rollouts from the student's servers at the top of step k, with
the weights the trainer pushed after step k-1 (weight version k: on-policy), and broadcasts them.

`AsyncRollouts`: as soon as rank 0 hands out step k's batch it starts sampling step k+1's in a background thread,
so the servers generate while the trainer scores, probes and trains step k (as slime's ``--async`` and NeMo-RL's
async GRPO do). Step k+1's samples therefore come from the weights of before step k's update (version k): one step
off-policy, staleness 1 (the first step, sampled at once, has staleness 0). `settle()` waits for the prefetch before
the trainer pushes new weights, so no batch mixes two weight versions; the step then costs about
max(generation, scoring + probe + training) + sync instead of their sum (docs/throughput.md). The optional truncated
importance-sampling correction of the OPD term (`train.rollout_is_correction`) lives in `train/objective.py`.

Both sources sample step k with the same seed (``seed * 100003 + k``), draw prompts in the same order and record
each sample's ``weight_version`` (SGLang's); the sync source's batches are exactly what the loop sampled before
this interface existed. Only HTTP runs in the background thread, on its own client (a client's connection pool is
bound to one event loop); every collective stays on the main thread.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import torch.distributed as dist

from megatron_topd.rollout.client import ROLLOUT_PRIORITY
from megatron_topd.rollout.config import windows_ahead
from megatron_topd.rollout.step_batch import StepBatch, broadcast_step_batch


def sample_step(cfg, step: int, dataset, client, out: Path, vocab: int, scorer=None):
    """Rank 0: `prompts_per_step x n_samples` responses for step `step`, written to rollouts/step_k.jsonl.

    ``scorer`` (a remote teacher, `train.teacher.RemoteTeacher`): each prompt's samples are scored by the teacher's
    servers as soon as they are generated, while the other prompts still generate; the scores ride in the batch."""
    from megatron_topd.rollout import SamplingParams
    from megatron_topd.rollout.records import records_from_generations, write_records

    prompts = dataset.next_batch(cfg.train.prompts_per_step)
    dataset_state = dataset.state_dict()  # right after the draw: the checkpoint of step k resumes at step k+1
    seed = cfg.rollout.seed if cfg.rollout.seed is not None else cfg.train.seed
    params = SamplingParams(max_new_tokens=cfg.rollout.max_new_tokens, n=cfg.rollout.n_samples,
                            temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            seed=seed * 100003 + step)
    teacher_rows = None
    priority = ROLLOUT_PRIORITY if windows_ahead(cfg.rollout, cfg.train.async_rollouts) else None
    if scorer is None:
        gens = client.generate([p.ids for p in prompts], params, priority=priority)
    else:
        gens, teacher_rows = asyncio.run(_generate_and_score(client, scorer, [p.ids for p in prompts], params,
                                                             priority, rows=[p.row for p in prompts]))
    records = records_from_generations([p.index for p in prompts], [p.ids for p in prompts], gens)
    write_records(out / "rollouts" / f"step_{step:08d}.jsonl", records, vocab_size=vocab)
    versions = [r.weight_version for r in records]
    return StepBatch.from_rows([r.prompt_ids for r in records], [r.response_ids for r in records],
                               [r.response_logprobs for r in records], [r.finish_reason for r in records],
                               versions, dataset_state, teacher=teacher_rows, staleness=staleness(step, versions),
                               servers=[g.server for row in gens for g in row])  # record order: prompt-major


async def _generate_and_score(client, scorer, prompts: list[list[int]], params, priority=None, rows=None):
    """Generation with each prompt's samples scored by the teacher as soon as they are back (record order).

    A scorer that declares ``wants_sample_context`` (a cross-tokenizer teacher) also gets the samples' log-probs
    (``student_logprobs``) and the prompt's dataset row (``prompt_row``, from ``rows``; None when not given)."""
    scored: dict[int, list[dict]] = {}
    context = getattr(scorer, "wants_sample_context", False)

    async def score(i: int, gens) -> None:
        extra = {}
        if context:
            extra = {"student_logprobs": [g.logprobs for g in gens], "prompt_row": rows[i] if rows else None}
        scored[i] = await scorer.ascore_samples(prompts[i], [g.token_ids for g in gens], **extra)

    gens = await client.agenerate(prompts, params, on_prompt_done=score, priority=priority)
    return gens, [row for i in range(len(prompts)) for row in scored[i]]


def staleness(step: int, versions: list[str]) -> float:
    """Trainer step minus the oldest weight version among the samples (a non-numeric version, e.g. SGLang's
    "default" before any sync, is the initial weights: version 0)."""
    numbers = [int(v) if v.isdigit() else 0 for v in versions]
    return float(step - min(numbers)) if numbers else 0.0


class SyncRollouts:
    """Step k's rollouts sampled at the top of step k (on-policy). Every rank calls `next`; rank 0 samples."""

    def __init__(self, cfg, dataset, client, out: Path, vocab: int, rank0: bool, scorer=None):
        self.cfg, self.dataset, self.client, self.out, self.vocab, self.rank0 = cfg, dataset, client, out, vocab, rank0
        self.scorer = scorer

    def next(self, step: int):
        """Step `step`'s batch on every rank (a collective)."""
        payload = None
        if self.rank0:
            payload = self._sample_or_error(step, self.client)
        return _share(payload)

    def settle(self) -> float:
        """Wait until no generation is in flight (call before the servers' weights change); seconds waited."""
        return 0.0

    def _sample_or_error(self, step: int, client, scorer=None):
        try:
            return sample_step(self.cfg, step, self.dataset, client, self.out, self.vocab,
                               self.scorer if scorer is None else scorer)
        except Exception as e:  # reaches every rank (raised there too), instead of leaving them in the broadcast
            return _Failed(f"step {step}: {type(e).__name__}: {e}")


class AsyncRollouts(SyncRollouts):
    """Step k+1's rollouts sampled in the background while step k trains (one step off-policy)."""

    def __init__(self, cfg, dataset, client, out: Path, vocab: int, rank0: bool, *, last_step: int, scorer=None):
        super().__init__(cfg, dataset, client, out, vocab, rank0, scorer)
        self.last_step = last_step  # no prefetch beyond it (exclusive)
        self._thread: threading.Thread | None = None
        self._box: dict = {}
        self._client = client.with_own_pool() if rank0 else None
        self._scorer = scorer.with_own_client() if rank0 and scorer is not None else None

    def next(self, step: int):
        payload = None
        if self.rank0:
            self.settle()
            if self._box.get("step") == step:
                payload = self._box.pop("batch")
            else:  # the first step (or after a resume): nothing prefetched, sample now
                payload = self._sample_or_error(step, self.client)
            self._box.clear()
            if step + 1 < self.last_step and not isinstance(payload, _Failed):
                self._start(step + 1)
        return _share(payload)

    def settle(self) -> float:
        if self._thread is None:
            return 0.0
        t = time.perf_counter()
        self._thread.join()
        self._thread = None
        return time.perf_counter() - t

    def _start(self, step: int) -> None:
        def work():
            self._box["batch"] = self._sample_or_error(step, self._client, self._scorer)
            self._box["step"] = step

        # A daemon: a run that stops early (preemption, an error) never waits on a prefetch nobody will use.
        self._thread = threading.Thread(target=work, name=f"rollouts-step-{step}", daemon=True)
        self._thread.start()


def make_rollout_source(cfg, dataset, client, out: Path, vocab: int, rank0: bool, scorer=None):
    """`train.async_rollouts` picks the source; both have next(step) -> StepBatch and settle() -> seconds.
    ``scorer``: the teacher's `rollout_scorer` (a remote teacher scores samples as they finish; None otherwise)."""
    if cfg.train.async_rollouts:
        return AsyncRollouts(cfg, dataset, client, out, vocab, rank0, last_step=cfg.train.steps, scorer=scorer)
    return SyncRollouts(cfg, dataset, client, out, vocab, rank0, scorer)


class _Failed:
    def __init__(self, message: str):
        self.message = message


def _share(payload):
    """Rank 0's batch on every rank, as tensors (rollout/step_batch.py); a remote teacher's top-k scores stay on
    rank 0: only the last pipeline stages use them, and they are the batch's bulk (train/dealing.py sends them
    there). A failure on rank 0 is raised on every rank."""
    from megatron_topd.parallel import broadcast_object

    error = broadcast_object(payload.message if isinstance(payload, _Failed) else None)
    if error is not None:
        raise RuntimeError(f"rollout generation failed on rank 0 ({error})")
    return broadcast_step_batch(payload if dist.get_rank() == 0 else None)

