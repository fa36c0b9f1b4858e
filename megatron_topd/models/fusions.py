"""Which of Megatron-Core's fused kernels a model is built with: on where the installed stack runs them, off on CPU.

One decision (`fusion_flags`) from what the stack has (`Stack`), each rule the check Megatron-Core 0.19.2 itself makes
when the flag is on (or the kernel the flag reaches):

- ``bias_activation_fusion`` (SwiGLU, `fusions/fused_bias_swiglu.py`) and ``bias_dropout_fusion``
  (`fusions/fused_bias_dropout.py`): functions under Megatron's ``jit_fuser``, i.e. ``torch.compile``, whose GPU
  kernels are Triton's: CUDA + Triton. The fused SwiGLU saves only fc1's output for its backward (it recomputes
  SiLU); the unfused one also keeps SiLU's output and the linear half (2 f per token more; plan/activations.py).
- ``apply_rope_fusion``: TransformerConfig refuses it unless Transformer Engine's fused RoPE imports
  (`rope_utils.fused_apply_rotary_pos_emb`, TE >= 1.4): CUDA + that kernel. With TE present the layers are TE's, so
  the per-token RoPE positions of shared-prefix rows (local layers only, models/shared_prefix.py) never meet it.
- ``gradient_accumulation_fusion``: the output layer is Megatron's own ColumnParallelLinear even under TE, and it
  raises unless apex's ``fused_weight_gradient_mlp_cuda`` imports (`tensor_parallel/layers.py`): CUDA + that
  extension (TE layers fuse with their own kernel). Every trained model is wrapped in Megatron's DDP, which gives
  each weight the ``main_grad`` the fused kernel accumulates into.
- ``masked_softmax_fusion``: always off. It reaches only Megatron's local attention (TE layers run their own), and
  there the fused causal kernel (`fusions/fused_softmax.py`, ScaledUpperTriangMaskedSoftmax) ignores an explicit
  mask: shared-prefix rows, which the local layers use, would attend across windows.
- ``persist_layer_norm``: always off: apex's persistent LayerNorm; these models are RMSNorm (TE's norm, or torch's,
  which asserts it off).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass


@dataclass(frozen=True)
class Stack:
    """What the machine has that a fusion needs."""

    cuda: bool = False
    triton: bool = False  # torch.compile's GPU code generator (Megatron's jit_fuser)
    te_fused_rope: bool = False  # Transformer Engine's fused RoPE kernel imports
    apex_gradient_accumulation: bool = False  # apex's fused_weight_gradient_mlp_cuda imports

    @classmethod
    def installed(cls) -> Stack:
        import torch

        cuda = torch.cuda.is_available()
        return cls(cuda=cuda, triton=importlib.util.find_spec("triton") is not None,
                   te_fused_rope=cuda and _te_fused_rope(),
                   apex_gradient_accumulation=importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None)


# The stacks the planner's activation profiles stand for (plan/activations.py): a GPU node with Transformer Engine
# (megatron-core imports Triton unconditionally, so it is there; apex is not assumed), and this project's CPU runs.
GPU_TE = Stack(cuda=True, triton=True, te_fused_rope=True)
CPU = Stack()


def fusion_flags(stack: Stack) -> dict[str, bool]:
    """TransformerConfig's fusion fields for a model built on ``stack`` (module docstring: why each)."""
    jit = stack.cuda and stack.triton
    return {
        "bias_activation_fusion": jit,
        "bias_dropout_fusion": jit,
        "apply_rope_fusion": stack.cuda and stack.te_fused_rope,
        "gradient_accumulation_fusion": stack.cuda and stack.apex_gradient_accumulation,
        "masked_softmax_fusion": False,
        "persist_layer_norm": False,
    }


def _te_fused_rope() -> bool:
    try:
        from megatron.core.models.common.embeddings import rope_utils
    except Exception:  # noqa: BLE001 - a broken TE install raises RuntimeError from inside megatron's import
        return False
    return rope_utils.fused_apply_rotary_pos_emb is not None
