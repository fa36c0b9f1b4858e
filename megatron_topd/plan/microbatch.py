"""Activation peak of one pipeline stage for one training microbatch shape, as the maximum of two moments.

(A) end of the last in-flight forward, loss running: every in-flight microbatch's saved activations + (last stage)
    the logits, their gradient and the loss's chunk workspace;
(B) backward of a layer: every saved activation + what recompute rebuilds for that layer + the attention backward's
    transient gradients (unfused attention: two heads x S^2 tensors).
Other stages also keep each in-flight microbatch's output tensor for its backward (the pipeline's send buffer).
The test (tests/distributed/test_plan_activations.py) checks (A)/(B) against allocator traces on CPU, within the
errors measured per sequence length (at most 4% for S <= 256, 13% for S = 512) plus two points.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan import logits as lg
from megatron_topd.plan.activations import layer_activations
from megatron_topd.plan.param_shapes import padded_vocab


@dataclass(frozen=True)
class MicrobatchShape:
    tokens: int  # padded tokens of one microbatch (rows x S), before context parallelism
    rows: int = 1
    seq: int | None = None  # longest row (S); default tokens // rows

    @property
    def row_len(self) -> int:
        return self.seq or self.tokens // self.rows


@dataclass(frozen=True)
class StageActivations:
    saved: float  # in-flight microbatches' activations (+ pipeline output tensors)
    loss: float  # (A) logits + gradient + chunk workspace (last stage)
    backward: float  # (B) recompute + attention backward transients
    final_norm: float  # last stage: final norm's saved tensors

    @property
    def peak(self) -> float:
        return self.saved + self.final_norm + max(self.loss, self.backward)


def stage_activations(spec: ModelSpec, mb: MicrobatchShape, *, layers: int, in_flight: int, first: bool, last: bool,
                      tp: int = 1, sp: bool = False, cp: int = 1, recompute: str = "none", profile: str = "te_flash",
                      act_bytes: int = 2, loss_chunk: int | None = None, fused_swiglu: bool | None = None
                      ) -> StageActivations:
    tokens = mb.tokens // cp  # context parallelism splits every sequence over cp ranks
    rows, seq = mb.rows, mb.row_len
    layer = layer_activations(spec, tp=tp, sp=sp, recompute=recompute, profile=profile, act_bytes=act_bytes,
                              fused_swiglu=fused_swiglu)
    rep = tp if sp else 1
    h = spec.hidden_size
    per_mb = layers * layer.saved(tokens, rows, seq)
    if first:
        per_mb += 8 * tokens  # int64 token ids kept by the embedding's backward
    if not last:
        per_mb += tokens * h * act_bytes / rep  # output tensor kept until its backward
    saved = in_flight * per_mb
    backward = layer.rebuilt(tokens, rows, seq) + layer.backward_transient(tokens, rows, seq)
    loss = final_norm = 0.0
    if last:
        v = padded_vocab(spec.vocab_size) // tp
        loss = lg.student_logits(tokens, v) + lg.logits_gradient(tokens, v) + lg.loss_chunk_workspace(tokens, v, loss_chunk)
        norm_terms = (3 * h + 1) if profile == "local_unfused" else 2 * h / rep
        final_norm = tokens * norm_terms * act_bytes
    return StageActivations(saved=saved, loss=loss, backward=backward, final_norm=final_norm)
