#!/usr/bin/env python
"""Convert a Megatron checkpoint (from convert_hf_to_megatron or the trainer) to a Hugging Face folder.

    python tools/convert_megatron_to_hf.py --ckpt CKPT --out HF_OUT [--dtype bf16|fp32] [--spec model_spec.yaml]

CKPT is a checkpoint root (its latest step is used) or one step folder. Writes safetensors shards (+ index),
config.json and the tokenizer files kept beside the checkpoint; transformers loads the result with
`AutoModelForCausalLM.from_pretrained(HF_OUT)`. Runs in one process (gloo, 1 rank). Exit 2: bad input.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="checkpoint root (latest_step.txt) or step_XXXXXXXX folder")
    p.add_argument("--out", required=True, help="output Hugging Face folder")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default=None, help="output dtype (default: as stored)")
    p.add_argument("--spec", default=None, help="model_spec.yaml when it is not in the checkpoint root")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size limit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from megatron_topd import parallel
    from megatron_topd.convert.megatron_to_hf import convert_megatron_to_hf

    import torch.distributed as dist

    owns_process_group = not dist.is_initialized()  # leave a caller's process group as we found it
    parallel.initialize(1, 1)
    try:
        convert_megatron_to_hf(
            args.ckpt, args.out, dtype=args.dtype, spec_path=args.spec, max_shard_bytes=int(args.max_shard_gb * 2**30)
        )
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if owns_process_group:
            parallel.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
