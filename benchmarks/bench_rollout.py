"""Rollout-layer figures on a real SGLang server: generation tokens/s, and the time of each weight-sync path.

    .venv/bin/python benchmarks/bench_rollout.py                      # tiny random Llama built on the fly (CPU)
    .venv/bin/python benchmarks/bench_rollout.py --model-path DIR --device cuda --dtype bfloat16

Generation: `--prompts` prompts x `--n` samples x `--max-new-tokens` tokens at temperature 1 (EOS ignored so every
sample has full length), after one warm-up call. Sync: each path pushes the model's own weights (perturbed) `--repeats`
times; the table shows the median wall time of a whole sync (pause, push, version check, continue).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", default=None, help="HF checkpoint dir (default: a tiny random Llama)")
    ap.add_argument("--python", default=".venv-sglang/bin/python", help="interpreter with sglang")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=512.0)
    args = ap.parse_args()

    from megatron_topd.rollout import SamplingParams, SGLangClient, SGLangServer
    from megatron_topd.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, TensorWeightSync

    work = Path(tempfile.mkdtemp(prefix="bench_rollout_"))
    model_dir = Path(args.model_path) if args.model_path else _tiny_model(work / "model")
    state = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        state.update(load_file(str(f)))
    vocab = _vocab(model_dir)

    t0 = time.perf_counter()
    with SGLangServer(model_dir, python=args.python, device=args.device, dtype=args.dtype, log_dir=work / "logs",
                      context_length=args.prompt_len + args.max_new_tokens + 8, startup_timeout_s=900) as server:
        print(f"server healthy in {time.perf_counter() - t0:.1f}s ({server.url}, log {server.log_path})")
        client = SGLangClient([server.url], vocab_size=vocab, progress=False)
        gen = torch.Generator().manual_seed(0)
        prompts = torch.randint(0, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
        params = SamplingParams(max_new_tokens=args.max_new_tokens, n=args.n, temperature=1.0, ignore_eos=True)
        client.generate(prompts[:2], SamplingParams(max_new_tokens=8, n=1))  # warm-up
        t = time.perf_counter()
        gens = client.generate(prompts, params)
        dt = time.perf_counter() - t
        tokens = sum(len(g.token_ids) for row in gens for g in row)
        print(f"\ngeneration: {args.prompts} prompts x n={args.n} x {args.max_new_tokens} new tokens = {tokens} tokens "
              f"in {dt:.2f}s -> {tokens / dt:.1f} tokens/s ({args.prompts * args.n / dt:.2f} samples/s)")

        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        bucket = int(args.bucket_mb * 2**20)
        syncs = [
            DiskWeightSync([server.url], work / "sync", model_path=model_dir, bucket_bytes=bucket),
            DistributedWeightSync([server.url], backend="nccl" if args.device == "cuda" else "gloo", bucket_bytes=bucket),
            TensorWeightSync([server.url], bucket_bytes=bucket),  # last: its close() ends torch's shm manager
        ]
        print(f"\nweight sync of {len(state)} tensors, {nbytes / 2**20:.2f} MiB, bucket {args.bucket_mb} MiB "
              f"(median of {args.repeats}; first call of distributed includes forming the group):")
        print(f"{'path':<12} {'median s':>9} {'first s':>9} {'MiB/s':>9}")
        for sync in syncs:
            times = []
            for r in range(args.repeats):
                new = {k: v + 0.01 * (r + 1) for k, v in state.items()}
                stats = sync.sync(iter(new.items()), f"{sync.method}-{r}")
                times.append(stats.seconds)
            sync.close()
            med = statistics.median(times)
            print(f"{sync.method:<12} {med:>9.3f} {times[0]:>9.3f} {nbytes / 2**20 / med:>9.1f}")


def _tiny_model(path: Path) -> Path:
    from megatron_topd.testing.tiny_hf import build_tiny_model

    return build_tiny_model(path)


def _vocab(model_dir: Path) -> int:
    import json

    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


if __name__ == "__main__":
    main()
