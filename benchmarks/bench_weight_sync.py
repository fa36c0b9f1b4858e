"""Weight sync at TP2 x PP2 (4 gloo ranks) to real CPU SGLang servers: the rank-0 funnel against the per-stage push.

- old: `sync(export_hf_weights(model))`: every stage's TP rank 0 sends its full tensors to global rank 0, which
  broadcasts every bucket over one group, one bucket after another.
- new: `sync_model(model)`: each stage's first TP rank broadcasts its own stage's buckets over its own group, the next
  bucket gathered while the current one is on the wire (rollout/weight_sync/distributed.py).

Both run in one job, on the same servers and the same weights, alternating (old, new, old, new, ...), after one
untimed sync of each (group set-up). Reported per path: seconds per sync (pause to continue, on rank 0) and the bytes
through global rank 0: broadcast out, point-to-point in (`dist.recv`), TP gathers in (`dist.gather`), counted by
wrapping those two torch calls on rank 0. The student: a Llama built at run time (offline), hidden 1024, 16 layers,
vocab 1000, fp32: about 245 M parameters (~0.98 GB), so the push dominates the sync.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_weight_sync.py [--repeats 4]   (about 3 minutes)
    (or: make bench-weight-sync ARGS="--repeats 4")

Measured on 2 shared cores, --repeats 4 (docs/rollout.md): old 5.19 s/sync (4.51-6.21), new 4.16 s (3.96-4.56), new/old
0.80; through rank 0 1.718 GB -> 0.736 GB (0.43 of the old bytes; 0.33 without the TP gathers, the same in both).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STUDENT = dict(hidden_size=1024, intermediate_size=4096, num_layers=16, num_heads=16, num_kv_heads=4,
               vocab_size=1000)


def _count_rank0_bytes(counter: dict) -> None:
    """Count the bytes global rank 0 receives by point-to-point and by TP gathers (the export's two inbound paths)."""
    import torch.distributed as dist

    recv, gather = dist.recv, dist.gather

    def counting_recv(tensor, *a, **kw):
        counter["p2p_in"] += tensor.numel() * tensor.element_size()
        return recv(tensor, *a, **kw)

    def counting_gather(tensor, gather_list=None, *a, **kw):
        if gather_list:
            counter["gather_in"] += sum(t.numel() * t.element_size() for t in gather_list[1:])
        return gather(tensor, gather_list, *a, **kw)

    dist.recv, dist.gather = counting_recv, counting_gather


def bench_on_rank(urls: list[str], hf_dir: str, repeats: int, bucket_mb: int) -> dict | None:
    import torch.distributed as dist

    from megatron_topd import parallel
    from megatron_topd.convert import export_hf_weights
    from megatron_topd.convert.hf_to_megatron import build_model, inspect_hf_checkpoint, load_hf_weights
    from megatron_topd.rollout.weight_sync import DistributedWeightSync

    parallel.initialize(2, 2)
    _, spec, reader, _ = inspect_hf_checkpoint(hf_dir, 2, 2)
    model = build_model(spec, "fp32")
    load_hf_weights(model, spec, reader)
    counter = {"p2p_in": 0, "gather_in": 0}
    if dist.get_rank() == 0:
        _count_rank0_bytes(counter)
    sync = DistributedWeightSync(urls, backend="gloo", bucket_bytes=bucket_mb * 2**20, timeout_s=1800)
    paths = {
        "old": lambda v: sync.sync(export_hf_weights(model, spec), v),
        "new": lambda v: sync.sync_model(model, spec, v),
    }
    runs: dict[str, list] = {"old": [], "new": []}
    try:
        for i in range(repeats + 1):  # round 0: group set-up, untimed
            for name, push in paths.items():
                dist.barrier()
                before = dict(counter)
                stats = push(f"{name}-{i}")
                if stats is not None and i > 0:
                    runs[name].append({"s": stats.seconds, "broadcast_out": stats.num_bytes,
                                       "stage_bytes": stats.stage_bytes, "buckets": stats.num_buckets,
                                       **{k: counter[k] - before[k] for k in counter}})
    finally:
        sync.close()
    return runs if dist.get_rank() == 0 else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=2, help="timed syncs per path")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--bucket-mb", type=int, default=64)
    p.add_argument("--work", default=None)
    args = p.parse_args()

    from megatron_topd.parallel.spawn import run_on_ranks
    from megatron_topd.rollout import SGLangServer
    from megatron_topd.testing.tiny_hf import build_tiny_model

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_weight_sync_"))
    hf_dir = work / "student"
    if not (hf_dir / "model.safetensors").exists():
        build_tiny_model(hf_dir, arch="llama", seed=0, **STUDENT)
    # mem_fraction_static: the CPU default (0.05 of host memory) leaves this model no KV cache
    servers = [SGLangServer(hf_dir, python=REPO / ".venv-sglang/bin/python", dtype="float32", context_length=512,
                            mem_fraction_static=0.12, log_dir=work / "logs", startup_timeout_s=900)
               for _ in range(args.servers)]
    try:
        for s in servers:
            s.start()
        urls = [s.wait_healthy().url for s in servers]
        runs = run_on_ranks(bench_on_rank, 4, urls, str(hf_dir), args.repeats, args.bucket_mb, timeout=3600)[0]
    finally:
        for s in servers:
            s.stop()
    total = runs["new"][0]["broadcast_out"]
    print(f"student: {total / 1e9:.2f} GB fp32 at TP2 x PP2, {args.servers} CPU SGLang servers, buckets of "
          f"{args.bucket_mb} MiB, {args.repeats} timed syncs per path (mean; min-max)")
    print(f"{'path':5s} {'s/sync':>7s} {'range':>13s} {'rank0 out GB':>13s} {'p2p in GB':>10s} {'gather in GB':>13s} "
          f"{'rank0 total GB':>15s} {'per stage GB':>14s}")
    summary = {}
    for name, rows in runs.items():
        secs = [r["s"] for r in rows]
        r = rows[-1]
        out = r["stage_bytes"][0] if r["stage_bytes"] else r["broadcast_out"]
        through = out + r["p2p_in"] + r["gather_in"]
        summary[name] = {**r, "s": statistics.mean(secs), "rank0_bytes": through, "rank0_out": out}
        stages = " ".join(f"{b / 1e9:.2f}" for b in r["stage_bytes"]) if r["stage_bytes"] else "-"
        print(f"{name:5s} {statistics.mean(secs):7.2f} {min(secs):6.2f}-{max(secs):6.2f} {out / 1e9:13.3f} "
              f"{r['p2p_in'] / 1e9:10.3f} {r['gather_in'] / 1e9:13.3f} {through / 1e9:15.3f} {stages:>14s}")
    old, new = summary["old"], summary["new"]
    print(f"rank 0 carries {new['rank0_bytes'] / old['rank0_bytes']:.3f} of the old bytes (target <= 1/PP = 0.5); "
          f"time new/old = {new['s'] / old['s']:.2f}")
    print("JSON " + json.dumps({"repeats": args.repeats, "servers": args.servers, "bucket_mb": args.bucket_mb,
                                "runs": runs}))


if __name__ == "__main__":
    main()
