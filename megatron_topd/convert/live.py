"""This rank's parameters of a live (possibly TP/PP-sharded, possibly TE-spec) GPTModel under canonical names.

Why: parameter names differ between Megatron's local layer spec (CPU) and the Transformer Engine spec (GPU: layer
norms fused into the next linear), and a pipeline stage numbers its layers from 0. Canonical names are the local
spec's, with the global layer index, exactly as `mapping.tensor_maps` lists them.
"""
from __future__ import annotations

import torch

from megatron_topd.convert.mapping import tensor_maps
from megatron_topd.models.spec import ModelSpec

# Transformer Engine spec name -> local spec name (within one decoder layer).
TE_ALIASES = {
    "self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
    "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight",
}
LAYERS = "decoder.layers."


def model_chunks(model) -> list:
    """The unwrapped GPTModel chunks of `model` (one module, a DDP/Float16 wrapper, or a list of virtual stages)."""
    from megatron_topd.checkpointing import unwrap

    return [unwrap(m) for m in (model if isinstance(model, (list, tuple)) else [model])]


def canonical_parameters(model, spec: ModelSpec) -> dict[str, torch.nn.Parameter]:
    """{canonical name: this rank's parameter (its TP shard)} for every parameter this rank holds.

    The output layer of the last stage under tied embeddings (a copy of the embedding Megatron keeps in sync) is
    left out. Raises ValueError on parameters the HF mapping does not know (e.g. a different expert implementation).
    """
    known = {m.megatron for m in tensor_maps(spec)}
    out: dict[str, torch.nn.Parameter] = {}
    unknown = []
    for chunk in model_chunks(model):
        for name, param in chunk.named_parameters():
            if name.startswith(LAYERS):
                local, rest = name[len(LAYERS) :].split(".", 1)
                layer = chunk.decoder.layers[int(local)].layer_number - 1  # layer_number is global and 1-based
                name = f"{LAYERS}{layer}.{TE_ALIASES.get(rest, rest)}"
            if name == "output_layer.weight" and spec.tie_word_embeddings:
                continue
            if name not in known:
                unknown.append(name)
            out[name] = param
    if unknown:
        raise ValueError(
            f"the model has parameters with no HF counterpart for ModelSpec(family={spec.family!r}): {unknown[:8]}; "
            "the spec does not describe this model, or its layer spec (e.g. grouped-GEMM experts) is not supported"
        )
    return out


def tied_output_copies(model, spec: ModelSpec) -> list[torch.nn.Parameter]:
    """The last stage's copies of the embedding (output layer weight) under tied embeddings and PP > 1.

    Megatron keeps them equal to the embedding (all-reduced at build, gradients summed in training); whoever writes
    the embedding from outside must write these too.
    """
    if not spec.tie_word_embeddings:
        return []
    return [p for chunk in model_chunks(model) for n, p in chunk.named_parameters() if n == "output_layer.weight"]
