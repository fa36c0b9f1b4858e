"""The whole TOPD loop at TP=2 over gloo against real SGLang CPU servers: train, sync weights, checkpoint, resume."""
import json

import pytest

from megatron_topd.parallel.spawn import run_on_ranks
from tests.integration.conftest import REPO, sglang_python


def run_training(config_overrides: list[str]) -> list[dict]:
    from megatron_topd.config import load_config
    from megatron_topd.train.loop import train

    return train(load_config(REPO / "examples" / "cpu_demo.yaml", config_overrides))


def demo_overrides(assets: dict, tmp_path, *, colocated: bool = True, servers: dict | None = None) -> list[str]:
    """The tiny demo run in `tmp_path/run`: its checkpoints, prompts, servers' interpreter and logs; with `servers`
    (the `demo_servers` fixture, or its student alone) it runs on those instead of launching its own."""
    teacher = [f"teacher.checkpoint={assets['teacher_ckpt']}"] if colocated else []
    for role, field in (("student", "rollout.urls"), ("teacher", "teacher.urls")):
        if role in (servers or {}):
            teacher.append(f"{field}={json.dumps(servers[role])}")
    return teacher + [
        f"train.student_checkpoint={assets['student_ckpt']}", f"train.student_hf_path={assets['student_hf']}",
        f"teacher.hf_path={assets['teacher_hf']}", f"train.prompts_path={assets['prompts']}",
        f"train.output_dir={tmp_path / 'run'}", f"rollout.server_python={sglang_python()}",
        f"rollout.server_log_dir={tmp_path}/logs", "train.prompts_per_step=2", "rollout.n_samples=2",
        "topd.lambda_traj=1",
    ]


@pytest.mark.slow
@pytest.mark.sglang
def test_topd_loop_trains_syncs_and_resumes(tmp_path, demo_assets, demo_servers):
    out = tmp_path / "run"
    overrides = demo_overrides(demo_assets, tmp_path, servers=demo_servers) + [
        "rollout.max_new_tokens=24", "topd.window=8", "train.save_interval=1", "train.keep_checkpoints=2"]
    first = run_on_ranks(run_training, 2, overrides + ["train.steps=2"], timeout=1200)
    reduced = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_s") and k != "sync_mb"} for r in rows]  # noqa: E731
    assert reduced(first[0]) == reduced(first[1]), "every rank reports the same (reduced) metrics"
    rows = first[0]
    assert [r["response_tokens"] > 0 for r in rows] == [True, True]
    for r in rows:
        assert 0 < r["loss"] < 50 and r["grad_norm"] > 0
        assert r["loss"] == pytest.approx(r["opd_loss"] + r["traj_loss"], rel=1e-5)  # lambda_traj = 1
        assert r["candidates"] > 0 and 0 <= r["low_divergence_share"] <= 1 and r["guidance_windows"] == r["divergent"]
    assert all(r["sync_mb"] > 0 for r in first[0])  # rank 0 pushed the weights
    # Rollouts of step 2 were sampled from the weights pushed after step 1.
    records = [json.loads(line) for line in (out / "rollouts" / "step_00000001.jsonl").read_text().splitlines()]
    assert {r["weight_version"] for r in records} == {"1"}
    assert (out / "checkpoints" / "latest_step.txt").read_text() == "2"
    assert (out / "metrics.png").stat().st_size > 0 and any((out / "tensorboard").iterdir())

    # Resume: starts at step 2, first brings the servers (which hold step 2's weights, as on a restart they would
    # hold the initial student's) to the resumed student, then runs step 3.
    second = run_on_ranks(run_training, 2, overrides + ["train.steps=3"], timeout=1200)
    assert len(second[0]) == 1
    records = [json.loads(line) for line in (out / "rollouts" / "step_00000002.jsonl").read_text().splitlines()]
    assert {r["weight_version"] for r in records} == {"2"}
    assert (out / "checkpoints" / "latest_step.txt").read_text() == "3"
    # train.keep_checkpoints=2: steps 1, 2, 3 were saved, the newest two remain
    assert sorted(d.name for d in (out / "checkpoints").glob("step_*")) == ["step_00000002", "step_00000003"]


def run_remote_training(config_overrides: list[str]) -> dict:
    """One training run; counts the Megatron models the trainer builds (the real builder runs)."""
    import megatron_topd.train.setup as setup
    from megatron_topd.config import load_config
    from megatron_topd.train.loop import train

    built = []
    real_build = setup.build_gpt_model
    setup.build_gpt_model = lambda spec, **kw: built.append(spec) or real_build(spec, **kw)
    try:
        history = train(load_config(REPO / "examples" / "cpu_demo.yaml", config_overrides))
    finally:
        setup.build_gpt_model = real_build
    return {"history": history, "models_built": len(built)}


@pytest.mark.slow
@pytest.mark.sglang
@pytest.mark.parametrize("kl", ["topk", "sampled"])
def test_topd_step_with_a_remote_teacher_builds_no_teacher_model(tmp_path, kl, demo_assets, demo_servers):
    overrides = demo_overrides(demo_assets, tmp_path, colocated=False, servers=demo_servers) + [
        "teacher.placement=remote", f"teacher.kl={kl}", "teacher.top_k=32", "rollout.max_new_tokens=24",
        "topd.window=8", "train.steps=1"]
    ranks = run_on_ranks(run_remote_training, 2, overrides, timeout=1200)
    assert [r["models_built"] for r in ranks] == [1, 1]  # the student only: no Megatron teacher on any rank
    (row,) = ranks[0]["history"]
    assert row["response_tokens"] > 0 and row["grad_norm"] > 0 and row["skipped"] == 0.0
    assert row["candidates"] > 0 and row["guidance_windows"] == row["divergent"]
    # topd.quantile suppresses 30% of the candidates, so most stay divergent: guidance windows exist to check
    assert row["divergent"] > 0 and row["traj_loss"] > 0  # L_traj from the teacher server's top-k along its windows
    if kl == "topk":
        assert row["mean_token_kl"] > 0  # a lower bound of the KL, positive for different models
    assert abs(row["loss"] - (row["opd_loss"] + row["traj_loss"])) < 1e-5 * max(1.0, abs(row["loss"]))
