"""GPU acceptance run (issue 28): the paths the CPU cannot reach, one function per stage, one JSON per stage.

    python scripts/gpu_acceptance.py --stage te_step --out gpu_out      (scripts/gpu_acceptance.sh runs them all)

Stages (each writes ``<out>/<stage>.json`` with ``status``: ok | failed | skipped, and ``reason`` when not ok):
  setup      device, driver, versions, what gpu_acceptance.sh installed and how long it took, FP8 validation
  te_step    a Transformer Engine layer-spec student at TP1 (Qwen3-1.7B's shape, S=8k): one training step in bf16,
             FP8 hybrid with delayed scaling and with current (tensorwise) scaling: loss difference, step time, memory
  planner    the planner's predictions (megatron_topd.plan.predict_layout) per term against te_step's measured memory
  losses     benchmarks/gpu_losses.py: KL fwd+bwd bandwidth against the card's copy bandwidth
  probe      benchmarks/bench_probe.py's trainer-side probe at its paper-shaped defaults, embedding table on the GPU
  topd_step  the scoring pass + training pass of one TOPD step (train.loop.score_replica / train_on_replica) on
             synthetic rollouts with a co-located teacher, no SGLang: bf16 vs FP8

Without CUDA every stage records status "skipped" with a reason that says it needs CUDA (the planner stage still
records its predictions: they are computed on the CPU) and exits 0: the dry run tests/unit/test_gpu_acceptance_dryrun.py
runs in CI. A stage that needs Transformer Engine and finds none is skipped with TE's import error and what to carry.
docs/gpu_acceptance.md: how to run it on a lent H100/H200 and each figure's CPU-side prediction.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STAGES = ("setup", "te_step", "planner", "losses", "probe", "topd_step")
SEQ = 8192  # te_step's sequence length (one row per microbatch)
# The FP8 runs: TE's "delayed" recipe and current scaling, which Megatron-Core calls "tensorwise".
PRECISIONS = {"bf16": {}, "fp8_delayed": {"fp8": "hybrid", "fp8_recipe": "delayed"},
              "fp8_current": {"fp8": "hybrid", "fp8_recipe": "tensorwise"}}
GOALS = {"fp8_step_speedup": 1.3, "kl_fraction_of_copy": 0.70, "probe_speedup": 5.0}
GIB = 2**30


class Skip(Exception):
    """A stage that cannot run here; its message is the JSON's reason."""


def student_spec():
    """Qwen3-1.7B's published shape (1.72B parameters, tied embeddings, q/k norm): the 1-2B student of issue 28."""
    from megatron_topd.models import ModelSpec

    return ModelSpec(vocab_size=151936, hidden_size=2048, num_layers=28, num_attention_heads=16, num_kv_heads=8,
                     head_dim=128, ffn_hidden_size=6144, max_position_embeddings=40960, rope_theta=1e6, qk_norm=True,
                     tie_word_embeddings=True, family="qwen3")


# ---- what every stage needs ---------------------------------------------------------------------------------------
def cuda_missing() -> str | None:
    """None where torch sees a GPU, else the reason every stage records."""
    import torch

    if torch.cuda.is_available():
        return None
    return (f"needs CUDA: torch {torch.__version__} sees no GPU here (torch.cuda.is_available() is False); "
            "run scripts/gpu_acceptance.sh on an H100/H200 (docs/gpu_acceptance.md)")


def need_cuda() -> None:
    why = cuda_missing()
    if why:
        raise Skip(why)


def need_transformer_engine() -> None:
    from megatron_topd.models.precision import transformer_engine_available

    ok, why = transformer_engine_available()
    if not ok:
        raise Skip(f"needs Transformer Engine (import failed: {why}); put transformer_engine_cu13-*.whl (or its "
                   "split .part-* files), transformer_engine-*.whl and transformer_engine_torch-*.whl or its sdist "
                   "in gpu_wheels/ (docs/gpu_acceptance.md)")


def init_single_gpu(seed: int = 3):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    from megatron_topd import parallel

    return parallel.initialize(1, 1, seed=seed)


def device_info() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    return {"device": p.name, "capability": list(torch.cuda.get_device_capability()),
            "memory_gib": round(p.total_memory / GIB, 2), "torch": torch.__version__, "cuda": torch.version.cuda}


def cuda_sync():
    import torch

    torch.cuda.synchronize()


def free_cuda():
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def start_run(precision, runs: dict, name: str) -> int | None:
    """Before one precision's measurement: None (and ``runs[name]`` says why) when this GPU/stack cannot run it,
    else the allocated bytes to measure from, after freeing the previous run's memory and its peak."""
    import torch

    try:
        precision.validate()
    except RuntimeError as exc:
        runs[name] = {"status": "skipped", "reason": str(exc)}
        return None
    free_cuda()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def memory_snapshot() -> dict:
    """Bytes: allocated and reserved by torch, their peaks, and what the device as a whole has in use."""
    import torch

    free, total = torch.cuda.mem_get_info()
    return {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
            "max_allocated": torch.cuda.max_memory_allocated(), "max_reserved": torch.cuda.max_memory_reserved(),
            "device_used": total - free, "device_total": total}


def read_stage(out: Path, stage: str) -> dict:
    path = out / f"{stage}.json"
    return json.loads(path.read_text()) if path.is_file() else {"status": "missing", "reason": f"no {path}"}


# ---- stage: setup -------------------------------------------------------------------------------------------------
def stage_setup(args) -> dict:
    """What the machine has, what gpu_acceptance.sh installed (install.tsv), and FP8 validation per recipe."""
    import platform

    out = {"python": platform.python_version(), "install": _read_install(args.out), "wheels": _wheels(args.wheels)}
    import torch

    out["torch"] = torch.__version__
    why = cuda_missing()
    if why:
        return {**out, "status": "skipped", "reason": why}
    out.update(device_info())
    out["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"])
    out["nvcc"] = (_run(["nvcc", "--version"]).strip().splitlines() or [None])[-1]
    for name in ("triton", "megatron.core", "transformer_engine", "ot"):
        try:
            mod = __import__(name, fromlist=["__version__"])
            out[name] = getattr(mod, "__version__", "importable")
        except Exception as exc:  # noqa: BLE001 - report, do not stop: later stages say what they need
            out[name] = f"not importable: {type(exc).__name__}: {exc}"[:500]
    from megatron_topd.models import PrecisionConfig

    out["fp8_validation"] = {}
    for recipe in ("delayed", "tensorwise", "blockwise"):
        try:
            PrecisionConfig(params_dtype="bf16", fp8="hybrid", fp8_recipe=recipe).validate()
            out["fp8_validation"][recipe] = "accepted"
        except RuntimeError as exc:
            out["fp8_validation"][recipe] = f"refused: {exc}"
    return out


def _read_install(out: Path) -> list[dict]:
    path = out / "install.tsv"
    if not path.is_file():
        return []
    rows = [line.split("\t") for line in path.read_text().splitlines() if line.strip()]
    return [dict(zip(("component", "how", "seconds", "status"), r)) for r in rows]


def _wheels(folder: Path) -> dict:
    return {p.name: p.stat().st_size for p in sorted(folder.glob("*"))} if folder.is_dir() else {}


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cmd[0]}: {exc}"


# ---- stage 1: te_step ---------------------------------------------------------------------------------------------
def stage_te_step(args) -> dict:
    """One training step of the TE layer-spec student per precision: the same initial weights and tokens for each
    (so the first step's loss compares precisions), `args.steps` steps, the first a warm-up; memory as the planner
    stage compares it."""
    need_cuda()
    need_transformer_engine()
    import torch

    from dataclasses import asdict

    from megatron_topd import parallel
    from megatron_topd.models import PrecisionConfig, build_gpt_model
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_topd.train.step import cross_entropy_loss, make_lm_batches, train_step

    init_single_gpu()
    spec = student_spec()
    out = {**device_info(), "spec": asdict(spec), "seq": args.seq, "steps": args.steps,
           "loss": "token-mean cross entropy (train.step.cross_entropy_loss)", "runs": {}}
    tokens = torch.randint(0, spec.vocab_size, (1, args.seq + 1), generator=torch.Generator().manual_seed(0))
    batches = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()}
               for b in make_lm_batches(tokens, 1, spec.vocab_size)]
    for name, kw in PRECISIONS.items():
        prec = PrecisionConfig(params_dtype="bf16", **kw)
        base = start_run(prec, out["runs"], name)
        if base is None:
            continue
        parallel.set_seed(1234)  # the same initial weights for every precision
        model = [wrap_ddp(build_gpt_model(spec, precision=prec))]
        optimizer, scheduler = build_optimizer(model, OptimConfig(lr=1e-5), params_dtype=prec.torch_dtype,
                                               total_steps=args.steps)
        mem = {"built": torch.cuda.memory_allocated() - base}
        losses, times, peaks = [], [], []
        for i in range(args.steps):
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            cuda_sync()
            t = time.perf_counter()
            losses.append(train_step(model, optimizer, scheduler, batches, cross_entropy_loss).loss)
            cuda_sync()
            times.append(time.perf_counter() - t)
            peaks.append(torch.cuda.max_memory_allocated() - before)
            if i == 0:
                mem["after_first_step"] = torch.cuda.memory_allocated() - base  # weights, grads, optimizer (+ FP8)
        snap = memory_snapshot()
        mem.update(step_peak_extra=max(peaks[1:] or peaks), total_peak=snap["max_allocated"] - base,
                   reserved_peak=snap["max_reserved"], device_used=snap["device_used"],
                   outside_torch=snap["device_used"] - snap["reserved"])
        timed = times[1:] or times
        out["runs"][name] = {"status": "ok", "losses": losses, "step_s": times, "step_s_median": statistics.median(timed),
                             "tokens_per_s": args.seq / statistics.median(timed), "memory_bytes": mem,
                             "memory_gib": {k: round(v / GIB, 3) for k, v in mem.items()}}
        print(name, json.dumps(out["runs"][name]), flush=True)
        del model, optimizer, scheduler
    bf16 = out["runs"].get("bf16", {})
    out["summary"] = {}
    for name in ("fp8_delayed", "fp8_current"):
        run = out["runs"].get(name, {})
        if bf16.get("status") == "ok" and run.get("status") == "ok":
            out["summary"][name] = {
                "first_loss_diff": run["losses"][0] - bf16["losses"][0],
                "first_loss_rel_diff": run["losses"][0] / bf16["losses"][0] - 1,
                "step_speedup_vs_bf16": bf16["step_s_median"] / run["step_s_median"],
                "goal_speedup": GOALS["fp8_step_speedup"]}
    if not out["summary"]:  # the runs' own reasons stay in the JSON
        out["status"], out["reason"] = "failed", "no FP8 run finished beside bf16 (see runs)"
    return out


# ---- stage 2: planner ---------------------------------------------------------------------------------------------
def planner_predictions(seq: int) -> dict:
    """The planner's per-term bytes for te_step's step (TP1 PP1 DP1, one row of `seq`, te_flash), bf16 and FP8."""
    from megatron_topd.plan import Layout, predict_layout

    spec = student_spec()
    layout = Layout(max_tokens_per_microbatch=seq, placement="remote")  # no teacher in te_step
    out = {}
    for name, fp8 in (("bf16", False), ("fp8", True)):
        plan = predict_layout(spec, None, layout, seq=seq, rows_per_step=1, gpu_mem_gb=80, params_dtype="bf16",
                              fp8=fp8, profile="te_flash")
        stage = plan.stages[0]
        out[name] = {"terms": dict(stage.terms), "allocated": stage.allocated}
    return out


def stage_planner(args) -> dict:
    """Predicted vs measured, per term: model state, FP8 weight cache, the step's activations + loss workspace, the
    whole allocated peak, and the runtime reserve (memory the device uses outside torch's allocations)."""
    pred = planner_predictions(args.seq)
    out = {"seq": args.seq, "predicted_gib": {k: {t: round(b / GIB, 3) for t, b in v["terms"].items()}
                                              | {"allocated": round(v["allocated"] / GIB, 3)} for k, v in pred.items()}}
    measured = read_stage(args.out, "te_step")
    if measured.get("status") != "ok":
        why = cuda_missing() or f"te_step is {measured.get('status')}: {measured.get('reason')}"
        return {**out, "status": "skipped", "reason": f"no measured step to compare with: {why}"}
    runs, rows = measured["runs"], {}
    p = pred["bf16"]["terms"]
    bf16 = runs["bf16"]["memory_bytes"]

    def row(term, predicted, got):
        rows[term] = {"predicted_gib": predicted / GIB, "measured_gib": got / GIB, "error": predicted / got - 1}

    row("model_state (weights + gradients + optimizer)", p["weights"] + p["gradients"] + p["optimizer"],
        bf16["after_first_step"])
    row("activations + loss_workspace (bf16 step peak)", p["activations"] + p["loss_workspace"] + p["comm_buffers"],
        bf16["step_peak_extra"])
    row("allocated (bf16)", pred["bf16"]["allocated"], bf16["total_peak"])
    row("runtime_reserve", p["runtime_reserve"],
        bf16["outside_torch"] + bf16["reserved_peak"] - bf16["total_peak"])
    for name in ("fp8_delayed", "fp8_current"):
        run = runs.get(name, {})
        if run.get("status") == "ok":
            m = run["memory_bytes"]
            row(f"fp8_weight_cache ({name})", pred["fp8"]["terms"]["fp8_weight_cache"],
                m["after_first_step"] - bf16["after_first_step"])
            row(f"activations + loss_workspace ({name})", pred["fp8"]["terms"]["activations"]
                + pred["fp8"]["terms"]["loss_workspace"], m["step_peak_extra"])
    out["comparison"] = rows
    out["device"] = measured.get("device")
    return out


# ---- stage 3: losses ----------------------------------------------------------------------------------------------
def stage_losses(args) -> dict:
    """benchmarks/gpu_losses.py as it is (it verifies every backend against float64 first), its JSON kept whole."""
    need_cuda()
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OUT": tmp, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_losses.py")], env=env, cwd=ROOT,
                              capture_output=True, text=True)
        print(proc.stdout[-6000:], proc.stderr[-6000:], flush=True)
        path = Path(tmp) / "losses_gpu.json"
        if not path.is_file():
            raise RuntimeError(f"gpu_losses.py exited {proc.returncode} without losses_gpu.json: {proc.stderr[-2000:]}")
        result = json.loads(path.read_text())
    kl = {r["method"]: r["fraction_of_copy"] for r in result.get("results", [])}
    best = max((m for m in kl if m.endswith("_kl")), key=kl.get, default=None)
    out = {"device": result.get("device"), "exit_code": proc.returncode, "copy_GBps": result.get("copy_GBps"),
           "kl_fraction_of_copy": kl, "best_kl": best, "best_kl_fraction": kl.get(best),
           "goal_fraction": GOALS["kl_fraction_of_copy"], "gpu_losses": result}
    if proc.returncode:
        out["status"], out["reason"] = "failed", "gpu_losses.py: a backend failed verification or raised (see gpu_losses)"
    return out


# ---- stage 4: probe -----------------------------------------------------------------------------------------------
def stage_probe(args) -> dict:
    """bench_probe.py's inputs and timed work at its defaults (64 x 2048, top-3, K=50, hidden 4096, V=151936): the
    per-candidate path ("before", CPU), the batched path on the CPU and with the embedding table on the GPU."""
    need_cuda()
    import importlib.util

    import numpy as np
    import torch

    from megatron_topd.topd import embedding_lookup, window_divergence

    spec = importlib.util.spec_from_file_location("bench_probe", ROOT / "benchmarks" / "bench_probe.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shape = argparse.Namespace(batch=64, seq=2048, prompt=256, top_k=3, window=50, hidden=4096, vocab=151936,
                               repeats=args.repeats, seed=0)  # bench_probe.py's defaults
    tokens, mask, loss, table, teacher_w, student_w = bench.make_inputs(shape)

    def best(table_on, fn, dtype):
        embed = embedding_lookup(table_on, dtype=dtype)
        runs = []
        for _ in range(shape.repeats):
            if table_on.is_cuda:
                cuda_sync()
            runs.append(bench.probe_work(tokens, mask, loss, embed, teacher_w, student_w, shape, fn))
        return min(runs, key=lambda r: r[0]["total"])

    cols = {"before (CPU)": best(table, bench.old_window_divergence, torch.float32),
            "after, CPU": best(table, window_divergence, None)}
    gpu_table = table.cuda()
    best(gpu_table, window_divergence, None)  # warm-up: CUDA context, kernels
    cols["after, GPU table"] = best(gpu_table, window_divergence, None)
    before = cols["before (CPU)"][1].numpy()
    out = {**device_info(), "shape": vars(shape), "candidates": len(teacher_w), "torch_threads": torch.get_num_threads(),
           "seconds": {c: parts for c, (parts, _) in cols.items()},
           "max_abs_diff_vs_before": {c: float(np.abs(d.cpu().numpy() - before).max()) for c, (_, d) in cols.items()},
           "speedup_total": {c: cols["before (CPU)"][0]["total"] / parts["total"] for c, (parts, _) in cols.items()},
           "goal_speedup": GOALS["probe_speedup"]}
    return out


# ---- stage 5: topd_step -------------------------------------------------------------------------------------------
def synthetic_rows(n: int, seq: int, vocab: int, seed: int):
    """`n` rollouts: prompts of min(256, seq/8) random ids, responses of seq/4 .. what leaves room for a K=50 window."""
    import torch

    from megatron_topd.train.handoffs import RolloutRows

    g = torch.Generator().manual_seed(seed)
    prompt = min(256, seq // 8)
    prompts = [torch.randint(0, vocab, (prompt,), generator=g).tolist() for _ in range(n)]
    lengths = torch.randint(seq // 4, seq - prompt - 51, (n,), generator=g).tolist()
    responses = [torch.randint(0, vocab, (k,), generator=g).tolist() for k in lengths]
    logprobs = [(-torch.rand(k, generator=g) * 3).tolist() for k in lengths]
    return RolloutRows(prompts, responses, logprobs)


def synthetic_probe(rows, token_loss, cfg, vocab: int, pad_id: int, seed: int):
    """The probe's outcome without servers: candidates by the scored l_t (topd.select_candidates), random OT distances
    for the suppression cut, random teacher windows of topd.window ids as the guidance rows."""
    import torch

    from megatron_topd.topd import build_guidance, build_requests, divergence_weights, select_candidates, token_weights
    from megatron_topd.train.handoffs import GuidanceRows, ProbeOutcome

    t = cfg.topd
    tokens, mask = rows.padded(pad_id)
    candidates = select_candidates(token_loss, mask, top_k=t.top_k, min_gap=t.min_gap)
    g = torch.Generator().manual_seed(seed)
    n = sum(len(c) for c in candidates)
    weights, divergent = divergence_weights(torch.rand(n, generator=g, dtype=torch.float64), low_fraction=t.low_fraction)
    requests = build_requests(tokens, candidates)
    windows = [[torch.randint(0, vocab, (t.window,), generator=g).tolist()] for _ in range(n)]
    gb = build_guidance(requests, windows, divergent, pad_id=pad_id)
    guidance = GuidanceRows(tokens=gb.tokens.cpu(), lengths=gb.lengths.cpu(), window_start=gb.window_start.cpu(),
                            row=torch.tensor([requests.owners[c][0] for c in gb.candidate], dtype=torch.long),
                            logit_weights=gb.logit_weights.float().cpu())
    return ProbeOutcome(token_weights=token_weights(mask, candidates, weights).float(), guidance=guidance,
                        n_candidates=n, n_divergent=int(divergent.sum()))


def stage_topd_step(args) -> dict:
    """score_replica + train_on_replica (train/loop.py) with a co-located teacher (Qwen3-1.7B-shaped, frozen, bf16)
    over `args.rows` synthetic rollouts of up to `args.topd_seq` tokens; bf16 student, then FP8 (delayed)."""
    need_cuda()
    need_transformer_engine()
    from dataclasses import replace

    import torch

    from megatron_topd import parallel
    from megatron_topd.config import Config
    from megatron_topd.models import PrecisionConfig, build_gpt_model
    from megatron_topd.plan import predict_memory
    from megatron_topd.train.loop import score_replica, train_on_replica
    from megatron_topd.train.setup import Run, build_models
    from megatron_topd.train.teacher import ColocatedTeacher

    layout = init_single_gpu()
    spec = student_spec()
    rows = synthetic_rows(args.rows, args.topd_seq, spec.vocab_size, seed=7)
    out = {**device_info(), "rows": args.rows, "max_seq_length": args.topd_seq,
           "response_tokens": sum(len(r) for r in rows.responses), "runs": {}}
    for name in ("bf16", "fp8_delayed"):
        cfg = Config(student=spec, teacher_spec=spec)
        cfg.precision = PrecisionConfig(params_dtype="bf16", **PRECISIONS[name])
        cfg.train.max_seq_length = args.topd_seq
        cfg.train.max_tokens_per_microbatch = 2 * args.topd_seq
        cfg.train.teacher_group_microbatches = 1
        cfg.rollout.n_samples = 4
        cfg.train.prompts_per_step = max(1, args.rows // 4)  # the planner's rows per step
        cfg.train.loss_chunk_size = 2048
        cfg.topd.variant = "topd"
        base = start_run(cfg.precision, out["runs"], name)
        if base is None:
            continue
        parallel.set_seed(1234)
        student_cfg = replace(cfg, teacher=replace(cfg.teacher, placement="remote"))  # the student alone
        _, student, optimizer, scheduler, _ = build_models(student_cfg)
        parallel.set_seed(4321)
        teacher = ColocatedTeacher([build_gpt_model(spec, precision=replace(cfg.precision, fp8=None))])  # as setup does
        plan = predict_memory(cfg, spec, spec, gpu_mem_gb=torch.cuda.get_device_properties(0).total_memory / 1e9,
                              profile="te_flash")
        run = Run(cfg=cfg, layout=layout, out=Path(tempfile.mkdtemp()), student_spec=spec, student=student,
                  optimizer=optimizer, scheduler=scheduler, teacher=teacher, tokenizer=None, pad_id=0, dataset=None,
                  start_step=0, heldout=None, student_client=None, teacher_client=None, weight_sync=None, logger=None,
                  rollout_source=None, planned_peak_gb=plan.stages[0].allocated / GIB)
        steps = []
        for i in range(args.steps):
            cuda_sync()
            t0 = time.perf_counter()
            token_loss = score_replica(run, rows)
            cuda_sync()
            t1 = time.perf_counter()
            probe = synthetic_probe(rows, token_loss, cfg, spec.vocab_size, 0, seed=i)
            t2 = time.perf_counter()
            result, stats = train_on_replica(run, rows, probe)
            cuda_sync()
            t3 = time.perf_counter()
            steps.append({"scoring_s": t1 - t0, "synthetic_probe_s": t2 - t1, "train_s": t3 - t2, "loss": result.loss,
                          "opd_loss": result.metrics["opd_loss"], "traj_loss": result.metrics["traj_loss"],
                          "windows": stats.guidance_windows, "train_tokens": stats.train_tokens,
                          "skipped": result.skipped})
            print(name, json.dumps(steps[-1]), flush=True)
        timed = steps[1:] or steps
        snap = memory_snapshot()
        out["runs"][name] = {
            "status": "ok", "steps": steps,
            "scoring_s_median": statistics.median(s["scoring_s"] for s in timed),
            "train_s_median": statistics.median(s["train_s"] for s in timed),
            "peak_allocated_gib": (snap["max_allocated"] - base) / GIB,
            "planned_allocated_gib": run.planned_peak_gb,
            "planned_terms_gib": {k: round(v / GIB, 3) for k, v in plan.stages[0].terms.items()}}
        del run, student, optimizer, scheduler, teacher
    b, f = out["runs"].get("bf16", {}), out["runs"].get("fp8_delayed", {})
    if b.get("status") == "ok" and f.get("status") == "ok":
        out["summary"] = {
            "first_loss_rel_diff": f["steps"][0]["loss"] / b["steps"][0]["loss"] - 1,
            "scoring_speedup": b["scoring_s_median"] / f["scoring_s_median"],
            "train_speedup": b["train_s_median"] / f["train_s_median"],
            "planner_error_bf16": b["planned_allocated_gib"] / b["peak_allocated_gib"] - 1,
            "planner_error_fp8": f["planned_allocated_gib"] / f["peak_allocated_gib"] - 1}
    return out


# ---- driver -------------------------------------------------------------------------------------------------------
RUNNERS = {"setup": stage_setup, "te_step": stage_te_step, "planner": stage_planner, "losses": stage_losses,
           "probe": stage_probe, "topd_step": stage_topd_step}


def run_stage(stage: str, args) -> dict:
    """The stage's JSON payload: its figures and status ok, or status skipped/failed with a reason."""
    t = time.time()
    try:
        payload = RUNNERS[stage](args)
        payload.setdefault("status", "ok")
    except Skip as why:
        payload = {"status": "skipped", "reason": str(why)}
    except Exception as exc:  # noqa: BLE001 - the JSON must say what broke; the exit code says that it broke
        payload = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:2000],
                   "traceback": traceback.format_exc()[-6000:]}
    return {"stage": stage, **payload, "wall_s": round(time.time() - t, 2)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stage", choices=STAGES, required=True)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "gpu_out"))
    ap.add_argument("--wheels", type=Path, default=Path(os.environ.get("GPU_WHEELS") or "gpu_wheels"))
    ap.add_argument("--seq", type=int, default=SEQ, help="te_step / planner: tokens per row")
    ap.add_argument("--steps", type=int, default=3, help="te_step / topd_step: steps per precision (first: warm-up)")
    ap.add_argument("--rows", type=int, default=16, help="topd_step: synthetic rollouts")
    ap.add_argument("--topd-seq", type=int, default=4096, help="topd_step: train.max_seq_length")
    ap.add_argument("--repeats", type=int, default=3, help="probe: best of this many runs per column")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    result = run_stage(args.stage, args)
    path = args.out / f"{args.stage}.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(f"{args.stage}: {result['status']}" + (f" ({result['reason']})" if result.get("reason") else "")
          + f" -> {path}", flush=True)
    return 1 if result["status"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
