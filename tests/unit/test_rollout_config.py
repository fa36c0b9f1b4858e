"""RolloutConfig.validate names the bad field and the fix."""
from __future__ import annotations

import pytest

from megatron_topd.rollout import RolloutConfig


def good(**kw) -> RolloutConfig:
    return RolloutConfig(model_path="/models/tiny", **kw)


def test_defaults_validate():
    cfg = good().validate()
    assert cfg.sync_method == "distributed" and cfg.resolved_sync_backend == "gloo"
    assert good(device="cuda").resolved_sync_backend == "nccl"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(model_path=""), r"rollout\.model_path is empty"),
        (dict(temperature=-0.5), r"rollout\.temperature=-0\.5"),
        (dict(top_p=0.0), r"rollout\.top_p=0\.0: use a number in \(0\.0, 1\.0\]"),
        (dict(n_samples=0), r"rollout\.n_samples=0"),
        (dict(max_new_tokens=0), r"rollout\.max_new_tokens=0"),
        (dict(sync_method="nfs"), r"rollout\.sync_method='nfs' is not supported: use one of disk, tensor, distributed"),
        (dict(sync_backend="nccl"), r"sync_backend='nccl' with rollout\.device='cpu'"),
        (dict(num_servers=2, ports=[30000]), r"rollout\.ports has 1 entries for rollout\.num_servers=2"),
        (dict(urls=["127.0.0.1:30000"]), r"rollout\.urls\[0\]='127\.0\.0\.1:30000': use a full URL"),
        (dict(sync_bucket_mb=0), r"rollout\.sync_bucket_mb=0"),
        (dict(pause_mode="stop"), r"rollout\.pause_mode='stop'"),
        (dict(top_k=0), r"rollout\.top_k=0: use an integer >= 1 \(or -1 for off\)"),
        (dict(max_retries=True), r"rollout\.max_retries=True"),
        (dict(extra_server_args=["--max-total-tokens", 16384]),
         r"rollout\.extra_server_args\[1\]=16384 is not a string: quote it"),
    ],
)
def test_bad_fields_are_named(kw, match):
    cfg = good()
    for k, v in kw.items():
        setattr(cfg, k, v)
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_urls_replace_model_path():
    RolloutConfig(urls=["http://10.0.0.5:30000"]).validate()


def test_student_servers_run_priority_scheduling_only_with_async_rollouts(tmp_path):
    """rollout.windows_first: the Slurm launcher's student servers (not the teacher's) get SGLang's priority
    scheduling when rollouts are async, so the probe's windows go ahead of the next step's queued rollouts."""
    from megatron_topd.launch.config import LaunchConfig
    from megatron_topd.launch.servers import servers_on_node

    lc = LaunchConfig(trainer_nodes=1, student_nodes=1, teacher_nodes=1)
    for async_rollouts, windows_first, want in ((True, True, True), (False, True, False), (True, False, False)):
        data = {"train": {"async_rollouts": async_rollouts, "student_hf_path": str(tmp_path / "s")},
                "teacher": {"hf_path": str(tmp_path / "t")}, "rollout": {"windows_first": windows_first}}
        for role in ("student", "teacher"):
            (spec,) = servers_on_node(data, lc, role, ["node1"], 0, log_dir=tmp_path, dist_init_port=29000,
                                      port=30000)
            flagged = "--enable-priority-scheduling" in spec.server.command()
            assert flagged == (want and role == "student"), (async_rollouts, windows_first, role)
    with pytest.raises(ValueError, match="rollout.windows_first"):
        RolloutConfig(model_path=str(tmp_path), windows_first="yes").validate()


def test_teacher_servers_take_teacher_context_length(tmp_path):
    """teacher.context_length reaches the Slurm launcher's teacher servers (the student's keep the rollouts')."""
    from megatron_topd.launch.config import LaunchConfig
    from megatron_topd.launch.servers import servers_on_node

    lc = LaunchConfig(trainer_nodes=1, student_nodes=1, teacher_nodes=1)
    for teacher_context, want in ((None, "512"), (2048, "2048")):
        data = {"train": {"student_hf_path": str(tmp_path / "s")}, "rollout": {"context_length": 512},
                "teacher": {"hf_path": str(tmp_path / "t"), "context_length": teacher_context}}
        got = {}
        for role in ("student", "teacher"):
            (spec,) = servers_on_node(data, lc, role, ["node1"], 0, log_dir=tmp_path, dist_init_port=29000,
                                      port=30000)
            cmd = spec.server.command()
            got[role] = cmd[cmd.index("--context-length") + 1]
        assert got == {"student": "512", "teacher": want}, teacher_context
