"""Triton kernels for the two [T, V_local] passes of DenseScores on CUDA: partial sums (forward) and the gradient.

Why: the torch path makes ~15 passes over fp32 [chunk, V] buffers; these kernels read each bf16/fp32 logit once per
pass and keep everything else in registers, so the loss runs near the card's memory bandwidth and needs no workspace.
They compute exactly the torch path's quantities (see _dense_math: same base-2 shift by the group-wide maxima, same
per-row statistics, same per-row gradient coefficients), so collectives, finish() and the per-token outputs are
shared. Opt-in: MEGATRON_TOPD_LOSSES_BACKEND=triton (see backend()); the torch path stays the CPU path and reference.
Tested on CPU with TRITON_INTERPRET=1 (tests/unit/test_losses_triton.py).
"""
from __future__ import annotations

import os

import torch

from megatron_topd.losses._dense_math import LN2, LOG2E

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is optional
    triton = None

BLOCK = 4096
NUM_WARPS = 8
KL_NONE, KL_REVERSE, KL_FORWARD = 0, 1, 2


def backend(x: torch.Tensor) -> str:
    """MEGATRON_TOPD_LOSSES_BACKEND: 'auto' (default: Triton for GPU tensors when triton imports, torch otherwise),
    'triton' (required: error when triton is missing) or 'torch' (the reference path, always used on CPU).

    Why auto picks Triton on GPUs: on an H200, bf16 [8192, 151936] KL forward+backward took 5.5 ms with the Triton
    kernels (53% of copy bandwidth) against 53 ms for the torch path, both verified against float64 there."""
    want = os.environ.get("MEGATRON_TOPD_LOSSES_BACKEND", "auto")
    if want not in ("auto", "torch", "triton"):
        raise ValueError(f"MEGATRON_TOPD_LOSSES_BACKEND={want!r}; use 'auto' (default), 'torch' or 'triton'")
    if want == "torch":
        return "torch"
    if want == "auto":
        return "triton" if triton is not None and x.is_cuda else "torch"
    if triton is None:
        raise RuntimeError("MEGATRON_TOPD_LOSSES_BACKEND=triton but triton is not importable; install triton or unset it")
    if x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"  # CPU tensors always take the torch path


if triton is not None:

    @triton.jit
    def _stats_kernel(S, T, MS, MT, OUT, n, stride_s, stride_t, stride_o, k2,
                      HAS_T: tl.constexpr, KL: tl.constexpr, ENTROPY: tl.constexpr, SENTINEL: tl.constexpr,
                      COL_WA: tl.constexpr, BLOCK: tl.constexpr):
        # Per row: z_s, [z_t], [w_d], [w_sa | sentinel] of _dense_math.local_sums, in that column order.
        row = tl.program_id(0).to(tl.int64)
        ms2 = tl.load(MS + row) * 1.4426950408889634
        zs = tl.zeros([BLOCK], dtype=tl.float32)
        zt = tl.zeros([BLOCK], dtype=tl.float32)
        wd = tl.zeros([BLOCK], dtype=tl.float32)
        wa = tl.zeros([BLOCK], dtype=tl.float32)
        if HAS_T:
            mt2 = tl.load(MT + row) * 1.4426950408889634
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            a = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32) * k2 - ms2
            a = tl.where(mask, a, 0.0)
            e = tl.where(mask, tl.exp2(a), 0.0)
            zs += e
            if ENTROPY:
                wa += e * a
            if SENTINEL:
                wa += a
            if HAS_T:
                b = tl.load(T + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32) * k2 - mt2
                b = tl.where(mask, b, 0.0)
                f = tl.where(mask, tl.exp2(b), 0.0)
                zt += f
                if KL == 1:
                    wd += e * (a - b)
                if KL == 2:
                    wd += f * (a - b)
        tl.store(OUT + row * stride_o, tl.sum(zs, axis=0))
        if HAS_T:
            tl.store(OUT + row * stride_o + 1, tl.sum(zt, axis=0))
            if KL != 0:
                tl.store(OUT + row * stride_o + 2, tl.sum(wd, axis=0))
        if ENTROPY or SENTINEL:
            tl.store(OUT + row * stride_o + COL_WA, tl.sum(wa, axis=0))

    @triton.jit
    def _grad_kernel(S, T, G, LSE_S, LSE_T, ALPHA, BETA, GAMMA, DELTA, IDS, GIDS, n, stride_s, stride_t, stride_g,
                     stride_ids, k2, HAS_T: tl.constexpr, FORWARD: tl.constexpr, K: tl.constexpr,
                     BLOCK: tl.constexpr):
        # grad = p (alpha l2 + beta t + gamma) + delta q + sum_i g_i onehot(id_i), l2 = log2 p, per row scalars.
        row = tl.program_id(0).to(tl.int64)
        ls2 = tl.load(LSE_S + row) * 1.4426950408889634
        alpha = tl.load(ALPHA + row)
        gamma = tl.load(GAMMA + row)
        if HAS_T:
            beta = tl.load(BETA + row)
            lt2 = tl.load(LSE_T + row) * 1.4426950408889634
        if FORWARD:
            delta = tl.load(DELTA + row)
        for start in range(0, n, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n
            l2 = tl.load(S + row * stride_s + cols, mask=mask, other=0.0).to(tl.float32) * k2 - ls2
            p = tl.exp2(l2)
            coef = alpha * l2 + gamma
            if HAS_T:
                y = tl.load(T + row * stride_t + cols, mask=mask, other=0.0).to(tl.float32)
                coef += beta * y
            g = p * coef
            if FORWARD:
                g += delta * tl.exp2(y * k2 - lt2)
            for i in tl.static_range(K):
                g += tl.where(cols == tl.load(IDS + row * stride_ids + i), tl.load(GIDS + row * stride_ids + i), 0.0)
            tl.store(G + row * stride_g + cols, g.to(G.dtype.element_ty), mask=mask)


def local_sums(s, t, ids, m_s, m_t, inv_tau, start, *, kl, entropy):
    """Triton twin of _dense_math.local_sums for all rows at once: (stats [T, width], layout)."""
    from megatron_topd.losses._dense_math import gather_local

    T, n = s.shape[0], s.shape[1]
    names = ["z_s"] + (["z_t"] if t is not None else []) + (["w_d"] if (t is not None and kl) else [])
    sentinel = t is None and not entropy
    names += ["w_sa"] if entropy else (["sentinel"] if sentinel else [])
    cols: dict[str, torch.Tensor] = {}
    k2 = inv_tau * LOG2E
    if ids is not None:  # tiny [T, k] gathers: the same arithmetic as the torch path, on the raw logits
        cols["a_ids"] = gather_local(s, ids, start).to(m_s.dtype) * k2 - (m_s * LOG2E).unsqueeze(-1)
        if t is not None:
            cols["b_ids"] = gather_local(t, ids, start).to(m_s.dtype) * k2 - (m_t * LOG2E).unsqueeze(-1)
        owned = (ids - start >= 0) & (ids - start < n)
        cols = {k: torch.where(owned, v, 0.0) for k, v in cols.items()}
    out = torch.zeros((T, len(names)), dtype=torch.float32, device=s.device)
    if T and n:
        _stats_kernel[(T,)](
            s, t if t is not None else s, m_s.float().contiguous(), (m_t if m_t is not None else m_s).float().contiguous(),
            out, n, s.stride(0), (t if t is not None else s).stride(0), out.stride(0), k2,
            HAS_T=t is not None, KL={None: KL_NONE, "reverse": KL_REVERSE, "forward": KL_FORWARD}[kl],
            ENTROPY=entropy, SENTINEL=sentinel, COL_WA=len(names) - 1, BLOCK=BLOCK, num_warps=NUM_WARPS,
        )
    layout, at, parts = {}, 0, []
    for name, v in cols.items():
        layout[name] = slice(at, at + v.shape[-1])
        at += v.shape[-1]
        parts.append(v.float())
    for i, name in enumerate(names):
        layout[name] = slice(at + i, at + i + 1)
    return torch.cat(parts + [out], dim=-1), layout


def grad(student, teacher, ids, start, inv_tau, saved, grads, kl, out):
    """Triton twin of the chunk loop of DenseScores.backward: writes the gradient of all rows into out[:, :n]."""
    T, n = student.shape[0], out.shape[1]
    if not (T and n):
        return
    zero = torch.zeros_like(saved["lse_s"])
    g_kl, g_h, g_lp = grads.get("kl"), grads.get("entropy"), grads.get("logp_s")
    g_r = g_kl if (g_kl is not None and kl == "reverse") else zero
    g_f = g_kl if (g_kl is not None and kl == "forward") else zero
    g_h = zero if g_h is None else g_h
    const = g_f - (zero if g_lp is None else g_lp.sum(-1))
    if "entropy" in saved:
        const = const - g_h * saved["entropy"]
    if kl == "reverse":
        const = const + g_r * (saved["lse_t"] - saved["kl"])
    alpha = ((g_r - g_h) * (LN2 * inv_tau)).float().contiguous()
    beta = (-g_r * inv_tau * inv_tau).float().contiguous()
    gamma = (const * inv_tau).float().contiguous()
    delta = (-g_f * inv_tau).float().contiguous()
    K = 0 if ids is None or g_lp is None else ids.shape[1]
    if K:
        local = ids - start
        local = torch.where((local >= 0) & (local < n), local, -1).contiguous()
        gids = (g_lp * inv_tau).float().contiguous()
    else:
        local = gids = alpha  # unused
    has_t = teacher is not None and kl is not None
    _grad_kernel[(T,)](
        student, teacher if has_t else student, out, saved["lse_s"].float().contiguous(),
        saved.get("lse_t", saved["lse_s"]).float().contiguous(), alpha, beta, gamma, delta, local, gids, n,
        student.stride(0), (teacher if has_t else student).stride(0), out.stride(0), local.stride(0) if K else 0,
        inv_tau * LOG2E, HAS_T=has_t, FORWARD=kl == "forward",
        K=K, BLOCK=BLOCK, num_warps=NUM_WARPS,
    )
