"""The opt-in Triton kernels (MEGATRON_TOPD_LOSSES_BACKEND=triton) against the float64 reference and against the
torch path, run on CPU by Triton's interpreter (TRITON_INTERPRET=1) in a subprocess: the interpreter must be chosen
before the kernels are defined, and this pytest process has already imported them for the GPU.

The interpreter rounds fp32 -> bf16 toward zero (GPU stores round to nearest even), so bf16 gradients get 2^-7
instead of 2^-8 here; benchmarks/gpu_losses.py checks the GPU with the tight bound.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CASES = [("kl", {}), ("kl", {"direction": "forward", "temperature": 0.7}), ("opd_scores", {"temperature": 1.3}),
         ("log_probs", {}), ("entropy", {}), ("topk_kl", {}), ("topk_kl", {"direction": "forward"})]


def _interpreted() -> None:
    """Runs in the subprocess: print {case: {output: relative error}} as JSON."""
    from megatron_topd.losses import _dense, _triton, checking
    from megatron_topd.losses import _dense_math as dm

    assert _triton.triton is not None and _triton.backend(torch.zeros(1)) == "triton"
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        for vocab_size in (4200, 4100):  # BLOCK is 4096: two tiles a row, the second partial; then 100 padding ids
            p = checking.make_problem((2, 3), 4200, vocab_size, k=5, seed=3, dtype=dtype)
            for name, kw in CASES:
                got = checking.run_shard(p, name, dtype=dtype, **kw)
                want = checking.run_reference(p, name, dtype=dtype, **kw)
                report[f"{name} {kw} {vocab_size} {dtype}"] = {k: checking.rel_err(got[k], want[k]) for k in want}
    # A shard that is not the first (start > 0) with ids on and off it: the kernels against the torch chunk loop.
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 300, generator=g) * 3, torch.randn(5, 300, generator=g) * 3
    ids = torch.tensor([[310], [599], [300], [20], [450]])
    m_s, m_t = s.amax(-1) + 0.5, t.amax(-1) + 0.25  # as if another rank held the maxima
    for kl, entropy in ((None, False), ("reverse", True), ("forward", False)):
        teacher = t if kl else None
        spec = _dense.DenseSpec("test", _dense.VocabShard(None, 2, 1, 300, 600), kl, entropy, 0.8, 2, True)
        tri, lay_tri = _triton.local_sums(s, teacher, ids, m_s, m_t if kl else None, 1.25, 300, kl=kl, entropy=entropy)
        os.environ["MEGATRON_TOPD_LOSSES_BACKEND"] = "torch"
        ref, lay_ref = _dense._local_stats(s, teacher, ids, m_s, m_t if kl else None, spec, torch.float32)
        os.environ["MEGATRON_TOPD_LOSSES_BACKEND"] = "triton"
        report[f"local_sums {kl} {entropy}"] = {k: checking.rel_err(tri[:, lay_tri[k]], ref[:, lay_ref[k]]) for k in lay_ref}
        saved = dm.finish(ref, lay_ref, m_s, m_t if kl else None, kl=kl)
        grads = {k: torch.randn(5, generator=g) for k in ("kl", "entropy") if k in saved}
        grads["logp_s"] = torch.randn(5, 1, generator=g)
        saved = {k: v for k, v in saved.items() if k in ("lse_s", "lse_t", "kl", "entropy")}
        out_tri, out_ref = torch.empty(5, 300), torch.empty(5, 300)
        _triton.grad(s, teacher, ids, 300, 1.25, saved, grads, kl, out_tri)  # 1.25 = 1 / temperature
        os.environ["MEGATRON_TOPD_LOSSES_BACKEND"] = "torch"
        _dense._local_grad(s, teacher, ids, saved, grads, spec, out_ref)
        os.environ["MEGATRON_TOPD_LOSSES_BACKEND"] = "triton"
        report[f"grad {kl} {entropy}"] = {"grad": checking.rel_err(out_tri, out_ref)}
    print(json.dumps(report))


def test_triton_kernels_match_reference_and_torch_path_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", MEGATRON_TOPD_LOSSES_BACKEND="triton", OMP_NUM_THREADS="1",
               PYTHONPATH=str(ROOT))
    code = "import tests.unit.test_losses_triton as m; m._interpreted()"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(report) == 2 * 2 * len(CASES) + 6
    for case, errs in report.items():
        for key, err in errs.items():
            tol = 8e-3 if (key == "grad" and "bfloat16" in case) else 2e-6 if case.startswith(("local", "grad")) else 1e-5
            assert err <= tol, f"{case}: {key} relative error {err:.2e} > {tol:.0e}"
