"""Vocabulary-parallel losses: KL (reverse/forward), log-probs, entropy, top-k KL and the fused OPD scores.

Every rank holds only its [..., V_local] shard of the logits (Megatron's layout); only per-token scalars cross ranks,
full-vocabulary logits are never gathered. Tokens are processed in chunks, so the extra memory is a few fp32
[chunk, V_local] buffers whatever the sequence length, and backward recomputes each chunk's softmax instead of saving
it. Gradients are exact at any tensor-parallel size (explicit autograd.Function backward). See docs/losses.md.
"""
from megatron_topd.losses.entropy import vocab_parallel_entropy
from megatron_topd.losses.kl import vocab_parallel_kl
from megatron_topd.losses.log_probs import vocab_parallel_log_probs
from megatron_topd.losses.scores import OPDScores, vocab_parallel_opd_scores
from megatron_topd.losses.topk_kl import vocab_parallel_topk_kl

__all__ = [
    "OPDScores",
    "vocab_parallel_entropy",
    "vocab_parallel_kl",
    "vocab_parallel_log_probs",
    "vocab_parallel_opd_scores",
    "vocab_parallel_topk_kl",
]
