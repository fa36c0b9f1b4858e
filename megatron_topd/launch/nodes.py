"""Slurm node lists (torch-free, and free of Slurm's client: a task in a stock container image has no `scontrol`,
no slurm.conf and no munge socket, so the list in SLURM_JOB_NODELIST / SLURM_STEP_NODELIST is expanded here)."""
from __future__ import annotations

import os
import re

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top(text: str) -> list[str]:
    """Split at the commas outside brackets: 'n[1-3,5],gpu07' -> ['n[1-3,5]', 'gpu07']."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
            if depth > 1:
                raise ValueError(f"node list {text!r}: nested '[' at {i}")
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"node list {text!r}: ']' without '[' at {i}")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError(f"node list {text!r}: '[' not closed")
    parts.append(text[start:])
    return [p for p in (p.strip() for p in parts) if p]


def _bracket_values(body: str, where: str) -> list[str]:
    """'1-3,5' -> ['1', '2', '3', '5']; '08-11' -> ['08', '09', '10', '11'] (the width of the range's first number
    is kept when it is zero-padded, as Slurm does)."""
    out = []
    for item in body.split(","):
        m = _RANGE.match(item.strip())
        if not m:
            raise ValueError(f"node list {where!r}: {item!r} is not a number or a range a-b")
        lo_s, hi_s = m.group(1), m.group(2)
        if hi_s is None:
            out.append(lo_s)
            continue
        lo, hi = int(lo_s), int(hi_s)
        if hi < lo:
            raise ValueError(f"node list {where!r}: range {item!r} runs backwards")
        width = len(lo_s) if lo_s.startswith("0") and len(lo_s) > 1 else 0
        out.extend(str(v).zfill(width) for v in range(lo, hi + 1))
    return out


def _expand_one(item: str) -> list[str]:
    """One host expression, possibly with several brackets: 'r[1-2]-n[01-02]' -> r1-n01 r1-n02 r2-n01 r2-n02."""
    names = [""]
    rest = item
    while rest:
        i = rest.find("[")
        if i < 0:
            names = [n + rest for n in names]
            break
        j = rest.index("]", i)
        values = _bracket_values(rest[i + 1:j], item)
        names = [n + rest[:i] + v for n in names for v in values]
        rest = rest[j + 1:]
    return names


def expand(nodelist: str) -> list[str]:
    """A Slurm host list as the names it stands for, in Slurm's order (`scontrol show hostnames` without Slurm):
    `n[1-3,5],gpu-a[01-02]` -> n1 n2 n3 n5 gpu-a01 gpu-a02; several brackets in one name give their product."""
    if not nodelist or not nodelist.strip():
        return []
    out: list[str] = []
    for item in _split_top(nodelist.strip()):
        out.extend(_expand_one(item))
    return out


def step_nodes() -> list[str]:
    """The nodes of this job step, in Slurm's order (a single node when not under Slurm)."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        from megatron_topd.launch.endpoints import node_name

        return [node_name()]
    return expand(nodelist)
