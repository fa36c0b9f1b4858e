"""Vectorised decoding of SGLang's log-prob lists (`meta_info.output_token_logprobs`, `input_token_logprobs`,
`*_top_logprobs`: entries `[logprob, token_id, text]`), without a Python loop per token.

Columns are split with `zip(*entries)` and types read with `set(map(type, ...))` (both run in C), values are checked
with numpy. The fast path accepts exactly what the per-entry checks in client.py accept for JSON input (int/float
log-probs, not bool/NaN/above 1e-4; int ids; top-k rows of the expected width, sorted best first) and returns the
same values; anything else returns None, and the caller runs its per-entry checks, which raise the same error as
before. (orjson would parse faster still, but the trainer's pins do not include it; numpy is there.)
"""
from __future__ import annotations

from itertools import chain
from typing import Any

import numpy as np

NUMBERS = {int, float}


def split_logprobs(entries: Any) -> tuple[list[float], tuple] | None:
    """`(log-probs as floats, token ids)` of `[[logprob, id, ...], ...]`, or None if any entry needs a closer look."""
    if type(entries) is not list:
        return None
    if not entries:
        return [], ()
    values, ids = _columns(entries)
    if values is None:
        return None
    return values.tolist(), ids


def split_top_logprobs(rows: Any, width: int) -> list[list[tuple[int, float]]] | None:
    """Per position `[(id, logprob), ...]` (best first) of rows of `width` entries each, or None if any row or
    entry needs a closer look (wrong width, a non-int id, an invalid log-prob, rows not sorted best first)."""
    if type(rows) is not list or not set(map(type, rows)) <= {list} or not set(map(len, rows)) <= {width}:
        return None
    if not rows or width == 0:
        return [[] for _ in rows]
    values, ids = _columns(list(chain.from_iterable(rows)))
    if values is None or not set(map(type, ids)) <= {int}:
        return None
    values = values.reshape(len(rows), width)
    if (values[:, 1:] > values[:, :-1] + 1e-6).any():
        return None
    id_rows = np.asarray(ids, dtype=np.int64).reshape(len(rows), width).tolist()
    return [list(zip(i, v)) for i, v in zip(id_rows, values.tolist())]


def _columns(entries: list) -> tuple[np.ndarray | None, tuple]:
    """Log-probs (float64, checked) and ids of non-empty `entries`; (None, ()) when they need the per-entry checks."""
    if not set(map(type, entries)) <= {list, tuple} or min(map(len, entries)) < 2:
        return None, ()
    columns = list(zip(*entries))
    if not set(map(type, columns[0])) <= NUMBERS:
        return None, ()
    values = np.asarray(columns[0], dtype=np.float64)
    if np.isnan(values).any() or (values > 1e-4).any():
        return None, ()
    return values, columns[1]
