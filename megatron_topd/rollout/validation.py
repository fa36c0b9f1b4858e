"""Checks of token-id inputs, run before a request leaves the client (an out-of-range id crashes an SGLang server)."""
from __future__ import annotations

from typing import Sequence


# SGLang (0.5.23, managers/tp_worker.py and managers/utils.py validate_input_length) refuses an input of
# max_req_input_len = min(context_len, KV pool) - 6 tokens or more, whatever it is asked to generate.
SGLANG_INPUT_MARGIN = 7


def longest_input(context_length: int | None) -> int | None:
    """The longest input (prompt, or a sequence to score) a server of this context length accepts: 7 tokens less."""
    return None if context_length is None else context_length - SGLANG_INPUT_MARGIN


def check_token_sequences(
    seqs: Sequence[Sequence[int]],
    *,
    what: str,
    vocab_size: int | None,
    max_new_tokens: int = 0,
    context_length: int | None = None,
) -> list[list[int]]:
    """Return `seqs` as lists of ints; raise ValueError naming the first bad sequence/position and the fix."""
    if isinstance(seqs, (str, bytes)) or not isinstance(seqs, Sequence):
        raise ValueError(f"{what} must be a list of token-id lists, got {type(seqs).__name__}")
    if len(seqs) == 0:
        raise ValueError(f"{what} is empty: pass at least one token-id list")
    out = []
    for i, seq in enumerate(seqs):
        if isinstance(seq, (str, bytes)) or not isinstance(seq, Sequence):
            raise ValueError(f"{what}[{i}] is a {type(seq).__name__}: pass token ids (tokenize text first)")
        if len(seq) == 0:
            raise ValueError(f"{what}[{i}] is empty: each needs at least one token")
        ids = list(seq)
        for j, tok in enumerate(ids):
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise ValueError(f"{what}[{i}][{j}]={tok!r} is not an int token id")
            if tok < 0 or (vocab_size is not None and tok >= vocab_size):
                raise ValueError(
                    f"{what}[{i}][{j}]={tok} is outside the vocabulary [0, {vocab_size}): "
                    "the ids must come from the served model's tokenizer"
                )
        if context_length is not None and len(ids) + max_new_tokens > context_length:
            raise ValueError(
                f"{what}[{i}] has {len(ids)} tokens + max_new_tokens={max_new_tokens} > the server's context length "
                f"{context_length}: shorten it, lower max_new_tokens, or start the servers with a longer context"
            )
        if context_length is not None and len(ids) > longest_input(context_length):
            raise ValueError(
                f"{what}[{i}] has {len(ids)} tokens: SGLang takes at most {longest_input(context_length)} input tokens "
                f"at context length {context_length} ({SGLANG_INPUT_MARGIN} below it): shorten it, or start the "
                "servers with a longer context"
            )
        out.append(ids)
    return out
