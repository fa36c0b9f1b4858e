"""Per-chunk arithmetic of the full-vocabulary scores, for one rank's slice of the vocabulary (no collectives here).

Forward, for a chunk of rows: after the group-wide maxima M (MAX all-reduce), each rank forms base-2 shifted logits
a = (s/tau - M_s) * log2(e) (and b for the teacher) and the partial sums below; one SUM all-reduce of them gives the
full-vocabulary values, from which every per-token output follows exactly:

    Z_s = sum 2^a           log Z_s = the student's log-normaliser relative to M_s
    W_sa = sum 2^a a        entropy     H = log Z_s - ln2 * W_sa / Z_s
    W_d = sum 2^a (a - b)   reverse KL  KL(p||q) = ln2 * W_d / Z_s - log Z_s + log Z_t
    W_d = sum 2^b (a - b)   forward KL  KL(q||p) = -ln2 * W_d / Z_t + log Z_s - log Z_t
    a[id], b[id]            log-probs   log p(id) = ln2 * a[id] - log Z_s   (only the owning rank adds a nonzero)

Base 2 because exp2 is about twice as fast as exp on CPU and the scale folds into the shift for free. All [rows, n]
work happens in at most three preallocated fp32 buffers (`Workspace`), reused chunk after chunk.
Backward needs no collective: with the saved global per-token lse and KL, every term of the gradient is local.
"""
from __future__ import annotations

import torch

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


class Workspace:
    """`count` fp32 [rows, n] buffers allocated once per call; chunk c uses the views [:c] (still contiguous)."""

    def __init__(self, count: int, rows: int, n: int, dtype: torch.dtype, device: torch.device):
        self.bufs = [torch.empty(rows, n, dtype=dtype, device=device) for _ in range(count)]

    def views(self, rows: int) -> list[torch.Tensor]:
        return [b[:rows] for b in self.bufs]


def local_max(x: torch.Tensor, inv_tau: float, dtype: torch.dtype) -> torch.Tensor:
    """Row maxima of x / tau over this rank's real columns (-inf for a rank holding only padding)."""
    if x.shape[-1] == 0:
        return torch.full(x.shape[:-1], float("-inf"), dtype=dtype, device=x.device)
    return x.amax(dim=-1).to(dtype).mul_(inv_tau)


def shifted2(x: torch.Tensor, m: torch.Tensor, inv_tau: float, out: torch.Tensor) -> torch.Tensor:
    """(x/tau - m) * log2(e) in the compute dtype, in one pass (bf16 input is promoted on the fly)."""
    return torch.add((m * -LOG2E).unsqueeze(-1), x, alpha=inv_tau * LOG2E, out=out)


def gather_local(x: torch.Tensor, ids: torch.Tensor, start: int) -> torch.Tensor:
    """x[row, id - start] where this rank owns the id, else 0; ids is [rows, k] of global ids."""
    n = x.shape[-1]
    if n == 0:
        return torch.zeros(ids.shape, dtype=x.dtype, device=x.device)
    local = ids - start
    owned = (local >= 0) & (local < n)
    return torch.where(owned, x.gather(-1, local.clamp(0, n - 1)), torch.zeros((), dtype=x.dtype, device=x.device))


def buffers_needed(has_teacher: bool, entropy: bool) -> int:
    return 3 if (has_teacher or entropy) else 1


def local_sums(s, t, ids, m_s, m_t, inv_tau, start, ws: list, *, kl, entropy):
    """This rank's partial sums for one chunk as columns of one [rows, k] tensor; returns (stats, layout) where
    layout maps each name to its column slice. `ws` holds buffers_needed(...) workspace views of shape [rows, n]."""
    cols: dict[str, torch.Tensor] = {}
    a = shifted2(s, m_s, inv_tau, ws[0])
    if t is not None:
        b = shifted2(t, m_t, inv_tau, ws[1])
    if ids is not None:
        cols["a_ids"] = gather_local(a, ids, start)
        if t is not None:
            cols["b_ids"] = gather_local(b, ids, start)
    if t is not None:
        e = torch.exp2(b, out=ws[2])
        cols["z_t"] = e.sum(-1)
        d = torch.sub(a, b, out=b)  # b is no longer needed: d = a - b
        if kl == "forward":
            cols["w_d"] = d.mul_(e).sum(-1)
        e = torch.exp2(a, out=ws[2])
        cols["z_s"] = e.sum(-1)
        if kl == "reverse":
            cols["w_d"] = d.mul_(e).sum(-1)
        if entropy:
            cols["w_sa"] = a.mul_(e).sum(-1)
    elif entropy:
        e = torch.exp2(a, out=ws[1])
        cols["z_s"] = e.sum(-1)
        cols["w_sa"] = a.mul_(e).sum(-1)
    else:
        # Log-probs alone read no weighted sum over the row; this sum makes any NaN/Inf logit visible.
        cols["sentinel"] = a.sum(-1)
        cols["z_s"] = a.exp2_().sum(-1)
    layout, at = {}, 0
    for name, v in cols.items():
        width = v.shape[-1] if v.dim() == 2 else 1
        layout[name] = slice(at, at + width)
        at += width
    return torch.cat([v if v.dim() == 2 else v.unsqueeze(-1) for v in cols.values()], dim=-1), layout


def finish(stats, layout, m_s, m_t, *, kl):
    """Per-token outputs and the scalars backward needs, from the group-wide sums of one chunk."""
    col = lambda name: stats[:, layout[name]].squeeze(-1)  # noqa: E731
    z_s = col("z_s")
    log_zs = z_s.log()
    out = {"lse_s": m_s + log_zs}
    if "z_t" in layout:
        z_t = col("z_t")
        log_zt = z_t.log()
        out["lse_t"] = m_t + log_zt
    if "w_sa" in layout:
        out["entropy"] = log_zs - LN2 * col("w_sa") / z_s
    if kl == "reverse":
        out["kl"] = LN2 * col("w_d") / z_s - log_zs + log_zt
    elif kl == "forward":
        out["kl"] = -LN2 * col("w_d") / z_t + log_zs - log_zt
    if "a_ids" in layout:
        out["logp_s"] = LN2 * stats[:, layout["a_ids"]] - log_zs.unsqueeze(-1)
    if "b_ids" in layout:
        out["logp_t"] = LN2 * stats[:, layout["b_ids"]] - log_zt.unsqueeze(-1)
    return out


def grad_chunk(s, t, ids, start, inv_tau, saved, grads, kl, ws: list, out):
    """Write d(sum_outputs grad * output)/d(student logits) for one chunk into `out` ([rows, n_valid]).

    With L_s = log p, L_t = log q (both at temperature tau) and p, q the softmaxes:
      reverse KL: p (L_s - L_t - KL)     forward KL: p - q     entropy: -p (L_s + H)     log p(id): onehot(id) - p
    each times 1/tau. p is recomputed from the saved lse; nothing [rows, V] was kept from the forward.
    `ws` holds 2 workspace views (3 for the forward KL).
    """
    g_kl, g_h, g_lp = grads.get("kl"), grads.get("entropy"), grads.get("logp_s")
    l2 = shifted2(s, saved["lse_s"], inv_tau, ws[0])  # log2 p
    p = torch.exp2(l2, out=ws[1])
    if kl == "reverse" and g_h is None and g_lp is None:
        # The trainer's hot path: log2(e) (L_s - L_t - KL) = l2 - log2(e) t/tau - log2(e) (KL - lse_t).
        coef = l2.add_(t, alpha=-inv_tau * LOG2E).sub_(((saved["kl"] - saved["lse_t"]) * LOG2E).unsqueeze(-1))
        torch.mul(coef.mul_(p), (g_kl * (LN2 * inv_tau)).unsqueeze(-1), out=out)
        return
    zero = torch.zeros_like(saved["lse_s"])
    g_kl_r = g_kl if (g_kl is not None and kl == "reverse") else zero
    g_kl_f = g_kl if (g_kl is not None and kl == "forward") else zero
    g_h = zero if g_h is None else g_h
    # coef = (g_kl_r - g_h) L_s - g_kl_r L_t + const, with L_s = ln2 * l2 and L_t = t/tau - lse_t.
    const = g_kl_f - (zero if g_lp is None else g_lp.sum(-1))
    if "entropy" in saved:
        const = const - g_h * saved["entropy"]
    if kl == "reverse":
        const = const + g_kl_r * (saved["lse_t"] - saved["kl"])
    coef = l2.mul_(((g_kl_r - g_h) * LN2).unsqueeze(-1)).add_(const.unsqueeze(-1))
    if kl == "reverse":
        coef.addcmul_(t, (-g_kl_r * inv_tau).unsqueeze(-1).to(coef.dtype))
    coef.mul_(p)
    if kl == "forward":
        q = torch.exp2(shifted2(t, saved["lse_t"], inv_tau, ws[2]), out=ws[2])
        coef.addcmul_(q, (-g_kl_f).unsqueeze(-1))
    if g_lp is not None and coef.shape[-1]:
        local = ids - start
        owned = (local >= 0) & (local < coef.shape[-1])
        coef.scatter_add_(-1, local.clamp(0, coef.shape[-1] - 1), torch.where(owned, g_lp, torch.zeros_like(g_lp)))
    torch.mul(coef, inv_tau, out=out)
