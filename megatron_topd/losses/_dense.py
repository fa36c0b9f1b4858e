"""The one autograd.Function behind the full-vocabulary scores (KL, log-probs, entropy and the fused call).

Why an explicit backward: the forward combines shards with all-reduces, and autograd through an in-place all-reduce
gives each rank only its local share of the gradient (DESIGN section 7). Here backward uses the saved group-wide
per-token scalars (lse_s, lse_t, KL, H), so each rank's gradient is exact and needs no communication at all.

Memory: forward and backward walk the tokens in chunks through at most three fp32 [chunk, V_local] work buffers,
allocated once per call and reused by every chunk. Saved for backward: the input shards (which exist anyway) and
per-token scalars.

Communication, forward only, two collectives per call whatever the number of chunks: a MAX all-reduce of the row
maxima [T, 1 or 2] before the chunk loop, and a SUM all-reduce of the partial sums [T, n_stats] after it
(n_stats <= 3 + 2k: normalisers, the entropy and KL sums or a NaN sentinel, the k gathered logits per model).
The chunk loop itself is local, so the collectives' latency is paid twice per call, not twice per chunk.
Backward: no communication.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_topd.losses import _checks, _comm, _triton
from megatron_topd.losses import _dense_math as dm
from megatron_topd.losses._chunks import chunk_rows
from megatron_topd.losses._shard import VocabShard, vocab_shard


@dataclass(frozen=True)
class DenseSpec:
    fn: str  # public function name, for error messages
    shard: VocabShard
    kl: str | None  # None, "reverse" or "forward"
    entropy: bool
    temperature: float
    rows: int  # tokens per chunk
    check_finite: bool
    lead: tuple = ()  # the caller's token shape (logits.shape[:-1]), to name a bad token in its own coordinates

    def outputs(self, has_teacher: bool, has_ids: bool) -> list[str]:
        names = (["kl"] if self.kl else []) + (["entropy"] if self.entropy else [])
        return names + (["logp_s"] if has_ids else []) + (["logp_t"] if has_ids and has_teacher else [])


class DenseScores(torch.autograd.Function):
    """student [T, V_local], teacher [T, V_local] or None, ids [T, k] or None -> the outputs named by spec.outputs."""

    @staticmethod
    def forward(ctx, student, teacher, ids, spec: DenseSpec):
        shard, inv_tau, dtype = spec.shard, 1.0 / spec.temperature, _checks.compute_dtype(student)
        n, T = shard.n_valid, student.shape[0]
        names = spec.outputs(teacher is not None, ids is not None)
        # 1. Group-wide row maxima of both models for all tokens: one MAX all-reduce of [T, 1 or 2].
        maxima = [dm.local_max(student[:, :n], inv_tau, dtype)]
        if teacher is not None:
            maxima.append(dm.local_max(teacher[:, :n], inv_tau, dtype))
        m = _comm.all_reduce_max_(torch.stack(maxima, dim=-1), shard)
        m_s, m_t = m[:, 0], (m[:, 1] if teacher is not None else None)
        # 2. Local partial sums, chunk by chunk: no communication inside the loop.
        stats, layout = _local_stats(student[:, :n], None if teacher is None else teacher[:, :n], ids, m_s, m_t, spec,
                                     dtype)
        # 3. One SUM all-reduce of the [T, n_stats] partial sums; every output follows per token.
        _comm.all_reduce_sum_(stats, shard)
        result = dm.finish(stats, layout, m_s, m_t, kl=spec.kl)
        if spec.check_finite and not bool(torch.isfinite(stats).all()):  # one host sync per call
            bad = ~torch.isfinite(stats).all(dim=-1)
            local = {"student": student[:, :n]} | ({"teacher": teacher[:, :n]} if teacher is not None else {})
            _checks.raise_nonfinite(spec.fn, bad, spec.lead or (T,), local)
        ctx.spec, ctx.names = spec, names
        ctx.set_materialize_grads(False)
        saved_names = [k for k in ("lse_s", "lse_t", "kl", "entropy") if k in result]
        ctx.saved_names = saved_names
        ctx.save_for_backward(student, teacher, ids, *[result[k] for k in saved_names])
        if "logp_t" in result:
            ctx.mark_non_differentiable(result["logp_t"])
        return tuple(result[k] for k in names)

    @staticmethod
    def backward(ctx, *grad_outputs):
        spec = ctx.spec
        student, teacher, ids, *scalars = ctx.saved_tensors
        grads = {k: g for k, g in zip(ctx.names, grad_outputs) if g is not None and k != "logp_t"}
        if not grads or not ctx.needs_input_grad[0]:
            return None, None, None, None
        saved = dict(zip(ctx.saved_names, scalars))
        n = spec.shard.n_valid
        grad = torch.empty_like(student)
        if n < student.shape[1]:
            grad[:, n:] = 0  # Megatron's padding ids: in neither distribution
        _local_grad(student[:, :n], None if teacher is None else teacher[:, :n], ids, saved, grads, spec, grad[:, :n])
        return grad, None, None, None


def _local_stats(s, t, ids, m_s, m_t, spec: DenseSpec, dtype):
    """[T, n_stats] partial sums of this rank's real columns `s`/`t` ([T, n]) and their layout."""
    if _use_triton(s, t, dtype):
        return _triton.local_sums(s, t, ids, m_s, m_t, 1.0 / spec.temperature, spec.shard.start, kl=spec.kl,
                                  entropy=spec.entropy)
    T, stats, layout = s.shape[0], None, None
    work = dm.Workspace(dm.buffers_needed(t is not None, spec.entropy), min(spec.rows, T), s.shape[1], dtype, s.device)
    for r0 in range(0, T or 1, spec.rows):  # T == 0 still runs one empty chunk, to learn the layout
        r1 = min(T, r0 + spec.rows)
        part, layout = dm.local_sums(
            s[r0:r1], None if t is None else t[r0:r1], None if ids is None else ids[r0:r1], m_s[r0:r1],
            None if m_t is None else m_t[r0:r1], 1.0 / spec.temperature, spec.shard.start, work.views(r1 - r0),
            kl=spec.kl, entropy=spec.entropy,
        )
        if stats is None:
            stats = torch.empty((T, part.shape[-1]), dtype=dtype, device=s.device)
        stats[r0:r1] = part
    return stats, layout


def _local_grad(s, t, ids, saved, grads, spec: DenseSpec, out) -> None:
    """Write the gradient of this rank's real columns ([T, n]) into `out`, chunk by chunk."""
    dtype = _checks.compute_dtype(s)
    if _use_triton(s, t, dtype):
        _triton.grad(s, t, ids, spec.shard.start, 1.0 / spec.temperature, saved, grads, spec.kl, out)
        return
    T = s.shape[0]
    work = dm.Workspace(3 if spec.kl == "forward" else 2, min(spec.rows, T), s.shape[1], dtype, s.device)
    for r0 in range(0, T, spec.rows):
        r1 = min(T, r0 + spec.rows)
        dm.grad_chunk(
            s[r0:r1], None if t is None else t[r0:r1], None if ids is None else ids[r0:r1], spec.shard.start,
            1.0 / spec.temperature, {k: v[r0:r1] for k, v in saved.items()}, {k: g[r0:r1] for k, g in grads.items()},
            spec.kl, work.views(r1 - r0), out[r0:r1],
        )


def _use_triton(student, teacher, dtype) -> bool:
    """The Triton kernels (opt-in, see _triton.backend) handle fp32 arithmetic on rows with unit column stride."""
    ok = dtype == torch.float32 and student.stride(-1) == 1 and (teacher is None or teacher.stride(-1) == 1)
    return ok and _triton.backend(student) == "triton"


def dense_scores(fn, student, teacher, token_ids, *, group, vocab_size, temperature, chunk_size, check_finite,
                 kl=None, entropy=False) -> dict[str, torch.Tensor]:
    """Validate, flatten to [T, V_local], run DenseScores, reshape back; returns {output name: tensor}."""
    _checks.logits(fn, "student_logits" if teacher is not None else "logits", student)
    if teacher is not None:
        _checks.logits(fn, "teacher_logits", teacher)
        _checks.same_shards(fn, student, teacher)
    tau = _checks.temperature(fn, temperature)
    if not isinstance(check_finite, bool):
        raise TypeError(f"{fn}: check_finite must be True or False, got {check_finite!r}")
    v_local, lead = student.shape[-1], tuple(student.shape[:-1])
    shard = vocab_shard(fn, v_local, group, vocab_size)
    ids2d = None
    if token_ids is not None:
        _checks.token_ids(fn, "token_ids", token_ids, lead, shard.vocab_size, student.device)
        ids2d = token_ids.reshape(-1, 1).long()
    spec = DenseSpec(fn, shard, kl, entropy, tau, chunk_rows(fn, chunk_size, v_local, student.device), check_finite,
                     lead)
    outs = DenseScores.apply(
        student.reshape(-1, v_local), None if teacher is None else teacher.reshape(-1, v_local), ids2d, spec
    )
    names = spec.outputs(teacher is not None, token_ids is not None)
    return {k: v.reshape(lead) for k, v in zip(names, outs)}

