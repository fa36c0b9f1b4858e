"""Remote teacher scoring: bytes and seconds per 1,000 response tokens for top-k in {1, 8, 64} (SGLang prefill,
`max_new_tokens=0`), beside the co-located scoring pass (Megatron teacher + student forward, TP=1) on the same rows.

The tiny demo models (CPU, float32; a real SGLang CPU server for the teacher). Bytes are the HTTP response bodies of
the same requests the client sends (JSON; `return_text_in_logprobs` off, SGLang's default), measured with raw requests.

    .venv/bin/python benchmarks/bench_remote_teacher.py [--rows 16 --response 128]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _bytes(url: str, seqs: list[list[int]], start: int, k: int) -> int:
    total = 0
    for seq in seqs:
        payload = {"input_ids": [seq], "sampling_params": [{"max_new_tokens": 0, "temperature": 0.0}],
                   "return_logprob": True, "logprob_start_len": start - 1, "top_logprobs_num": k}
        req = urllib.request.Request(url + "/generate", data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req) as resp:
            total += len(resp.read())
    return total


def colocated(assets: dict, prompts, responses) -> float:
    """Seconds of the co-located scoring pass (teacher forward + student forward + fused scores) on the rows."""
    from megatron_topd import parallel
    from megatron_topd.checkpointing import load_model_weights
    from megatron_topd.models import ModelSpec, build_gpt_model
    from megatron_topd.train.batches import rollout_microbatches
    from megatron_topd.train.handoffs import RolloutRows
    from megatron_topd.train.scoring import score_rollouts
    from megatron_topd.train.teacher import ColocatedTeacher

    parallel.initialize(1, 1, seed=0)
    models = []
    for name in ("student_ckpt", "teacher_ckpt"):
        spec = ModelSpec.load_yaml(Path(assets[name]) / "model_spec.yaml")
        m = build_gpt_model(spec)
        load_model_weights(Path(assets[name]) / "step_00000000", [m])
        models.append(m)
    rows = RolloutRows(prompts, responses)
    batches = rollout_microbatches(rows, 4096, 0)
    args = dict(rows=len(rows), width=max(rows.lengths()), group_size=2, vocab_size=spec.vocab_size, chunk_size=None)
    score_rollouts([models[0]], ColocatedTeacher([models[1]]), batches, **args)  # warm-up
    t = time.perf_counter()
    score_rollouts([models[0]], ColocatedTeacher([models[1]]), batches, **args)
    return time.perf_counter() - t


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from megatron_topd.testing.tiny_assets import build_tiny_assets as build_assets
    from megatron_topd.parallel.spawn import run_on_ranks
    from megatron_topd.rollout import SGLangClient, SGLangServer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--response", type=int, default=128)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_remote_"))
    assets = build_assets(work / "assets")
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 998, (16,), generator=g).tolist() for _ in range(args.rows)]
    responses = [torch.randint(3, 998, (args.response,), generator=g).tolist() for _ in range(args.rows)]
    n_tokens = args.rows * args.response

    server = SGLangServer(assets["teacher_hf"], python=str(REPO / ".venv-sglang" / "bin" / "python"), dtype="float32",
                          context_length=512, log_dir=work / "logs", startup_timeout_s=900)
    server.start()
    try:
        server.wait_healthy()
        client = SGLangClient([server.url], vocab_size=1000, context_length=512, progress=False)
        seqs = [p + r for p, r in zip(prompts, responses)]
        client.score(seqs, start=16, top_logprobs=1)  # warm-up
        table = Table(title=f"Teacher scoring per 1,000 response tokens ({args.rows} rows x {args.response} tokens)")
        for col in ("teacher", "KiB / 1k tokens", "s / 1k tokens"):
            table.add_column(col, justify="right")
        for k in (0, 1, 8, 64):
            t = time.perf_counter()
            client.score(seqs, start=16, top_logprobs=k)
            seconds = time.perf_counter() - t
            size = _bytes(server.url, seqs, 16, k)
            label = "remote, sampled token only" if k == 0 else f"remote, top-{k}"
            table.add_row(label, f"{size / 1024 / n_tokens * 1000:.1f}", f"{seconds / n_tokens * 1000:.3f}")
            print(label, size, seconds, flush=True)
    finally:
        server.stop()
    (seconds,) = run_on_ranks(colocated, 1, {k: str(v) for k, v in assets.items()}, prompts, responses)
    table.add_row("co-located (teacher + student forward)", "0 (in the trainer)", f"{seconds / n_tokens * 1000:.3f}")
    Console().print(table)


if __name__ == "__main__":
    main()
