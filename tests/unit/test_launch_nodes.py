"""Slurm host lists expanded in Python (a task in a stock container has no `scontrol`): hand cases."""
from __future__ import annotations

import pytest

from megatron_topd.launch.nodes import expand, step_nodes


@pytest.mark.parametrize("nodelist,names", [
    ("", []),
    ("n1", ["n1"]),
    ("n[1-3]", ["n1", "n2", "n3"]),
    ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
    ("n[1-3,5],gpu-a[01-02]", ["n1", "n2", "n3", "n5", "gpu-a01", "gpu-a02"]),
    ("gpu[001-003]", ["gpu001", "gpu002", "gpu003"]),
    ("gpu[08-11]", ["gpu08", "gpu09", "gpu10", "gpu11"]),   # zero padding kept across the decade
    ("n[9-11]", ["n9", "n10", "n11"]),                      # no padding without a leading zero
    ("n[0-1]", ["n0", "n1"]),
    ("gpu07,n[2],login", ["gpu07", "n2", "login"]),
    ("rack[1-2]-n[01-02]", ["rack1-n01", "rack1-n02", "rack2-n01", "rack2-n02"]),  # several brackets: product
    ("a[1,3]b[5-6]c", ["a1b5c", "a1b6c", "a3b5c", "a3b6c"]),
    ("tp1-node[7],tp2-node[10-11]", ["tp1-node7", "tp2-node10", "tp2-node11"]),
    ("10.78.0.[11-12]", ["10.78.0.11", "10.78.0.12"]),
])
def test_expand_hand_cases(nodelist, names):
    assert expand(nodelist) == names


def test_expand_needs_no_slurm_client(monkeypatch):
    """What a container without Slurm's binaries sees: nothing on PATH."""
    monkeypatch.setenv("PATH", "/nonexistent")
    assert expand("gpu[001-017]") == [f"gpu{i:03d}" for i in range(1, 18)]
    monkeypatch.setenv("SLURM_STEP_NODELIST", "t[1-2]")
    assert step_nodes() == ["t1", "t2"]


@pytest.mark.parametrize("bad", ["n[1-3", "n1-3]", "n[a-b]", "n[3-1]", "n[[1]]", "n[1-]"])
def test_malformed_lists_are_errors(bad):
    with pytest.raises(ValueError, match="node list"):
        expand(bad)
