"""One CUDA GPU, TP=1, bf16 logits [8192, 151936]: our KL and fused OPD scores (forward+backward; torch backend and,
when triton imports, the Triton kernels) vs the naive torch KL, each backend checked against a float64 reference on a
slice first, with achieved bandwidth against the card's own copy bandwidth. Exit code 0 only if everything passed.

    PYTHONPATH=. python benchmarks/gpu_losses.py            # about a minute on an H100/H200
    OUT=/some/dir PYTHONPATH=. python benchmarks/gpu_losses.py   # also writes $OUT/losses_gpu.json

Needs only torch (triton optional) and megatron_topd.losses importable. "bytes" is the traffic no implementation can
avoid: forward reads both bf16 logit tensors, backward reads them again and writes the bf16 gradient (5 x T x V x 2
bytes); achieved GB/s = bytes / time, compared with a device-to-device copy measured here (read + write bytes / time).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

GB = 1e9
DEVICE = "cuda"


def _timed(fn, reps: int) -> tuple[float, float]:
    """Median seconds of fn() over reps (after 2 warm-ups), and the peak extra GiB it allocated."""
    for _ in range(2):
        fn()
    if DEVICE == "cpu":  # --device cpu: a smoke run of this script, not a measurement
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times), float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times), (torch.cuda.max_memory_allocated() - base) / 2**30


def copy_bandwidth(nbytes: int = 4 << 30, reps: int = 20) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    seconds, _ = _timed(lambda: dst.copy_(src), reps)
    del src, dst
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return 2 * nbytes / seconds / GB


def naive_kl(student, teacher):
    """Full-vocabulary fp32 log_softmax of both, KL, autograd backward: what one writes first."""
    ls = torch.log_softmax(student.float(), -1)
    lt = torch.log_softmax(teacher.float(), -1)
    return (ls.exp() * (ls - lt)).sum(-1)


def _use(backend: str) -> None:
    os.environ["MEGATRON_TOPD_LOSSES_BACKEND"] = backend


_REFERENCES: dict = {}


def verify(vocab: int, rows: int, backend: str) -> dict:
    """Every loss, fp32 and bf16, against the float64 full-vocabulary reference on a [rows, vocab] slice."""
    from megatron_topd.losses import checking

    _use(backend)
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        problem = checking.make_problem((rows,), vocab, vocab - 36, k=20, seed=1, dtype=dtype)  # 36 padding ids
        for name, kw in [("kl", {}), ("kl", {"direction": "forward"}), ("opd_scores", {}), ("log_probs", {}),
                         ("entropy", {}), ("topk_kl", {})]:
            got = checking.run_shard(problem, name, dtype=dtype, device=DEVICE, **kw)
            key = (name, tuple(kw.items()), dtype)
            if key not in _REFERENCES:  # float64 on the host, once for all backends
                _REFERENCES[key] = checking.run_reference(problem, name, dtype=dtype, **kw)
            want = _REFERENCES[key]
            errs = {k: checking.rel_err(got[k], want[k]) for k in want}
            grad_tol = 4e-3 if dtype == torch.bfloat16 else 1e-5
            ok = all(e <= (grad_tol if k == "grad" else 1e-5) for k, e in errs.items())
            report[f"{backend} {name}{kw.get('direction', '') and '_' + kw['direction']} {str(dtype)[6:]}"] = {
                "max_rel_err": errs, "ok": ok}
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--verify-rows", type=int, default=64)
    ap.add_argument("--device", default="cuda", help="cpu = smoke-run this script with small sizes, no measurement")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print("gpu_losses.py needs CUDA: no GPU is visible to torch here, so there is nothing to measure "
              "(run it on the GPU machine: PYTHONPATH=. python benchmarks/gpu_losses.py)", file=sys.stderr)
        return 2
    from megatron_topd import losses

    t_start = time.time()
    name = torch.cuda.get_device_properties(0).name if DEVICE == "cuda" else "cpu (smoke run)"
    out = {"device": name, "torch": torch.__version__, "tokens": args.tokens, "vocab": args.vocab,
           "dtype": "bfloat16", "tp": 1}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["copy_GBps"] = copy_bandwidth() if DEVICE == "cuda" else copy_bandwidth(1 << 26, 3)
    print(f"{name}: device-to-device copy {out['copy_GBps']:.0f} GB/s (read + write)")

    backends = ["torch"] + (["triton"] if out["triton"] else [])
    out["verify"], out["errors"] = {}, {}
    for backend in list(backends):
        try:
            out["verify"].update(verify(args.vocab, args.verify_rows, backend))
        except Exception as e:  # noqa: BLE001 - a broken optional backend must not hide the torch figures
            out["errors"][backend] = repr(e)[-2000:]
            print(f"backend {backend} FAILED: {e!r}")
            backends.remove(backend)
    for name, r in out["verify"].items():
        print(f"verify {name:<29} {'ok ' if r['ok'] else 'FAIL'} " + " ".join(f"{k}={e:.1e}" for k, e in r["max_rel_err"].items()))

    T, V = args.tokens, args.vocab
    g = torch.Generator(device=DEVICE).manual_seed(0)
    student = (torch.randn(T, V, device=DEVICE, generator=g) * 2).to(torch.bfloat16).requires_grad_()
    teacher = (torch.randn(T, V, device=DEVICE, generator=g) * 2).to(torch.bfloat16)
    ids = torch.randint(0, V, (T,), device=DEVICE, generator=g)
    nbytes = 5 * T * V * 2

    def fwd_bwd(loss_fn):
        def run():
            student.grad = None
            loss_fn().sum().backward()
        return run

    methods = {}
    for backend in backends:
        methods[f"{backend}_kl"] = (backend, lambda: losses.vocab_parallel_kl(student, teacher))
        methods[f"{backend}_fused"] = (backend, lambda: losses.vocab_parallel_opd_scores(student, teacher, ids).reverse_kl)
    methods["naive_torch"] = ("torch", lambda: naive_kl(student, teacher))
    out["results"] = []
    for name, (backend, fn) in methods.items():
        _use(backend)
        try:
            seconds, extra = _timed(fwd_bwd(fn), args.reps)
        except Exception as e:  # noqa: BLE001
            out["errors"][name] = repr(e)[-2000:]
            print(f"{name} FAILED: {e!r}")
            continue
        r = {"method": name, "time_ms": seconds * 1e3, "bytes": nbytes, "achieved_GBps": nbytes / seconds / GB,
             "fraction_of_copy": nbytes / seconds / GB / out["copy_GBps"], "peak_extra_GiB": extra}
        out["results"].append(r)
        print(f"{name:<12} fwd+bwd {r['time_ms']:8.2f} ms  {r['achieved_GBps']:7.0f} GB/s "
              f"({100 * r['fraction_of_copy']:.0f}% of copy)  peak extra {extra:6.2f} GiB")
    with torch.no_grad():  # the timed runs must compute the same thing
        naive = naive_kl(student[:256], teacher[:256])
        for backend in backends:
            _use(backend)
            diff = float((losses.vocab_parallel_kl(student[:256], teacher[:256]) - naive).abs().max())
            out[f"{backend}_vs_naive_max_abs_diff"] = diff
            print(f"{backend} vs naive KL on 256 rows: max |diff| = {diff:.2e}")
    out["wall_s"] = time.time() - t_start
    print(f"total {out['wall_s']:.0f} s")
    if os.environ.get("OUT"):
        path = os.path.join(os.environ["OUT"], "losses_gpu.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {path}")
    return 0 if all(r["ok"] for r in out["verify"].values()) and not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
