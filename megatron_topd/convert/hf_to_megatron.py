"""HF checkpoint folder -> Megatron distributed checkpoint (+ ModelSpec YAML, original config, tokenizer files).

Output folder layout (what `tools/convert_hf_to_megatron.py --out OUT` writes):

    OUT/step_00000000/        Megatron dist checkpoint (torch_dist, per-parameter ShardedTensors: loads at any TP/PP)
    OUT/latest_step.txt       "0"  (so `checkpointing.load_checkpoint(OUT, ...)` finds it)
    OUT/model_spec.yaml       the ModelSpec (rebuilds the model without the HF folder)
    OUT/hf_config.json        the original config.json (token ids etc. for the way back to HF)
    OUT/convert_meta.json     source, dtype, intended layout, skipped tensor names
    OUT/tokenizer*.json ...   the tokenizer files and generation_config.json, copied unchanged

Load the weights into a model at any layout with
`checkpointing.load_model_weights(OUT / "step_00000000", [model])`.

The checkpoint is written by `checkpointing.save_checkpoint` from one process: the model is built once at
TP=PP=1 without random initialisation (`perform_initialization=False`), each parameter is filled from the safetensors
shards one HF tensor group at a time, and saved. Host memory is therefore about one copy of the model in the target
dtype plus one layer's tensors (see docs/conversion.md).
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from megatron_topd.convert import layout
from megatron_topd.convert.families import check_layout, spec_from_hf_config
from megatron_topd.convert.live import canonical_parameters, tied_output_copies
from megatron_topd.convert.mapping import check_hf_names, hf_shapes, tensor_maps, to_megatron
from megatron_topd.convert.safetensors_io import SafetensorsReader
from megatron_topd.models.spec import ModelSpec

SPEC_FILE = "model_spec.yaml"
HF_CONFIG_FILE = "hf_config.json"
META_FILE = "convert_meta.json"
STEP_DIR = "step_00000000"
# Copied verbatim between HF folders and converted checkpoints when present.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json",
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def read_hf_config(hf_dir: str | Path) -> dict:
    path = Path(hf_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: --hf must be a Hugging Face model folder with config.json")
    return json.loads(path.read_text())


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied


def build_model(spec: ModelSpec, dtype: str = "fp32", *, initialize: bool = False):
    """A GPTModel for `spec` on the current layout, parameters in `dtype`, left uninitialised unless `initialize`."""
    from megatron_topd.models import PrecisionConfig, build_gpt_model

    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {sorted(DTYPES)}")
    return build_gpt_model(spec, precision=PrecisionConfig(params_dtype=dtype), perform_initialization=initialize)


def check_hf_checkpoint(spec: ModelSpec, reader: SafetensorsReader) -> list[str]:
    """Names and shapes of every tensor against the spec, before any model exists; returns skipped names."""
    skipped = check_hf_names(spec, reader.names())
    bad = [
        f"{name}: {reader.shape(name)} (expected {shape})"
        for name, shape in hf_shapes(spec).items()
        if reader.shape(name) != shape
    ]
    if bad:
        raise ValueError(f"{len(bad)} tensor(s) have shapes that do not fit config.json: {bad[:6]}")
    return skipped


def _this_rank_part(m, reader: SafetensorsReader, spec: ModelSpec, split: tuple[int, int]) -> torch.Tensor:
    """The full Megatron tensor of `m` read from the HF files, cut to this rank's TP shard (`split` = (size, rank))."""
    full = to_megatron(m, [reader.get(name) for name in m.hf], spec)
    size, rank = split
    return full if size == 1 or m.tp == "replicated" else layout.split_tp(m.tp, full, size)[rank]


@torch.no_grad()
def load_hf_weights(model, spec: ModelSpec, reader: SafetensorsReader) -> None:
    """Fill this rank's parameters (its stage, its TP shards) from the HF tensors, one parameter at a time."""
    from megatron.core import parallel_state as ps

    local = canonical_parameters(model, spec)
    tp = (ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank())
    etp = (ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()) if spec.is_moe else tp
    for m in tensor_maps(spec):
        if m.megatron not in local:
            continue
        part = _this_rank_part(m, reader, spec, etp if m.expert else tp)
        param = local[m.megatron]
        if param.shape != part.shape:
            raise ValueError(f"{m.megatron}: Megatron shard {tuple(param.shape)} != converted {tuple(part.shape)}")
        param.copy_(part)
    for copy in tied_output_copies(model, spec):  # last stage at PP > 1: Megatron's copy of the tied embedding
        copy.copy_(_this_rank_part(tensor_maps(spec)[0], reader, spec, tp))
    if spec.tie_word_embeddings and "lm_head.weight" in reader.names():
        if not torch.equal(reader.get("lm_head.weight"), reader.get("model.embed_tokens.weight")):
            raise ValueError(
                "config.json says tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight; "
                "fix tie_word_embeddings in config.json"
            )


def inspect_hf_checkpoint(
    hf_dir: str | Path, tensor_parallel: int = 1, pipeline_parallel: int = 1
) -> tuple[dict, ModelSpec, SafetensorsReader, list[str]]:
    """(config, spec, reader, skipped names): every check that needs no model, so bad input fails in seconds.

    Raises UnsupportedModelError (architecture/feature), ValueError (layout, shapes), TensorNamesError (missing or
    unexpected tensors), CheckpointFilesError / FileNotFoundError (missing files).
    """
    config = read_hf_config(hf_dir)
    spec = spec_from_hf_config(config)
    check_layout(spec, tensor_parallel, pipeline_parallel)
    reader = SafetensorsReader(hf_dir)
    return config, spec, reader, check_hf_checkpoint(spec, reader)


def auto_dtype(config: dict) -> str:
    """The lossless target dtype for a checkpoint stored as config.json's (torch_)dtype: bf16 stays bf16, else fp32."""
    stored = config.get("dtype") or config.get("torch_dtype") or "float32"
    return "bf16" if str(stored).removeprefix("torch.") == "bfloat16" else "fp32"


def convert_hf_to_megatron(
    hf_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "auto",
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    log: Callable[[str], None] = print,
) -> ModelSpec:
    """Write the converted checkpoint (layout in the module docstring). Needs `parallel.initialize(1, 1)` first.

    `dtype`: 'fp32', 'bf16' or 'auto' (see `auto_dtype`). `tensor_parallel`/`pipeline_parallel` are the layout you
    intend to train at: validated against the model now (clear errors, e.g. heads not divisible by TP) and recorded;
    the checkpoint itself loads at any layout.
    """
    from megatron.core import parallel_state as ps

    from megatron_topd.checkpointing import save_checkpoint

    hf_dir, out = Path(hf_dir), Path(out_dir)
    config, spec, reader, skipped = inspect_hf_checkpoint(hf_dir, tensor_parallel, pipeline_parallel)
    dtype = auto_dtype(config) if dtype == "auto" else dtype
    if (out / STEP_DIR).exists():
        raise FileExistsError(f"{out / STEP_DIR} already exists: remove it or choose another --out")
    if ps.get_tensor_model_parallel_world_size() * ps.get_pipeline_model_parallel_world_size() != 1:
        raise RuntimeError("convert_hf_to_megatron runs at TP=PP=1: call parallel.initialize(1, 1) first")
    if skipped:
        log(f"skipping {len(skipped)} tensor(s) that are not weights of the Megatron model: {skipped[:4]}")
    t0 = time.perf_counter()
    model = build_model(spec, dtype)
    load_hf_weights(model, spec, reader)
    t_load = time.perf_counter() - t0
    save_checkpoint(out, 0, [model])
    t_save = time.perf_counter() - t0 - t_load
    spec.save_yaml(out / SPEC_FILE)
    (out / HF_CONFIG_FILE).write_text(json.dumps(config, indent=2))
    copied = copy_tokenizer_files(hf_dir, out)
    if not any(name.startswith("tokenizer") for name in copied):
        log(f"warning: no tokenizer files in {hf_dir}; add them to {out} before training")
    meta = dict(
        source=str(hf_dir.resolve()),
        dtype=dtype,
        intended_tensor_parallel=tensor_parallel,
        intended_pipeline_parallel=pipeline_parallel,
        skipped_hf_tensors=skipped,
        tokenizer_files=copied,
    )
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    n_params = sum(p.numel() for p in model.parameters())
    log(
        f"converted {spec.family} ({n_params / 1e6:.2f} M params, {dtype}): "
        f"load {t_load:.1f} s, save {t_save:.1f} s -> {out}"
    )
    return spec
