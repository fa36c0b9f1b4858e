"""Measure this CPU for the step-time model (plan/devices.py's CPU profile): what each of its figures is, measured
apart from any TOPD step, on one thread per process as the demo runs (OMP_NUM_THREADS=1).

- matmul FLOP/s: fp32 GEMMs of a trainer microbatch's shape ([1024, 96] x [96, 256]) and a large one (2048^3);
- memory bandwidth: a 256 MB copy (read + write);
- Megatron's local layer (d96, FFN 256): seconds of one layer's forward (no grad), and forward + backward, per call
  (a 16-token microbatch is launch-bound) and per token (from a 1024-token one), and the same outside the layers
  (embedding, output layer), from a 1-layer and a 3-layer GPTModel on one rank; one Megatron schedule call; one
  step of the trainer's Megatron optimizer (Adam) on the 3-layer model;
- gloo between two processes: an all-reduce's latency (one float) and bandwidth (4 MB);
- a SGLang CPU server (the tiny random student of megatron_topd/testing, the demo's server settings): seconds per
  decode step at batch 1 and 48 (ignore_eos, so every sequence runs the same steps), per prefilled request, and one
  call's round trip (a 1-token request);
- OT: seconds per candidate of the probe's divergence step (topd/divergence.py: costs and exact EMD, K=8);
- filesystem: writing 64 MB and fsync.

    flock /tmp/topd-heavy.lock .venv/bin/python benchmarks/calibrate_cpu_profile.py [--skip-sglang]

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


def ot_window_seconds(k: int = 8, candidates: int = 192) -> float:
    """Seconds per candidate of `topd.divergence.window_divergence` on one rank (what the probe's OT step runs:
    embedding rows, the batched cosine costs, the exact solve), K-token windows of random ids, a d96 table."""
    import torch

    from megatron_topd.topd.divergence import window_divergence

    gen = torch.Generator().manual_seed(0)
    table = torch.randn(128, 96, generator=gen)
    windows = [[[int(x) for x in torch.randint(3, 60, (k,), generator=gen)]] for _ in range(2 * candidates)]
    return _best(lambda: window_divergence(windows[:candidates], windows[candidates:], lambda ids: table[ids]),
                 reps=5) / candidates


def _zero_loss(logits, batch):
    return logits.new_zeros(()), {}


def _layer_times(tp: int):
    """{(layers, tokens): (forward s, forward + backward s)} of a Megatron local GPTModel (d96, 4 heads, FFN 256)
    with 1 and 3 layers at 16 tokens (1 x 16: launch-bound) and 1024 (16 x 64), at tensor parallelism ``tp``; and
    the models."""
    import torch

    from megatron_topd import parallel
    from megatron_topd.models import ModelSpec, build_gpt_model

    parallel.initialize(tp, 1, seed=0)
    t, models = {}, {}
    for layers in (1, 3):
        spec = ModelSpec(vocab_size=128, hidden_size=96, num_layers=layers, num_attention_heads=4, num_kv_heads=4,
                         ffn_hidden_size=256)
        model = models[layers] = build_gpt_model(spec)
        for rows, width in ((1, 16), (16, 64)):
            tokens = torch.randint(0, 128, (rows, width), generator=torch.Generator().manual_seed(rows))
            positions = torch.arange(width)[None].expand(rows, -1)

            def forward():
                with torch.no_grad():
                    model(input_ids=tokens, position_ids=positions, attention_mask=None)

            def forward_backward():
                model(input_ids=tokens, position_ids=positions, attention_mask=None).float().sum().backward()

            t[layers, rows * width] = (_best(forward, reps=21), _best(forward_backward, reps=21))
    return t, models


def _per_call_and_token(t: dict, prefix: str = "") -> dict:
    """Per layer and outside the layers (the 1-layer model less one layer), forward and train: the cost per call
    (the 16-token intercept) and per token (the slope to 1024 tokens)."""
    out = {}
    for i, kind in enumerate(("forward", "train")):
        layer = {n: (t[3, n][i] - t[1, n][i]) / 2 for n in (16, 1024)}
        model = {n: t[1, n][i] - layer[n] for n in (16, 1024)}
        for part, times in (("layer", layer), ("model", model)):
            slope = (times[1024] - times[16]) / (1024 - 16)
            out[f"{prefix}{part}_{kind}_token_s"] = slope
            out[f"{prefix}{part}_{kind}_s"] = times[16] - 16 * slope
    return out


def tp_layer_job() -> dict:
    """Two ranks at TP=2: the d96 layer's per-rank costs (its all-reduces included): how a small layer's per-token
    work splits over TP ranks."""
    return _per_call_and_token(_layer_times(2)[0], prefix="tp2_")


def layer_pass_job() -> dict:
    """One rank: the d96 layer's and the model's costs per call and per token, forward (no grad) and forward +
    backward; one Megatron schedule call around a microbatch's forward; one optimizer step."""
    import torch

    from megatron_topd.train.step import run_schedule

    t, models = _layer_times(1)
    out = _per_call_and_token(t)
    batch = {"tokens": torch.randint(0, 128, (1, 16)), "position_ids": torch.arange(16)[None]}
    with torch.no_grad():
        scheduled = _best(lambda: run_schedule([models[1]], [batch], _zero_loss, forward_only=True), reps=21)
    out["schedule_call_s"] = scheduled - t[1, 16][0]
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
    return {"collective_latency_s": latency, "collective_bytes_per_s": big.numel() * 4 / max(seconds - latency, 1e-9)}


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
            return _best(lambda: client.generate(prompts, params), reps=3)

        run(1, 4)  # warm-up
        step = {b: (run(b, 40) - run(b, 8)) / 32 for b in (1, 48)}
        call = run(1, 1, 40)
        prefill = (run(48, 1, 40) - call) / 47
    per_seq = (step[48] - step[1]) / 47
    return {"decode_step_overhead_s": step[1] - per_seq, "decode_seq_step_s": per_seq,
            "decode_tokens_per_s_batch48": 48 / step[48], "prefill_request_s": prefill, "server_call_s": call}


LAYER_FLOPS_PER_TOKEN = 2 * (96 * 3 * 96 + 96 * 96 + 96 * 2 * 256 + 256 * 96) + 2 * 4 * 24 * 64  # the d96 layer, S=64


def profile_fields(fig: dict) -> dict:
    """The `DeviceProfile` fields from the figures: a layer's per-token cost as the FLOP/s it reaches (GEMMs and
    elementwise work at this width), the backward's cost relative to the forward, the per-call costs."""
    return {
        "flops": LAYER_FLOPS_PER_TOKEN / fig["layer_forward_token_s"],
        "backward_ratio": fig["layer_train_token_s"] / fig["layer_forward_token_s"] - 1,
        "memory_bytes_per_s": fig["memory_bytes_per_s"],
        **{k: fig[k] for k in ("decode_step_overhead_s", "decode_seq_step_s", "prefill_request_s", "server_call_s",
                               "layer_forward_s", "layer_train_s", "model_forward_token_s", "schedule_call_s",
                               "optimizer_step_s", "collective_latency_s", "collective_bytes_per_s",
                               "filesystem_bytes_per_s", "ot_seconds_per_window") if k in fig},
        "model_forward_s": max(0.0, fig["model_forward_s"]), "model_train_s": max(0.0, fig["model_train_s"]),
        "inter_node_bytes_per_s": fig["collective_bytes_per_s"],
        **({"tp_speedup": fig["layer_forward_token_s"] / _tp2_compute_token_s(fig)}
           if "tp2_layer_forward_token_s" in fig else {}),
    }


def _tp2_compute_token_s(fig: dict) -> float:
    """A TP=2 rank's per-token forward cost of the d96 layer less its two all-reduces' bytes (which the model counts
    apart): what the rank computes."""
    return fig["tp2_layer_forward_token_s"] - 2 * 96 * 4 / fig["collective_bytes_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-sglang", action="store_true")
    ap.add_argument("--root", default=str(REPO / "runs" / "calibrate_cpu"))
    ap.add_argument("--from-json", help="derive the profile fields from figures this script printed before")
    ap.add_argument("--only-tp", action="store_true", help="only the TP=2 layer figures")
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
    fig.update(run_on_ranks(layer_pass_job, 1, timeout=300)[0])
    fig.update(run_on_ranks(gloo_job, 2, timeout=300)[0])
    fig.update(run_on_ranks(tp_layer_job, 2, timeout=300)[0])
    if not args.skip_sglang:
        fig.update(sglang_decode(root))
    fig["cpu"] = _cpu_name()
    print(json.dumps({"figures": fig, "profile": profile_fields(fig)}, indent=2))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} x {os.cpu_count()}"
    return f"{os.cpu_count()} cores"


if __name__ == "__main__":
    main()
