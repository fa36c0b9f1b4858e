"""`megatron-topd experiment` end to end on real SGLang CPU servers (started once) and the demo's task at a small
recipe: held-out accuracy is measured on the servers exactly as transformers measures it (the start once, for every
run), every run starts from the same student (the reused servers are re-synced), with deterministic servers a seed's
step-1 rollouts are the same in every variant (paired seeds), the local OT of the probe states is measured, and the
report is written."""
from __future__ import annotations

import json
import shutil
import statistics

import pytest

from megatron_topd import experiment
from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.rollout import read_records
from tests.distributed.test_task_assets import hf_accuracy
from tests.integration.conftest import sglang_python


def export_trained_student(ckpt_root: str, spec_path: str, out: str) -> None:
    """The run's last checkpoint (the weights its servers held at the last evaluation) as an HF folder."""
    from megatron_topd import parallel
    from megatron_topd.convert.megatron_to_hf import convert_megatron_to_hf

    parallel.initialize(1, 1, seed=0)
    convert_megatron_to_hf(ckpt_root, out, spec_path=spec_path, log=lambda _: None)


@pytest.mark.slow
@pytest.mark.sglang
def test_experiment_runs_variants_on_shared_servers_and_reports(tmp_path, task_assets):
    out = tmp_path / "exp"
    code = experiment.main([
        "--assets", str(task_assets["root"]), "--variants", "topd,opd", "--seeds", "3", "--out", str(out),
        "--probe-states", "2", "rollout.deterministic=true", "train.steps=2", "eval.interval=1",
        "train.prompts_per_step=4", "rollout.n_samples=2",
        "rollout.max_new_tokens=32",
        f"rollout.server_python={sglang_python()}", f"rollout.server_log_dir={tmp_path}/logs",
    ])
    assert code == 0
    rows = {v: [json.loads(line) for line in open(out / f"{v}-seed3" / "metrics.jsonl")] for v in ("topd", "opd")}
    n_heldout = len(open(task_assets["heldout"]).read().splitlines())
    student = hf_accuracy(task_assets["student_hf"], task_assets["heldout"])
    teacher = hf_accuracy(task_assets["teacher_hf"], task_assets["heldout"])
    # The start is measured once, on the freshly started servers, and every run logs it as its step 0: greedy
    # decoding on the servers, checked by the task, equals transformers' greedy accuracy.
    baseline = json.loads((out / "baseline.json").read_text())
    assert baseline["heldout_accuracy"] == pytest.approx(student)
    assert baseline["teacher_heldout_accuracy"] == pytest.approx(teacher)
    for variant, r in rows.items():
        assert [row["step"] for row in r] == [0, 1, 2]
        assert r[0]["heldout_accuracy"] == baseline["heldout_accuracy"]
        assert r[0]["teacher_heldout_accuracy"] == baseline["teacher_heldout_accuracy"]
        assert r[1]["rollout_weight_version"] == 0.0 and r[2]["rollout_weight_version"] == 1.0
        for row in r[1:]:  # evaluated after every step (eval.interval=1): a count of the held-out problems solved
            solved = row["heldout_accuracy"] * n_heldout
            assert "eval_s" in row and solved == pytest.approx(round(solved), abs=1e-9), (row, n_heldout)
        assert (out / f"{variant}-seed3" / "metrics.png").is_file()
    assert rows["topd"][1]["candidates"] > 0 and rows["opd"][1]["candidates"] == 0
    # paired seeds: the same step-1 rollouts in both variants (sampled at temperature 1: the samples differ); so the
    # second run (opd) started from the initial student although the first run trained the servers' weights
    step1 = {v: [(r.prompt_ids, r.response_ids) for r in read_records(out / f"{v}-seed3" / "rollouts" /
                                                                      "step_00000000.jsonl")] for v in rows}
    assert step1["topd"] == step1["opd"] and len({tuple(r) for _, r in step1["opd"]}) > 1
    # the local OT of the probe states: on the initial student, and after each run on the weights it ended with
    before = json.loads((out / "local_ot_before.json").read_text())
    after = {v: json.loads((out / f"{v}-seed3" / "local_ot.json").read_text()) for v in rows}
    assert before["states"] == after["opd"]["states"] == 2 * 3  # 2 problems x (2 chain steps + the answer)
    assert all(0.0 <= r["local_ot"] <= 2.0 and 0.0 <= r["local_low_share"] <= 1.0 for r in [before, *after.values()])
    assert len(list((out / "topd-seed3" / "candidates").glob("step_*.jsonl"))) == 2
    # the last evaluation measured the trained weights on the server exactly as transformers measures the run's
    # final checkpoint (saved after that step; tokenizer and config from the student it started from)
    trained = tmp_path / "topd_trained_hf"
    run_on_ranks(export_trained_student, 1, str(out / "topd-seed3" / "checkpoints"),
                 str(task_assets["student_ckpt"] / "model_spec.yaml"), str(trained))
    for f in task_assets["student_hf"].iterdir():
        if "safetensors" not in f.name:
            shutil.copy(f, trained / f.name)
    assert rows["topd"][2]["heldout_accuracy"] == pytest.approx(hf_accuracy(trained, task_assets["heldout"]))
    report = json.loads((out / "results.json").read_text())
    table = report["arms"]["demo"]["table"]
    assert set(table) == {"topd", "opd"}
    assert table["opd"]["finals"] == [rows["opd"][-1]["heldout_accuracy"]]
    endpoint = statistics.fmean(r["heldout_accuracy"] for r in rows["opd"][1:])  # the last 3 evaluations: 2 here
    assert table["opd"]["endpoint_mean"] == pytest.approx(endpoint)
    assert table["topd"]["vs_opd"]["n"] == 1 and table["opd"]["local_ot_after"] == after["opd"]["local_ot"]
    assert "| topd | 1 |" in (out / "results.md").read_text() and (out / "results.png").stat().st_size > 0
    # finished runs are reused: a second call trains nothing and reports the same
    assert experiment.main(["--assets", str(task_assets["root"]), "--variants", "opd", "--seeds", "3",
                            "--out", str(out), "train.steps=2", f"rollout.server_python={sglang_python()}",
                            f"rollout.server_log_dir={tmp_path}/logs"]) == 0
    assert [json.loads(line) for line in open(out / "opd-seed3" / "metrics.jsonl")] == rows["opd"]
