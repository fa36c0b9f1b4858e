"""Seconds per phase of one TOPD step on a device (plan/devices.py): what the planner prints beside the memory plan.

`speed.step_seconds` ranks trainer layouts by the training pass alone; a TOPD step is far more than that pass, and
on the cluster most of it is outside the trainer (generation, the probe's windows). Each phase is its dominant costs
on a `DeviceProfile` (H100 by default), with the step's token counts:

- generation: each student server prefills its prompts, then decodes. A decode step reads the weights once and
  every running sequence's KV cache (memory-bound) and pays a fixed per-step cost plus a per-sequence one (CPU);
  the step count is the longest response per wave of sequences the server runs at once (a wave's short responses
  do not end it early), the per-sequence costs follow the tokens actually generated;
- scoring pass (TOPD): the co-located teacher's forward and the student's forward over the rollouts;
- probe windows: the teacher's server prefills every candidate's prefix (its radix cache holds nothing of the row:
  about 1.5x the row's tokens for 3 nested prefixes, docs/throughput.md) and decodes K tokens per window; the
  student's server decodes its K tokens on cached prefixes. Both are asked at once (topd/probe.py): the phase is
  the slower of the two;
- OT: per window pair its K x K cosine costs and exact EMD, split over the tensor-parallel ranks of each replica
  (topd/divergence.py; at the device's `ot_tp_speedup`), and that split's two all-reduces;
- training pass: the co-located teacher's forward again, the student's forward and backward over the rollouts and
  the guidance rows (``rows``: prefix + window each, as under Transformer Engine; ``shared_prefix``: K tokens per
  window inside its rollout row, Megatron's local layers);
- weight sync: global rank 0's admin calls around the push (pause, begin, end, model_info, continue) and the
  trainer's object collectives; each pipeline stage's first TP rank pushes its own layers (gathered over TP, one
  all-gather per tensor, the stages at once), and the stages' buckets reach the servers in turn, one update call
  each, its broadcast and the server's load of its bytes (rollout/weight_sync/distributed.py, docs/rollout.md);
- checkpoint: the dist checkpoint (weights, fp32 main params, Adam moments): a save's fixed and per-layer costs and
  its bytes at a filesystem bandwidth, amortised over ``save_interval`` steps.

A trainer pass is its FLOPs at the device's rate (GPU: x `speed.trainer_mfu`, which holds every other cost; the
forward's and the backward's shares each split over TP at the device's speed-up) plus the device's per-call costs: per microbatch each layer's forward (or forward + backward), the model outside its layers,
the tensor-parallel all-reduces (two of [tokens, h] per layer and direction, the embedding's, the loss's two small
ones per call), and one Megatron schedule call per group of microbatches; pipeline bubbles scale it all; the
training pass adds one optimizer step's calls.
It is a model for planning, stated with its assumptions; `benchmarks/bench_step_time_model.py` checks its shares
against a measured CPU demo step, and on a GPU the acceptance run (scripts/gpu_acceptance.sh) measures the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megatron_topd.convert.mapping import tensor_maps
from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan.devices import H100, DeviceProfile
from megatron_topd.plan.layout import Layout
from megatron_topd.plan.model_state import total_params
from megatron_topd.plan.rollout import kv_bytes_per_token
from megatron_topd.plan.speed import forward_flops_per_token, pipeline_bubble, trainer_mfu


@dataclass
class TopdStep:
    """The shape of one step (from a run's config)."""

    rows: int = 256  # rollouts per step (prompts x samples)
    prompt_tokens: int = 384
    response_tokens: int = 8000  # mean generated tokens per rollout
    longest_response: int | None = None  # the longest rollout of a wave (None: twice the mean, max_new_tokens)
    candidates_per_row: int = 3  # topd.top_k
    window: int = 50  # topd.window
    divergent_share: float = 0.7  # 1 - topd.low_fraction: candidates that become guidance rows
    student_servers: int = 8  # one per node at TP8
    teacher_servers: int = 1
    decode_batch: int = 64  # sequences a server runs at once
    server_kv_tokens: int | None = None  # KV tokens a server holds (None: decode_batch binds first)
    save_interval: int = 25
    sync_bucket_mb: float = 512.0  # rollout.sync_bucket_mb: one server call per bucket of a stage's weights
    variant: str = "topd"
    guidance_layout: str = "rows"  # rows | shared_prefix (train.guidance_layout as resolved)
    dtype_bytes: int = 2  # weights and activations (bf16; the CPU demo runs fp32)
    # a replica's rollout microbatches as the trainer packs its rows (train/batches.py pack_rows: longest first,
    # within the token budget and 10% padding, so rows of unequal length need more than the mean row's count);
    # None: the mean row's count
    rollout_microbatches: float | None = None

    @property
    def longest(self) -> int:
        return self.longest_response or 2 * self.response_tokens

    @property
    def row_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def windows(self) -> int:
        return self.rows * self.candidates_per_row


@dataclass
class StepTime:
    phases: dict[str, float] = field(default_factory=dict)
    detail: dict[str, float] = field(default_factory=dict)  # parts of a phase (the windows' two servers)

    @property
    def total(self) -> float:
        return sum(self.phases.values())

    def shares(self) -> dict[str, float]:
        return {k: v / self.total for k, v in self.phases.items()}


def _server_seconds(spec: ModelSpec, step: TopdStep, device: DeviceProfile, *, requests: float, prefill: float,
                    new_tokens: float, wave_steps: int, context: float, longest_context: float, servers: int,
                    gpus_per_server: int) -> float:
    """``requests`` spread over ``servers``: prefill ``prefill`` tokens, then decode ``new_tokens`` in waves of at
    most `decode_batch` sequences (or what the KV pool holds at ``longest_context`` tokens each), ``wave_steps``
    decode steps per wave; ``context``: a running sequence's mean length (the KV it reads per step)."""
    per_server = requests / servers
    resident = step.decode_batch if step.server_kv_tokens is None else \
        max(1, min(step.decode_batch, int(step.server_kv_tokens // longest_context)))
    waves = math.ceil(per_server / resident)
    bandwidth = gpus_per_server * device.memory_bytes_per_s * device.decode_efficiency
    weights = step.dtype_bytes * total_params(spec)
    prefill_s = per_server * device.prefill_request_s + prefill / servers * forward_flops_per_token(
        spec, int(longest_context)) / (gpus_per_server * device.flops * device.prefill_mfu)
    steps_s = waves * wave_steps * (device.decode_step_overhead_s + weights / bandwidth)
    per_token = device.decode_seq_step_s + context * kv_bytes_per_token(spec, step.dtype_bytes) / bandwidth
    return prefill_s + steps_s + new_tokens / servers * per_token


def _microbatches(rows_per_replica: float, width: float, budget: int) -> int:
    """Rows of ``width`` tokens packed under the token budget (train/batches.py packs longest first)."""
    return math.ceil(rows_per_replica / max(1, budget // max(1, math.ceil(width / 8) * 8)))


def _pass_seconds(spec: ModelSpec, tokens: float, microbatches: int, layout: Layout, device: DeviceProfile, *,
                  seq: int, fp8: bool, train: bool, recompute: bool, dtype_bytes: int, loss_calls: int,
                  group: int) -> float:
    """One model over ``tokens`` (the whole step) in ``microbatches`` per replica, in schedules of ``group``
    microbatches, with ``loss_calls`` vocabulary-parallel loss calls per microbatch; before the pipeline bubble."""
    mfu = trainer_mfu(layout) if device.mfu_from_layout else 1.0
    rate = device.flops * (device.fp8_speedup if fp8 else 1.0) * mfu
    forwards = (2 if recompute else 1) if train else 1  # (+ the recomputed forward)
    backward = device.backward_ratio if train else 0.0
    doublings = math.log2(layout.tp)  # the forward's and the backward's shares split over TP at their own speed-ups
    split = forwards / device.tp_speedup ** doublings + backward / device.tp_backward_speedup ** doublings
    compute = tokens * forward_flops_per_token(spec, seq) * split / (layout.dp * layout.pp * layout.cp * rate) + \
        tokens / layout.dp * device.model_forward_token_s * (forwards + backward)  # each TP rank sees all its tokens
    layers = spec.num_layers / layout.pp
    calls = (device.model_train_s if train else device.model_forward_s) + layers * (
        device.layer_train_s if train else device.layer_forward_s)
    if layout.tp > 1:
        # all-reduces of [tokens, h]: two per layer and direction (the row-parallel outputs forward, the
        # column-parallel inputs' gradients backward), the embedding's output, the output layer's input gradient;
        # and each vocabulary-parallel loss call's max and sum over [tokens, 1-2] (losses/_dense.py)
        mb_tokens = tokens / layout.dp / max(1, microbatches)
        wide = (4 * layers + 2 if train else 2 * layers + 1)
        calls += (wide + 2 * loss_calls) * device.collective_latency_s + \
            wide * mb_tokens * spec.hidden_size * dtype_bytes / device.collective_bytes_per_s
    return compute + microbatches * calls + math.ceil(microbatches / group) * device.schedule_call_s


def step_time(student: ModelSpec, teacher: ModelSpec | None, layout: Layout, step: TopdStep, *, seq: int,
              microbatches_per_step: int, gpus_per_node: int = 8, fp8: bool = False,
              device: DeviceProfile = H100) -> StepTime:
    colocated = teacher is not None and layout.placement == "colocated"
    rollout_tokens = step.rows * step.row_tokens
    out = StepTime()
    gen_context = step.prompt_tokens + step.response_tokens / 2
    out.phases["generation"] = _server_seconds(
        student, step, device, requests=step.rows, prefill=step.rows * step.prompt_tokens,
        new_tokens=step.rows * step.response_tokens, wave_steps=step.longest, context=gen_context,
        longest_context=step.prompt_tokens + step.longest, servers=step.student_servers, gpus_per_server=gpus_per_node)

    budget, rows_per_replica = layout.max_tokens_per_microbatch, step.rows / layout.dp
    bubble = pipeline_bubble(layout, microbatches_per_step, colocated)
    kw = dict(layout=layout, device=device, seq=seq, fp8=fp8, dtype_bytes=step.dtype_bytes,
              group=layout.teacher_group_microbatches if colocated else 10**9)
    rollout_mbs = step.rollout_microbatches or _microbatches(rows_per_replica, step.row_tokens, budget)
    windows = step.windows
    if step.variant != "opd":
        scoring = _pass_seconds(student, rollout_tokens, rollout_mbs, train=False, recompute=False, loss_calls=1,
                                **kw)
        if colocated:
            scoring += _pass_seconds(teacher, rollout_tokens, rollout_mbs, train=False, recompute=False,
                                     loss_calls=0, **kw)
        out.phases["scoring"] = scoring * bubble
        window_context = step.row_tokens / 2 + step.window  # a prefix of half the row, then the window
        server = dict(requests=windows, new_tokens=windows * step.window, wave_steps=step.window,
                      context=window_context - step.window / 2, longest_context=window_context)
        parts = {"student_windows": _server_seconds(student, step, device, prefill=0.0,
                                                    servers=step.student_servers, gpus_per_server=gpus_per_node,
                                                    **server)}
        if teacher is not None:  # the teacher's server: prefill the nested prefixes, decode K per window
            parts["teacher_windows"] = _server_seconds(teacher, step, device, prefill=1.5 * rollout_tokens,
                                                       servers=step.teacher_servers, gpus_per_server=gpus_per_node,
                                                       **server)
        out.detail.update(parts)
        out.phases["windows"] = max(parts.values())  # both servers are asked at once
        # each replica's pairs dealt over its TP ranks; the embedding lookup's and the results' all-reduces
        out.phases["ot"] = windows * device.ot_seconds_per_window / (layout.dp * device.ot_tp_speedup ** math.log2(
            layout.tp)) + \
            (2 * device.collective_latency_s if layout.tp > 1 else 0.0)
    train_tokens, train_mbs = float(rollout_tokens), rollout_mbs
    if step.variant == "topd":
        guidance = windows * step.divergent_share
        if step.guidance_layout == "shared_prefix":  # K tokens per window, inside its rollout row
            train_tokens += guidance * step.window
            train_mbs = _microbatches(rows_per_replica, step.row_tokens + guidance / step.rows * step.window, budget)
        else:  # a row of its own: the rollout's prefix (half the row on average) + the window
            width = step.row_tokens / 2 + step.window
            train_tokens += guidance * width
            train_mbs += _microbatches(guidance / layout.dp, width, budget)
    losses = 2 if step.variant == "topd" else 1  # the rollout terms, and the guidance KL
    training = _pass_seconds(student, train_tokens, train_mbs, train=True, recompute=layout.recompute == "full",
                             loss_calls=losses, **kw)
    if colocated:
        training += _pass_seconds(teacher, train_tokens, train_mbs, train=False, recompute=False, loss_calls=0, **kw)
    out.phases["training"] = training * bubble + device.optimizer_step_s
    out.phases["weight_sync"] = _sync_seconds(student, layout, step, device)
    # weights, Adam m and v, and an fp32 main copy when the weights are not fp32
    checkpoint_bytes = total_params(student) * (step.dtype_bytes + 8 + (4 if step.dtype_bytes < 4 else 0))
    save = device.checkpoint_call_s + student.num_layers / layout.pp * device.checkpoint_layer_s + \
        checkpoint_bytes / device.filesystem_bytes_per_s
    out.phases["checkpoint"] = save / step.save_interval
    return out


# A sync's admin calls, each a round trip from global rank 0 to every server at once (rollout/weight_sync/base.py,
# distributed.py `sync_model`): pause, begin_weight_update, end_weight_update, model_info, continue. The cache flush
# rides on a bucket's update call (flush_cache), not a call of its own.
SYNC_LIGHT_CALLS = 5
# The trainer's object collectives in `sync_model` and the loop's `sync_weights`: rank 0's go-ahead after begin, the
# stages' reports, the stats to every rank; each a size and a payload collective (torch's *_object_list).
SYNC_OBJECT_COLLECTIVES = 3


def _sync_seconds(student: ModelSpec, layout: Layout, step: TopdStep, device: DeviceProfile) -> float:
    """The per-stage push: rank 0's light calls, the trainer's object collectives and the rest of a sync; per stage
    (at once) one TP gather per split Megatron tensor of its layers (convert/mapping.py: QKV, projection, FC1, FC2;
    the embedding and output layer at the ends); then every stage's buckets in turn, each one update call, its
    broadcast and the server's load of its bytes."""
    maps = tensor_maps(student)
    weight_bytes = step.dtype_bytes * total_params(student)
    split = sum(m.tp != "replicated" for m in maps)
    per_layer = sum(m.tp != "replicated" for m in maps if m.megatron.startswith("decoder.layers.0."))
    ends = split - per_layer * student.num_layers
    gathers = per_layer * student.num_layers / layout.pp + math.ceil(ends / layout.pp) if layout.tp > 1 else 0
    objects = 2 * SYNC_OBJECT_COLLECTIVES if layout.gpus > 1 else 0
    buckets = layout.pp * math.ceil(weight_bytes / layout.pp / (step.sync_bucket_mb * 2**20))
    return (SYNC_LIGHT_CALLS * device.server_light_call_s + device.weight_sync_rest_s
            + (objects + gathers) * device.collective_latency_s + buckets * device.weight_update_call_s
            + weight_bytes / device.inter_node_bytes_per_s + weight_bytes / device.weight_load_bytes_per_s)
