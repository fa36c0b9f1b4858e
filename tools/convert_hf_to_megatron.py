#!/usr/bin/env python
"""Convert a Hugging Face checkpoint (Llama, Qwen2, Qwen3, Qwen3-MoE) to a Megatron distributed checkpoint.

    python tools/convert_hf_to_megatron.py --hf HF_DIR --out OUT [--tp 8 --pp 2] [--dtype auto|bf16|fp32] [--verify]

Runs in one process (gloo, 1 rank). Writes OUT/step_00000000 (loadable at any TP/PP), OUT/model_spec.yaml, the
original config and the tokenizer files; see docs/conversion.md. --tp/--pp are validated and recorded, nothing more.
--verify runs the HF model and the converted checkpoint (fp32, same weights) on the same random tokens, prints the
max absolute logit difference and exits 1 above --tolerance. Exit 2: bad input (message names the problem).
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="Hugging Face model folder (config.json + safetensors)")
    p.add_argument("--out", required=True, help="output folder for the Megatron checkpoint")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size you will train at (validated, recorded)")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size you will train at (validated, recorded)")
    p.add_argument("--dtype", choices=("auto", "bf16", "fp32"), default="auto",
                   help="stored dtype; auto: bf16 if the HF checkpoint is bf16, else fp32 (lossless)")
    p.add_argument("--verify", action="store_true", help="compare HF and Megatron logits after converting")
    p.add_argument("--tolerance", type=float, default=1e-3, help="max abs logit difference accepted by --verify")
    p.add_argument("--verify-seq-len", type=int, default=32)
    return p.parse_args(argv)


def verify(out: str, hf_dir: str, spec, dtype: str, args) -> float:
    """Max |logit difference| between the HF model and the written checkpoint loaded into an fp32 Megatron model."""
    import torch

    from megatron_topd.convert.hf_to_megatron import STEP_DIR, build_model
    from megatron_topd.convert.verify import hf_logits, megatron_logits, random_tokens
    from megatron_topd.checkpointing import load_model_weights

    tokens = random_tokens(spec.vocab_size, batch=2, seq=args.verify_seq_len)
    model = build_model(spec, "fp32")
    load_model_weights(f"{out}/{STEP_DIR}", [model])
    got = megatron_logits(model, tokens, spec.vocab_size)
    del model
    want = hf_logits(hf_dir, tokens, round_to=torch.bfloat16 if dtype == "bf16" else None)
    return float((got - want).abs().max())


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_topd.convert.hf_to_megatron import auto_dtype, convert_hf_to_megatron, inspect_hf_checkpoint

    try:  # everything that needs no model first: bad input fails in seconds, before Megatron is imported
        config, spec, _, _ = inspect_hf_checkpoint(args.hf, args.tp, args.pp)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from megatron_topd import parallel

    import torch.distributed as dist

    owns_process_group = not dist.is_initialized()  # leave a caller's process group as we found it
    parallel.initialize(1, 1)
    try:
        dtype = auto_dtype(config) if args.dtype == "auto" else args.dtype
        try:
            convert_hf_to_megatron(args.hf, args.out, dtype=dtype, tensor_parallel=args.tp, pipeline_parallel=args.pp)
        except (ValueError, FileNotFoundError, FileExistsError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if args.verify:
            diff = verify(args.out, args.hf, spec, dtype, args)
            ok = diff <= args.tolerance
            print(f"verify: max |logit diff| HF vs Megatron = {diff:.3e} (tolerance {args.tolerance:.1e}): "
                  f"{'OK' if ok else 'FAILED'}")
            if not ok:
                return 1
    finally:
        if owns_process_group:
            parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
