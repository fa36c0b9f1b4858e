"""Measure this CPU for the step-time model (plan/devices.py's CPU profile): what each of its figures is, measured
apart from any TOPD step, on one thread per process as the demo runs (OMP_NUM_THREADS=1).

- matmul FLOP/s: fp32 GEMMs of a trainer microbatch's shape ([1024, 96] x [96, 256]) and a large one (2048^3);
- memory bandwidth: a 256 MB copy (read + write);
- Megatron's local layer (d96, FFN 256): seconds of one layer's forward (no grad), and forward + backward, per call
  and per token (the intercept and slope of a line through microbatches of 16 to 2048 tokens), and the same
  outside the layers (embedding, output layer), from a 1-layer and a 3-layer GPTModel on one rank and at TP=2;
  one Megatron schedule call (alternating with the bare forward it wraps); one step of the trainer's Megatron
  optimizer (Adam) on the 3-layer model. These trainer figures are checked against physics (`unphysical`: no cost
  below 0) and measured again, up to 3 times, where load broke them; a TP=2 rank's speed-up over one rank is
  bounded by 2 (`TP_DOUBLING_BOUND`), the measured one printed beside it;
- gloo between two processes: an all-reduce's latency (one float, back to back) and bandwidth (4 MB); the profile's
  collective latency is what an all-reduce costs inside a pass (the TP=2 layer's calls against the TP=1 layer's);
- a SGLang CPU server (the tiny random student of megatron_topd/testing, the demo's server settings): seconds per
  decode step at batch 1 and 48 (ignore_eos, so every sequence runs the same steps), per prefilled request, and one
  call's round trip (a 1-token request);
- the same server's side of a weight sync (rollout/weight_sync: the distributed path over gloo, from this process):
  each light admin call a sync makes (pause, begin, end, model_info, continue) timed alone; whole syncs of the
  model's tensors in one bucket and in several, and of its norms alone: the cost of one more bucket (the update
  call), of a bucket's bytes (receive, unflatten, load into the model), and the rest of a sync;
- a Megatron dist checkpoint of the 1- and 3-layer d96 models with their Adam state at TP=2 on two ranks (as the
  demo saves): the first save of a process and later ones, per save and per layer;
- OT: seconds per candidate of the probe's divergence step (topd/divergence.py: costs and exact EMD, K=8);
- filesystem: writing 64 MB and fsync.

    flock /tmp/topd-heavy.lock .venv/bin/python benchmarks/calibrate_cpu_profile.py [--skip-sglang] [--out FILE]

Prints the figures and the `DeviceProfile` fields they become (plan/devices.py) as JSON; `--from-json FILE`
derives the fields again from a saved print's "figures".
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _best(fn, reps: int = 7) -> float:
    """Median seconds of ``fn()`` over ``reps`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_flops(m: int, k: int, n: int) -> float:
    import torch

    a, b = torch.randn(m, k), torch.randn(k, n)
    reps = max(1, int(2e8 // (2 * m * k * n)))
    return 2 * m * k * n * reps / _best(lambda: [a @ b for _ in range(reps)])


def memory_bandwidth() -> float:
    import torch

    src = torch.ones(64 * 2**20)  # 256 MB
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _best(lambda: dst.copy_(src))


def filesystem_bandwidth() -> float:
    data = os.urandom(64 * 2**20)
    with tempfile.TemporaryDirectory(dir=REPO / "runs") as d:
        def write():
            with open(Path(d) / "blob", "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        return len(data) / _best(write, reps=3)


def ot_window_seconds(k: int = 8, candidates: int = 192, group=None) -> float:
    """Seconds per candidate of `topd.divergence.window_divergence` (what the probe's OT step runs: embedding rows,
    the batched cosine costs, the exact solve), K-token windows of random ids, a d96 table; on one rank, or with
    the pairs dealt over ``group``'s ranks (every rank calls it) and the distances' all-reduce."""
    import torch

    from megatron_topd.topd.divergence import window_divergence

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(128, 96, generator=gen)
    windows = [[[int(x) for x in torch.randint(3, 60, (k,), generator=gen)]] for _ in range(2 * candidates)]
    return _best(lambda: window_divergence(windows[:candidates], windows[candidates:], lambda ids: table[ids],
                                           group=group), reps=5) / candidates


def _zero_loss(logits, batch):
    return logits.new_zeros(()), {}


# Microbatch shapes of the layer timings (rows x width): 16 tokens (launch-bound) to 2048 (the per-token work about
# 10x the per-call cost at TP=1, and at TP=2); the per-call and per-token costs are the intercept and slope of a
# least-squares line through the four, not a difference of two timings.
LAYER_SHAPES = ((1, 16), (4, 64), (16, 64), (32, 64))


def _layer_times(tp: int, rounds: int = 15):
    """{(layers, tokens): (forward s, forward + backward s)} of a Megatron local GPTModel (d96, 4 heads, FFN 256)
    with 1 and 3 layers at the `LAYER_SHAPES`, at tensor parallelism ``tp``; and the models. The timings
    alternate, ``rounds`` rounds, medians: load on this shared machine then moves the timings that are compared
    alike (one after another, a per-token slope came out below 0)."""
    import torch

    from megatron_topd import parallel
    from megatron_topd.models import ModelSpec, build_gpt_model

    parallel.initialize(tp, 1, seed=0)
    passes, models = {}, {}
    for layers in (1, 3):
        spec = ModelSpec(vocab_size=128, hidden_size=96, num_layers=layers, num_attention_heads=4, num_kv_heads=4,
                         ffn_hidden_size=256)
        model = models[layers] = build_gpt_model(spec)
        for rows, width in LAYER_SHAPES:
            tokens = torch.randint(0, 128, (rows, width), generator=torch.Generator().manual_seed(rows))
            positions = torch.arange(width)[None].expand(rows, -1)

            def forward(model=model, tokens=tokens, positions=positions):
                with torch.no_grad():
                    model(input_ids=tokens, position_ids=positions, attention_mask=None)

            def forward_backward(model=model, tokens=tokens, positions=positions):
                model(input_ids=tokens, position_ids=positions, attention_mask=None).float().sum().backward()

            passes[layers, rows * width, 0], passes[layers, rows * width, 1] = forward, forward_backward
    medians = _alternating(passes, rounds)
    t = {(layers, n): (medians[layers, n, 0], medians[layers, n, 1]) for layers, n, kind in passes if kind == 0}
    return t, models


def _line(points: dict[int, float]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through {tokens: seconds}."""
    n = list(points)
    slope, intercept = statistics.linear_regression(n, [points[k] for k in n])
    return intercept, slope


def _per_call_and_token(t: dict, prefix: str = "") -> dict:
    """Per layer (half the 3-layer model's time less the 1-layer model's) and outside the layers (the 1-layer
    model less one layer), forward and train: the cost per call (the intercept at 0 tokens) and per token (the
    slope), a line through the `LAYER_SHAPES`' timings."""
    out = {}
    sizes = [rows * width for rows, width in LAYER_SHAPES]
    for i, kind in enumerate(("forward", "train")):
        layer = {n: (t[3, n][i] - t[1, n][i]) / 2 for n in sizes}
        model = {n: t[1, n][i] - layer[n] for n in sizes}
        for part, times in (("layer", layer), ("model", model)):
            intercept, slope = _line(times)
            out[f"{prefix}{part}_{kind}_token_s"] = slope
            out[f"{prefix}{part}_{kind}_s"] = intercept
    return out


def tp_layer_job(checkpoints: bool = True) -> dict:
    """Two ranks at TP=2: the d96 layer's per-rank costs (its all-reduces included): how a small layer's per-token
    work splits over TP ranks; the OT step's pairs dealt over the two ranks; and the dist checkpoint's save of
    those models with their optimizer state."""
    from megatron_topd import parallel

    t, models = _layer_times(2)
    out = _per_call_and_token(t, prefix="tp2_")
    out["tp2_ot_seconds_per_window"] = ot_window_seconds(group=parallel.tensor_parallel_group())
    if checkpoints:
        out.update(_checkpoint_seconds(models))
    return out


def _checkpoint_seconds(models: dict) -> dict:
    """`checkpointing.save_checkpoint` (what the loop calls every train.save_interval steps) of the 1- and 3-layer
    models with their Adam state, on every rank: the first save of the process (Megatron's one-time set-up
    included) and the median of 9 later ones (from each model's third save on, alternating); per save (the 0-layer
    intercept) and per layer."""
    import shutil

    import torch.distributed as dist

    from megatron_topd.checkpointing import save_checkpoint
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp

    saves, roots = {}, []
    for layers, model in models.items():
        ddp = wrap_ddp(model)
        optimizer, scheduler = build_optimizer([ddp], OptimConfig(lr=1e-4))
        root = REPO / "runs" / "calibrate_cpu" / f"checkpoint_{layers}"
        if dist.get_rank() == 0:
            shutil.rmtree(root, ignore_errors=True)
        roots.append(root)
        step = iter(range(1, 100))
        saves[layers] = lambda root=root, ddp=ddp, optimizer=optimizer, scheduler=scheduler, step=step: \
            save_checkpoint(root, next(step), [ddp], optimizer, scheduler)
    dist.barrier()
    first = {layers: _timed(save) for layers, save in saves.items()}
    later = _alternating(saves, rounds=9)
    dist.barrier()
    if dist.get_rank() == 0:
        for root in roots:
            shutil.rmtree(root, ignore_errors=True)
    per_layer = (later[3] - later[1]) / 2
    return {"checkpoint_call_s": later[1] - per_layer, "checkpoint_layer_s": per_layer,
            "checkpoint_first_save_s_1layer": first[1], "checkpoint_first_save_s_3layer": first[3],
            "checkpoint_save_s_1layer": later[1], "checkpoint_save_s_3layer": later[3]}


def _alternating(fns: dict, rounds: int) -> dict[str, float]:
    """Median seconds of each of ``fns``, timed in turn ``rounds`` times after one warm-up each: load on this shared
    machine then moves the timings that are compared alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(_timed(fn))
    return {k: statistics.median(v) for k, v in times.items()}


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def layer_pass_job() -> dict:
    """One rank: the d96 layer's and the model's costs per call and per token, forward (no grad) and forward +
    backward; one Megatron schedule call around a microbatch's forward; one optimizer step."""
    import torch

    from megatron_topd.train.step import run_schedule

    t, models = _layer_times(1)
    out = _per_call_and_token(t)
    batch = {"tokens": torch.randint(0, 128, (1, 16)), "position_ids": torch.arange(16)[None]}

    def bare():
        with torch.no_grad():
            models[1](input_ids=batch["tokens"], position_ids=batch["position_ids"], attention_mask=None)

    def scheduled():
        with torch.no_grad():
            run_schedule([models[1]], [batch], _zero_loss, forward_only=True)

    t = _alternating({"bare": bare, "scheduled": scheduled}, rounds=41)
    out["schedule_call_s"] = t["scheduled"] - t["bare"]
    out["optimizer_step_s"] = _optimizer_step_seconds(models[3], batch)
    return out


def _optimizer_step_seconds(model, batch) -> float:
    """One step of the trainer's Megatron optimizer (Adam, distributed optimizer) on the 3-layer model."""
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_topd.train.step import run_schedule

    ddp = wrap_ddp(model)
    optimizer, _ = build_optimizer([ddp], OptimConfig(lr=1e-4))

    def sum_loss(logits, b):
        return logits.float().sum() * 1e-6, {}

    run_schedule([ddp], [batch], sum_loss, forward_only=False)
    return _best(optimizer.step, reps=11)


def gloo_job() -> dict:
    import torch
    import torch.distributed as dist

    one, big = torch.ones(1), torch.ones(2**20)  # 4 B, 4 MB
    latency = _best(lambda: [dist.all_reduce(one) for _ in range(200)], reps=5) / 200
    seconds = _best(lambda: dist.all_reduce(big), reps=11)
    return {"allreduce_loop_latency_s": latency,
            "collective_bytes_per_s": big.numel() * 4 / max(seconds - latency, 1e-9)}


def sglang_decode(root: Path) -> dict:
    """Seconds per decode step at batch 1 and 48 (from the difference of 8- and 40-token generations, which
    cancels the prefill and HTTP costs), and per prefilled request (48 requests vs 1, one token each)."""
    from megatron_topd.rollout.client import SGLangClient
    from megatron_topd.rollout.sampling import SamplingParams
    from megatron_topd.rollout.server import SGLangServer
    from megatron_topd.testing.tiny_assets import build_tiny_assets

    assets = build_tiny_assets(root / "assets")
    server = SGLangServer(assets["student_hf"], python=REPO / ".venv-sglang" / "bin" / "python", dtype="float32",
                          mem_fraction_static=0.25, context_length=128, log_dir=root / "sglang", api_key="")
    with server:
        client = SGLangClient(server.url, progress=False)

        def run(batch: int, new: int, prompt_len: int = 12) -> float:
            params = SamplingParams(max_new_tokens=new, ignore_eos=True)
            prompts = [[(3 + i + j) % 60 + 3 for j in range(prompt_len)] for i in range(batch)]
            return _best(lambda: client.generate(prompts, params), reps=5)

        run(1, 4)  # warm-up
        step = {b: (run(b, 40) - run(b, 8)) / 32 for b in (1, 48)}
        call = run(1, 1, 40)
        prefill = (run(48, 1, 40) - call) / 47
        sync = sglang_weight_sync(server.url, assets["student_hf"])
    per_seq = (step[48] - step[1]) / 47
    return {"decode_step_overhead_s": step[1] - per_seq, "decode_seq_step_s": per_seq,
            "decode_tokens_per_s_batch48": 48 / step[48], "prefill_request_s": prefill, "server_call_s": call,
            **sync}


# The admin calls around a sync's buckets, in a sync's order (rollout/weight_sync/base.py and distributed.py).
LIGHT_CALLS = (("/pause_generation", {"mode": "retract"}, "POST"), ("/begin_weight_update", {}, "POST"),
               ("/end_weight_update", {}, "POST"), ("/model_info", None, "GET"), ("/continue_generation", {}, "POST"))


def sglang_weight_sync(url: str, hf_dir: Path) -> dict:
    """The server's side of a weight sync, apart from any training step: each light call's round trip (median of
    11 cycles, in a sync's order); whole distributed syncs of the served model's own tensors in one bucket and in
    several (the same tensors and bytes: one more bucket costs the difference per extra bucket, its update call),
    and of its norms alone in one bucket (5 of its 21 tensors, 0.2% of its bytes): the difference from the whole
    model's is the cost of a bucket's bytes (received, unflattened and loaded, with the per-tensor work of a model
    of this shape); what a one-bucket sync leaves beyond its calls and bytes is its rest (its cache flush, the
    client's own work). The three syncs alternate, 9 rounds, medians: load on the machine moves them together."""
    from safetensors.torch import load_file

    from megatron_topd.rollout.weight_sync import DistributedWeightSync, admin

    light: dict[str, list[float]] = {path: [] for path, _, _ in LIGHT_CALLS}
    for _ in range(11):
        for path, payload, method in LIGHT_CALLS:
            light[path].append(_timed(lambda: admin.call(url, path, payload, timeout_s=60, method=method)))
    light_s = {path: statistics.median(times) for path, times in light.items()}

    full = list(load_file(str(Path(hf_dir) / "model.safetensors")).items())
    norms = [(n, t) for n, t in full if "norm" in n]
    nbytes = {k: sum(t.numel() * t.element_size() for _, t in v) for k, v in (("full", full), ("norms", norms))}
    split = nbytes["full"] // 4
    runs = {"one": (full, 2**40), "several": (full, split), "norms": (norms, 2**40)}
    versions = iter(range(10**6))
    sync = DistributedWeightSync([url], backend="gloo", bucket_bytes=2**40, timeout_s=300)

    def push(tensors, bucket_bytes: int) -> int:
        sync.bucket_bytes = bucket_bytes
        return sync.sync(iter(tensors), f"calibrate-{next(versions)}").num_buckets

    times: dict[str, list[float]] = {k: [] for k in runs}
    try:
        extra = push(full, split) - 1  # (and the group's set-up)
        for _ in range(9):
            for k, (tensors, bucket_bytes) in runs.items():
                times[k].append(_timed(lambda: push(tensors, bucket_bytes)))
    finally:
        sync.close()
    t = {k: statistics.median(v) for k, v in times.items()}
    light_mean = statistics.fmean(light_s.values())
    bucket = (t["several"] - t["one"]) / extra
    per_byte = (t["one"] - t["norms"]) / (nbytes["full"] - nbytes["norms"])
    return {**{f"light_call_s{path.replace('/', '_')}": v for path, v in light_s.items()},
            "server_light_call_s": light_mean, "weight_update_call_s": bucket,
            "weight_update_seconds_per_byte": per_byte, **{f"sync_s_{k}": v for k, v in t.items()},
            "sync_bytes": nbytes["full"], "sync_tensors": len(full), "sync_extra_buckets": extra,
            "weight_sync_rest_s": t["one"] - len(LIGHT_CALLS) * light_mean - bucket - nbytes["full"] * per_byte}


LAYER_FLOPS_PER_TOKEN = 2 * (96 * 3 * 96 + 96 * 96 + 96 * 2 * 256 + 256 * 96) + 2 * 4 * 24 * 64  # the d96 layer, S=64


def profile_fields(fig: dict) -> dict:
    """The `DeviceProfile` fields from the figures: a layer's per-token cost as the FLOP/s it reaches (GEMMs and
    elementwise work at this width), the backward's cost relative to the forward, the per-call costs."""
    return {
        "flops": LAYER_FLOPS_PER_TOKEN / fig["layer_forward_token_s"],
        "backward_ratio": fig["layer_train_token_s"] / fig["layer_forward_token_s"] - 1,
        "memory_bytes_per_s": fig["memory_bytes_per_s"],
        **{k: fig[k] for k in ("decode_step_overhead_s", "decode_seq_step_s", "prefill_request_s",
                               "server_light_call_s", "weight_update_call_s", "layer_forward_s", "layer_train_s",
                               "optimizer_step_s",
                               "collective_bytes_per_s", "filesystem_bytes_per_s", "ot_seconds_per_window",
                               "checkpoint_call_s", "checkpoint_layer_s") if k in fig},
        # differences of medians: noise can take a small one below 0, which no cost is
        **{k: max(0.0, fig[k]) for k in ("model_forward_s", "model_train_s", "model_forward_token_s",
                                         "schedule_call_s", "weight_sync_rest_s") if k in fig},
        "inter_node_bytes_per_s": fig["collective_bytes_per_s"],
        "collective_latency_s": _collective_in_pass_s(fig),
        **({"weight_load_bytes_per_s": _weight_load_rate(fig)} if "weight_update_seconds_per_byte" in fig else {}),
        **({k: min(TP_DOUBLING_BOUND, v) for k, v in tp_speedups(fig).items()}
           if "tp2_layer_forward_token_s" in fig else {}),
        **({"ot_tp_speedup": min(TP_DOUBLING_BOUND, fig["ot_seconds_per_window"] / fig["tp2_ot_seconds_per_window"])}
           if "tp2_ot_seconds_per_window" in fig else {}),
    }


# A TP doubling halves each rank's share of a layer's work, so the share runs at most 2x as fast as the whole: the
# profile takes the measured speed-up up to that bound. On this machine, with the background experiment paused, the
# d96 layer's backward measured 3.72x at 05:26 (a TP=1 rank's backward per token 2.9x its forward, a TP=2 rank's
# 0.9x), 2.95, 2.65 and 2.11x at 08:05-08:07, 2.03x at 08:16 and 1.51x at 08:26 (Dec 7): it swings with the
# machine's state by more than the line fits' noise, and above 2 it is not a split of the work (the small layer's
# caches, its all-reduces' waits), nor what the large layers the model plans for would show.
TP_DOUBLING_BOUND = 2.0


def tp_speedups(fig: dict) -> dict[str, float]:
    """How much faster a TP=2 rank runs its share per token than one rank runs the whole d96 layer, forward and
    backward, as measured (the all-reduces' bytes taken out: the model counts them apart)."""
    return {"tp_speedup": fig["layer_forward_token_s"] / _tp2_compute_token_s(fig, "forward"),
            "tp_backward_speedup": (fig["layer_train_token_s"] - fig["layer_forward_token_s"])
            / (_tp2_compute_token_s(fig, "train") - _tp2_compute_token_s(fig, "forward"))}


TRAINER_ATTEMPTS = 3


def unphysical(fig: dict) -> list[str]:
    """The trainer figures no machine can have (what noise under load produced before: per-call costs below 0, a
    TP=2 rank slower than nothing): every cost at least 0, a backward costs something, a TP=2 rank's share takes
    time, an all-reduce inside a pass costs at least what one costs in a loop. Empty when the figures are physical.
    (A speed-up above 2 per TP doubling the profile bounds: `TP_DOUBLING_BOUND`.)"""
    bad = [f"{k} {fig[k]:.3g} < 0" for k in ("layer_forward_s", "layer_train_s", "layer_forward_token_s",
                                             "layer_train_token_s", "tp2_layer_forward_token_s",
                                             "tp2_layer_train_token_s", "optimizer_step_s") if fig[k] < 0]
    if fig["layer_train_token_s"] <= fig["layer_forward_token_s"]:
        bad.append("layer_train_token_s <= layer_forward_token_s (a backward at no cost)")
    p = profile_fields(fig)
    bad += [f"{k} {v:.3g} <= 0" for k, v in tp_speedups(fig).items() if v <= 0]
    if p["collective_latency_s"] < fig["allreduce_loop_latency_s"]:
        bad.append(f"collective_latency_s {p['collective_latency_s']:.3g} below a loop's all-reduce "
                   f"{fig['allreduce_loop_latency_s']:.3g}")
    return bad


def _collective_in_pass_s(fig: dict) -> float:
    """What one all-reduce costs inside a model pass: a TP=2 layer's call cost over a TP=1 layer's, per all-reduce
    it makes (2 forward, 4 forward + backward; the mean of the two). Inside a pass each rank reaches a collective
    when its own work is done and waits for the other, which a loop of back-to-back all-reduces
    (allreduce_loop_latency_s) never does: on these 2 vCPUs it is several times the loop's figure."""
    if "tp2_layer_forward_s" not in fig:
        return fig.get("allreduce_loop_latency_s", fig.get("collective_latency_s"))
    forward = (fig["tp2_layer_forward_s"] - fig["layer_forward_s"]) / 2
    train = (fig["tp2_layer_train_s"] - fig["layer_train_s"]) / 4
    return (forward + train) / 2


def _tp2_compute_token_s(fig: dict, kind: str) -> float:
    """A TP=2 rank's per-token cost of the d96 layer (``kind``: forward, or train = forward + backward) less its
    all-reduces' bytes (which the model counts apart: two per direction): what the rank computes."""
    all_reduces = 2 if kind == "forward" else 4
    return fig[f"tp2_layer_{kind}_token_s"] - all_reduces * 96 * 4 / fig["collective_bytes_per_s"]


def _weight_load_rate(fig: dict) -> float:
    """The server's bytes per second of a bucket (receive, unflatten, load into the model) less the broadcast's
    bytes over gloo (which the model counts apart, at inter_node_bytes_per_s); inf where the broadcast is all of it."""
    load = fig["weight_update_seconds_per_byte"] - 1 / fig["collective_bytes_per_s"]
    return 1 / load if load > 0 else float("inf")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--root", default=str(REPO / "runs" / "calibrate_cpu"))
    ap.add_argument("--from-json", help="derive the profile fields from figures this script printed before")
    ap.add_argument("--only-tp", action="store_true", help="only the TP=2 layer figures")
    ap.add_argument("--out", help="also write the JSON here (bench_step_time_model.py --profile-json reads it)")
    args = ap.parse_args()
    if args.from_json:
        doc = json.loads(Path(args.from_json).read_text())
        fig = doc.get("figures", doc)
        print(json.dumps({"figures": fig, "profile": profile_fields(fig)}, indent=2))
        return
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from megatron_topd.parallel.spawn import run_on_ranks

    torch.set_num_threads(1)
    if args.only_tp:
        print(json.dumps(run_on_ranks(tp_layer_job, 2, timeout=300)[0], indent=2))
        return
    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    (REPO / "runs").mkdir(exist_ok=True)
    fig = {"matmul_flops_microbatch": matmul_flops(1024, 96, 256), "matmul_flops_large": matmul_flops(2048, 2048, 2048),
           "memory_bytes_per_s": memory_bandwidth(), "filesystem_bytes_per_s": filesystem_bandwidth(),
           "ot_seconds_per_window": ot_window_seconds()}
    fig.update(run_on_ranks(gloo_job, 2, timeout=300)[0])
    for attempt in range(1, TRAINER_ATTEMPTS + 1):
        fig.update(run_on_ranks(layer_pass_job, 1, timeout=300)[0])
        fig.update(run_on_ranks(tp_layer_job, 2, timeout=300)[0])
        bad = unphysical(fig)
        fig["trainer_attempts"] = attempt
        fig.update({f"{k}_measured": v for k, v in tp_speedups(fig).items()})
        if not bad:
            break
        print(f"attempt {attempt}: unphysical trainer figures ({'; '.join(bad)}): measuring them again",
              file=sys.stderr, flush=True)
    else:
        raise SystemExit(f"the trainer figures stayed unphysical over {TRAINER_ATTEMPTS} attempts ({'; '.join(bad)}):"
                         " the machine is too loaded to calibrate; pause what runs beside it and run again")
    if not args.skip_sglang:
        fig.update(sglang_decode(root))
    fig["cpu"] = _cpu_name()
    text = json.dumps({"figures": fig, "profile": profile_fields(fig)}, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
