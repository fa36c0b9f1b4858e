"""Config-field checks shared by the config sections: each error names `section.field`, the value and what to use."""
from __future__ import annotations

import math


def choice(section: str, name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{section}.{name}={value!r} is not supported: use one of {', '.join(allowed)}")


def int_at_least(section: str, name: str, value: object, lo: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{section}.{name}={value!r}: use an integer >= {lo} {note}".rstrip())


def int_in(section: str, name: str, value: object, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{section}.{name}={value!r}: use an integer in [{lo}, {hi}]")


def number_in(section: str, name: str, value: object, lo: float, hi: float, *, lo_open: bool = False,
              hi_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{section}.{name}={value!r}: use a number in {left}{lo}, {hi}{right}")
