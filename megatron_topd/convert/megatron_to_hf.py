"""Megatron distributed checkpoint -> HF folder (safetensors shards + index, config.json, tokenizer files).

One process at TP=PP=1: the model is built in the checkpoint's dtype without random initialisation, its weights are
loaded with `checkpointing.load_model_weights`, and `export_hf_weights` (the same code weight sync uses) streams
HF-named tensors into size-bounded safetensors shards. Host memory: one model copy + one shard.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from megatron_topd.convert.export import export_hf_weights
from megatron_topd.convert.families import hf_config_from_spec, spec_from_hf_config
from megatron_topd.convert.hf_to_megatron import DTYPES, HF_CONFIG_FILE, SPEC_FILE, build_model, copy_tokenizer_files
from megatron_topd.convert.safetensors_io import ShardedSafetensorsWriter
from megatron_topd.models.spec import ModelSpec

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16"}


def resolve_checkpoint(ckpt: str | Path) -> tuple[Path, Path]:
    """(step folder, folder holding model_spec.yaml) for a checkpoint root (latest step) or a step folder."""
    from megatron_topd.checkpointing import latest_step

    ckpt = Path(ckpt)
    if (ckpt / "metadata.json").exists():  # a dist-checkpoint folder itself
        return ckpt, ckpt if (ckpt / SPEC_FILE).exists() else ckpt.parent
    step = latest_step(ckpt)
    if step is None:
        raise FileNotFoundError(
            f"{ckpt}: neither a dist checkpoint (metadata.json) nor a checkpoint root (latest_step.txt); "
            "pass --ckpt the folder written by convert_hf_to_megatron or the trainer"
        )
    return ckpt / f"step_{step:08d}", ckpt


def checkpoint_dtype(step_dir: Path) -> str:
    """The dtype the checkpoint stores its weights in ('fp32' or 'bf16'), from its metadata."""
    from megatron.core import dist_checkpointing

    meta = dist_checkpointing.load_tensors_metadata(str(step_dir))
    key = "embedding.word_embeddings.weight"
    if key not in meta:
        raise ValueError(f"{step_dir}: no {key} in the checkpoint; is this a GPTModel checkpoint?")
    dtype = meta[key].dtype
    for name, torch_dtype in DTYPES.items():
        if dtype == torch_dtype:
            return name
    raise ValueError(f"{step_dir}: weights stored as {dtype}; supported: {sorted(DTYPES)}")


def convert_megatron_to_hf(
    ckpt: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    spec_path: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
    log: Callable[[str], None] = print,
) -> ModelSpec:
    """Write an HF folder that transformers loads. Needs `parallel.initialize(1, 1)` first.

    `dtype`: output dtype ('fp32'/'bf16'; default: as stored). `spec_path`: model_spec.yaml when it is not beside
    the checkpoint (trainer checkpoints).
    """
    from megatron_topd.checkpointing import load_model_weights

    step_dir, root = resolve_checkpoint(ckpt)
    spec_file = Path(spec_path) if spec_path else root / SPEC_FILE
    if not spec_file.exists():
        raise FileNotFoundError(f"{spec_file} does not exist: pass --spec PATH/TO/{SPEC_FILE}")
    spec = ModelSpec.load_yaml(spec_file)
    stored = checkpoint_dtype(step_dir)
    out_dtype = dtype or stored
    if out_dtype not in DTYPES:
        raise ValueError(f"dtype={out_dtype!r}: use one of {sorted(DTYPES)}")
    model = build_model(spec, stored)
    load_model_weights(step_dir, [model])
    out = Path(out_dir)
    writer = ShardedSafetensorsWriter(out, max_shard_bytes)
    for name, tensor in export_hf_weights(model, spec, dtype=DTYPES[out_dtype]):
        writer.add(name, tensor)
    files = writer.close()
    base_file = root / HF_CONFIG_FILE
    base = json.loads(base_file.read_text()) if base_file.exists() else {}
    config = hf_config_from_spec(spec, base)
    config.pop("torch_dtype", None)
    config["dtype"] = _DTYPE_NAMES[DTYPES[out_dtype]]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if {**spec_from_hf_config(config).to_dict(), "extra": spec.extra} != spec.to_dict():  # must describe the same model
        raise AssertionError("internal error: config.json written does not round-trip to the checkpoint's ModelSpec")
    copied = copy_tokenizer_files(root, out)
    size = writer.total_bytes / 2**20
    log(f"wrote {len(files)} file(s), {size:.1f} MiB ({out_dtype}) + config.json + {copied} -> {out}")
    return spec
