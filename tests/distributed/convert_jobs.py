"""Rank functions for the conversion tests (module level: the harness spawns them).

Two spawns cover everything: one 1-rank process runs both command-line tools on every family, one 4-rank process
loads the converted checkpoints at TP=2, PP=2 and TP2xPP2 (re-initialising the parallel layout in between) and
computes logits and `export_hf_weights` there.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
LAYOUTS = ((2, 1), (1, 2), (2, 2))


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_tools(work: str, names: list[str]) -> dict:
    """tools/convert_hf_to_megatron.py --verify (dtype auto), then tools/convert_megatron_to_hf.py, per HF folder
    `work/hf_<name>` (1 rank)."""
    to_megatron, to_hf = _tool("convert_hf_to_megatron"), _tool("convert_megatron_to_hf")
    out = {}
    for name in names:
        hf, mg, back = f"{work}/hf_{name}", f"{work}/mg_{name}", f"{work}/back_{name}"
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            rc_in = to_megatron.main(["--hf", hf, "--out", mg, "--tp", "2", "--pp", "2",
                                      "--verify", "--tolerance", "1e-4"])
            rc_out = to_hf.main(["--ckpt", mg, "--out", back])
        out[name] = {"rc_in": rc_in, "rc_out": rc_out, "stdout": stdout.getvalue()}
    return out


def layouts_logits_and_export(work: str, families: list[str], tokens: torch.Tensor) -> dict:
    """Per layout and family: full logits (on the last stage's TP rank 0 of DP replica 0) and the export stream."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_topd import parallel
    from megatron_topd.convert import export_hf_weights
    from megatron_topd.convert.hf_to_megatron import STEP_DIR, build_model, load_hf_weights
    from megatron_topd.convert.safetensors_io import SafetensorsReader
    from megatron_topd.convert.verify import megatron_logits
    from megatron_topd.models import ModelSpec
    from megatron_topd.checkpointing import load_model_weights

    result = {}
    for tp, pp in LAYOUTS:
        layout = parallel.initialize(tp, pp)
        for family in families:
            spec = ModelSpec.load_yaml(f"{work}/mg_{family}/model_spec.yaml")
            model = build_model(spec, "fp32", initialize=True)  # random first: loading must overwrite everything
            load_model_weights(f"{work}/mg_{family}/{STEP_DIR}", [model])
            logits = megatron_logits(model, tokens, spec.vocab_size)
            stream = [(name, tensor) for name, tensor in export_hf_weights(model, spec)]
            # The importer also fills a sharded model directly (its TP shards, its stage): same logits, bit for bit.
            direct = build_model(spec, "fp32", initialize=True)
            load_hf_weights(direct, spec, SafetensorsReader(f"{work}/hf_{family}"))
            direct_logits = megatron_logits(direct, tokens, spec.vocab_size)
            same_direct = logits is None or torch.equal(direct_logits, logits)
            keep_logits = logits is not None and layout.tp_rank == 0 and layout.dp_rank == 0
            result[(tp, pp, family)] = {
                "logits": logits if keep_logits else None,
                "same_direct": same_direct,
                "names": [name for name, _ in stream],
                "tensors": {n: t for n, t in stream if t is not None},
                "stage": ps.get_pipeline_model_parallel_rank(),
            }
            del model, direct
        dist.barrier()
    return result
