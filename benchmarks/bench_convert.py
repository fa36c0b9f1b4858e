"""Wall time and peak host memory (RSS) of the HF <-> Megatron converters, to size a 70B conversion.

Each conversion runs in a fresh process; its peak RSS (ru_maxrss) minus that of a process that only imports and
initialises the same stack (`baseline`) is the conversion's own memory, to be compared with the model's bytes.
Models: the four tiny test families, and a scaled-up Llama (~160 M parameters) where the per-byte cost is visible.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_convert.py [--work DIR] [--no-scaled] [--models NAME ...]
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Runs a tool (or just the imports) in this process and prints the process's peak RSS.
WRAPPER = r"""
import resource, runpy, sys
tool, args = sys.argv[1], sys.argv[2:]
if tool == "baseline":
    import transformers, megatron.core
    import megatron_topd.convert.hf_to_megatron, megatron_topd.convert.megatron_to_hf
    from megatron_topd import parallel
    parallel.initialize(1, 1)
else:
    sys.argv = [tool] + args
    try:
        runpy.run_path(tool, run_name="__main__")
    except SystemExit as exc:
        if exc.code:
            raise
print("PEAK_RSS_KB", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
SCALED = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=4, vocab_size=32000)


def run(tool: str, *args: str) -> tuple[float, float, str]:
    """(wall seconds, peak RSS MiB, stdout) of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, tool, *args], capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{tool} {args} failed:\n{proc.stderr[-3000:]}")
    rss = int(re.search(r"PEAK_RSS_KB (\d+)", proc.stdout).group(1)) / 1024
    return wall, rss, proc.stdout


def model_bytes(hf_dir: Path) -> int:
    index = hf_dir / "model.safetensors.index.json"
    if index.exists():
        return json.loads(index.read_text())["metadata"]["total_size"]
    return (hf_dir / "model.safetensors").stat().st_size


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", default=None)
    p.add_argument("--no-scaled", action="store_true")
    p.add_argument("--models", nargs="*", default=None, help="subset of: llama qwen2 qwen3 qwen3_moe llama_160m")
    args = p.parse_args()
    from megatron_topd.testing.tiny_families import FAMILIES, build_family_model

    work = Path(args.work or tempfile.mkdtemp(prefix="bench_convert_"))
    models = {f: (f, {}) for f in FAMILIES}
    if not args.no_scaled:
        models["llama_160m"] = ("llama", SCALED)
    models = {k: v for k, v in models.items() if args.models is None or k in args.models}
    _, base_rss, _ = run("baseline")
    print(f"baseline (imports + 1-rank init): peak RSS {base_rss:.0f} MiB")
    print(f"{'model':12s} {'dir':6s} {'dtype':5s} {'MiB':>8s} {'wall s':>7s} {'peak RSS MiB':>13s} {'- baseline':>11s}")
    for name, (family, overrides) in models.items():
        hf = work / f"hf_{name}"
        if not hf.exists():
            # (no tokenizer for the scaled model: the offline BPE corpus is too small for a 32k vocabulary)
            build_family_model(hf, family, max_shard_size="100MB" if overrides else "200KB",
                               tokenizer=not overrides, **overrides)
        size = model_bytes(hf) / 2**20
        for dtype in ("fp32", "bf16") if overrides else ("fp32",):
            mg, back = work / f"mg_{name}_{dtype}", work / f"back_{name}_{dtype}"
            for d in (mg, back):
                subprocess.run(["rm", "-rf", str(d)], check=True)
            wall, rss, out = run("tools/convert_hf_to_megatron.py", "--hf", str(hf), "--out", str(mg), "--dtype", dtype)
            print(f"{name:12s} {'->mg':6s} {dtype:5s} {size:8.1f} {wall:7.1f} {rss:13.0f} {rss - base_rss:11.0f}"
                  f"   {out.strip().splitlines()[-2] if len(out.splitlines()) > 1 else ''}")
            wall, rss, _ = run("tools/convert_megatron_to_hf.py", "--ckpt", str(mg), "--out", str(back))
            print(f"{name:12s} {'->hf':6s} {dtype:5s} {size:8.1f} {wall:7.1f} {rss:13.0f} {rss - base_rss:11.0f}")


if __name__ == "__main__":
    main()
