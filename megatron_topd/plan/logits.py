"""The last stage's vocabulary-sized buffers: student logits, their gradient, the loss's chunk workspace, and the
co-located teacher's logit stash. All [tokens, V/TP]-shaped (DESIGN section 7: never [tokens, V] on one rank).

- student logits: [T, V/TP] fp32, kept from the output layer through the loss's backward (train/batches.py);
- their gradient: the same size, written by the loss's explicit backward before the output layer's backward;
- chunk workspace: the vocabulary-parallel losses work on `loss_chunk_size` tokens at a time with two [chunk, V/TP]
  fp32 temporaries alive at once (shifted exponentials, per-chunk gradient); without chunking, chunk = T;
- teacher stash: the co-located teacher runs forward-only over G = `train.teacher_group_microbatches` microbatches
  and keeps their logit shards, in its params dtype, until the student consumed them: G x T x V/TP x 2 B in bf16
  (train/teacher.py).
"""
from __future__ import annotations

FP32 = 4
CHUNK_TEMPORARIES = 2


def student_logits(tokens: int, vocab_per_rank: int) -> int:
    return tokens * vocab_per_rank * FP32


def logits_gradient(tokens: int, vocab_per_rank: int) -> int:
    return tokens * vocab_per_rank * FP32


def loss_chunk_workspace(tokens: int, vocab_per_rank: int, chunk: int | None) -> int:
    return CHUNK_TEMPORARIES * min(tokens, chunk or tokens) * vocab_per_rank * FP32


def teacher_logit_stash(group_microbatches: int, tokens: int, vocab_per_rank: int, dtype_bytes: int = 2) -> int:
    """The teacher's output layer returns logits in its params dtype (bf16: 2 B); the loss upcasts per chunk."""
    return group_microbatches * tokens * vocab_per_rank * dtype_bytes
