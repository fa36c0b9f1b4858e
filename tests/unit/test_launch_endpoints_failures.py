"""A server role that fails to start is reported through its `.failed` file: the trainer's wait ends at once with
role, node, log and the log's last lines (not after launch.endpoint_timeout_s). And the network knobs."""
from __future__ import annotations

import time

import pytest

from megatron_topd.launch import endpoints
from megatron_topd.launch.config import LaunchConfig, interface_address, network_env, published_address


def test_a_failed_server_ends_the_wait_at_once(tmp_path):
    endpoints.publish(tmp_path, "teacher", "x4-0", "http://x4:1", log="t.log")
    endpoints.publish_failure(tmp_path, "student", "x3-0", node="x3", log="/logs/sglang-x3-1.log",
                              tail="line 1\nsafetensors: incomplete file", error="exited with code 1")
    t0 = time.monotonic()
    with pytest.raises(endpoints.ServerRoleFailed) as e:
        endpoints.wait_for(tmp_path, {"student": 1, "teacher": 1}, timeout_s=600, poll_s=0.01)
    assert time.monotonic() - t0 < 5
    msg = str(e.value)
    assert "student server x3-0 on node x3 failed: exited with code 1" in msg
    assert "/logs/sglang-x3-1.log" in msg and "safetensors: incomplete file" in msg


def test_a_failure_of_an_earlier_attempt_is_ignored(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    endpoints.publish_failure(tmp_path, "student", "x3-0", node="x3", log="l", tail="t", error="e")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # the requeued attempt
    endpoints.publish(tmp_path, "student", "x3-0", "http://x3:1")
    assert endpoints.wait_for(tmp_path, {"student": 1}, timeout_s=5, poll_s=0.01) == {"student": ["http://x3:1"]}


def test_network_interface_sets_the_socket_interfaces_and_the_published_address():
    assert network_env(LaunchConfig()) == {}
    lc = LaunchConfig(network_interface="lo")
    assert network_env(lc) == {"NCCL_SOCKET_IFNAME": "lo", "GLOO_SOCKET_IFNAME": "lo"}
    assert interface_address("lo") == "127.0.0.1"
    assert published_address(lc, "node7") == "127.0.0.1"
    assert published_address(LaunchConfig(), "node7") == "node7"
    with pytest.raises(ValueError, match="launch.network_interface='nosuchif0'"):
        interface_address("nosuchif0")
