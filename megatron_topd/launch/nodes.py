"""Slurm node lists (torch-free)."""
from __future__ import annotations

import os
import subprocess


def expand(nodelist: str) -> list[str]:
    """`n[1-3],gpu07` -> ['n1', 'n2', 'n3', 'gpu07'] (scontrol's own expansion)."""
    if not nodelist:
        return []
    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True, capture_output=True, text=True)
    return out.stdout.split()


def step_nodes() -> list[str]:
    """The nodes of this job step, in Slurm's order (a single node when not under Slurm)."""
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if not nodelist:
        from megatron_topd.launch.endpoints import node_name

        return [node_name()]
    return expand(nodelist)
