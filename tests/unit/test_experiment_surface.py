"""The surface-form experiment's pieces that need no server: each candidate's label as the trainer logs it (the real
character tokenizer), the probe states, the OT filter's precision/recall, the paired 95% intervals, the verdict, and
the docs section a preset replaces."""
import json

import pytest
import torch

from megatron_topd import experiment
from megatron_topd.tasks import AdditionFormsTask
from megatron_topd.tasks.addition import Problem, build_tokenizer
from megatron_topd.train.candidate_log import candidate_rows, read_candidates, write_candidates
from megatron_topd.train.handoffs import RolloutRows


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))


def _ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_candidate_rows_label_the_logged_tokens(tokenizer, tmp_path):
    task = AdditionFormsTask(4)
    prompt = _ids(tokenizer, "4071+0968=")
    # a surface-form start of step 2 ("6+7..."), then a wrong sum digit ("=14;") in step 2
    response = _ids(tokenizer, "1+8+0=09;6+7+0=14;") + [tokenizer.eos_token_id]
    rows = RolloutRows([prompt], [response])
    n = len(prompt)
    loss = torch.arange(n + len(response), dtype=torch.float32)[None]
    entries = candidate_rows(task, tokenizer, rows, loss, [(0, n + 9, 0.0, False), (0, n + 16, 0.4, True),
                                                            (0, n + 18, 0.1, True)])
    assert [(e["position"], e["token"], e["label"], e["suppressed"]) for e in entries] == [
        (9, "6", "surface", True), (16, "4", "divergent", False), (18, "<eos>", "neither", False)]
    assert entries[1]["token_loss"] == float(n + 16) and entries[1]["ot"] == 0.4
    write_candidates(tmp_path / "candidates" / "step_00000004.jsonl", entries)
    assert [e["step"] for e in read_candidates(tmp_path)] == [5, 5, 5]


def test_probe_states_start_every_chain_step(tokenizer, tmp_path):
    task = AdditionFormsTask(4)
    path = task.write_jsonl([Problem(4071, 968), Problem(1, 2)], tmp_path / "h.jsonl")
    states = experiment.probe_states(str(path), tokenizer, 1)
    prompt = tokenizer("4071+0968=")["input_ids"]
    assert [tokenizer.decode(s[len(prompt):]) for s in states] == [
        "", "1+8+0=09;", "1+8+0=09;7+6+0=13;", "1+8+0=09;7+6+0=13;0+9+1=10;", "1+8+0=09;7+6+0=13;0+9+1=10;4+0+1=05;"]
    assert all(s[:len(prompt)] == prompt for s in states)


def test_label_stats_by_hand():
    c = [{"ot": 0.0, "suppressed": True, "label": "surface"}, {"ot": 0.01, "suppressed": True, "label": "divergent"},
         {"ot": 0.2, "suppressed": False, "label": "surface"}, {"ot": 0.5, "suppressed": False, "label": "divergent"},
         {"ot": 0.3, "suppressed": False, "label": "neither"}]
    s = experiment.label_stats(c)
    assert s["candidates"] == 5 and s["surface_share"] == 0.4 and s["neither_share"] == 0.2
    assert s["precision_suppressed"] == 0.5 and s["recall_suppressed"] == 0.5
    assert s["precision_threshold"] == 0.5 and s["recall_threshold"] == 0.5 and s["low_share"] == 0.4
    assert s["ot_surface"] == pytest.approx(0.1) and s["ot_divergent"] == pytest.approx(0.255)
    assert "surface_share" not in experiment.label_stats([{"ot": 0.1, "suppressed": False}])


def test_paired_difference_and_verdict():
    from scipy import stats

    a, b = [0.50, 0.52, 0.47, 0.55, 0.51], [0.45, 0.49, 0.46, 0.50, 0.47]
    d = experiment.paired_difference(a, b)
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert d["mean"] == pytest.approx(0.036) and (d["lo"], d["hi"]) == pytest.approx((ref.low, ref.high))
    table = {"topd": {"vs_opd": d}, "opd_suppress": {"vs_opd": experiment.paired_difference(b, a)}}
    text = experiment.verdict("robust", table)
    assert text.startswith("With the robust teacher, TOPD beats OPD (+3.6 points, 95% CI [")
    assert "low-OT suppression is worse than OPD (-3.6 points" in text
    table["topd"]["vs_opd"] = experiment.paired_difference([0.5, 0.4, 0.6], [0.45, 0.5, 0.5])
    assert "TOPD cannot be told apart from OPD" in experiment.verdict("clean", table)


def test_docs_section_is_replaced_and_the_rest_kept(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n\nkept\n")
    experiment.replace_docs_section(page, "surface", "first\n")
    experiment.replace_docs_section(page, "surface", "second\n")
    text = page.read_text()
    assert text.startswith("# Results\n\nkept\n") and "second" in text and "first" not in text
    assert text.count("<!-- experiment surface: begin -->") == 1
    assert json.dumps(experiment.PRESETS["surface"].seeds) == "[0, 1, 2, 3, 4]"


def _fake_run(run_dir, accs, step_s, cands, local):
    """A finished run's files as the trainer and the experiment write them (metrics, candidates, local OT)."""
    run_dir.mkdir(parents=True)
    rows = [{"step": 10 * i, "heldout_accuracy": a, **({"step_s": step_s} if i else {})} for i, a in enumerate(accs)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if cands:
        write_candidates(run_dir / "candidates" / "step_00000000.jsonl", cands)
    (run_dir / "local_ot.json").write_text(json.dumps({"local_ot": local, "local_low_share": 0.5, "states": 4}))


def test_report_from_finished_runs(tmp_path):
    surface = {"ot": 0.0, "suppressed": True, "label": "surface", "token_loss": 1.0}
    fork = {"ot": 0.4, "suppressed": False, "label": "divergent", "token_loss": 2.0}
    for seed, (o, t) in enumerate([(0.30, 0.34), (0.40, 0.41), (0.35, 0.40)]):
        _fake_run(tmp_path / f"opd-seed{seed}", [0.2, 0.25, o, o, o + 0.01], 1.0, [], 0.3)
        _fake_run(tmp_path / f"topd-seed{seed}", [0.2, 0.3, t, t, t + 0.01], 2.0, [surface, fork, fork], 0.2)
    runs = {v: {s: experiment.summarize(tmp_path / f"{v}-seed{s}") for s in range(3)} for v in ("opd", "topd")}
    assert runs["opd"][0]["endpoint"] == pytest.approx(0.30 + 0.01 / 3)  # the last 3 evaluations
    table = experiment.aggregate(runs)
    assert table["topd"]["vs_opd"]["diffs"] == pytest.approx([0.04, 0.01, 0.05])
    assert table["topd"]["labels"]["candidates"] == 9 and table["topd"]["labels"]["precision_suppressed"] == 1.0
    assert table["topd"]["local_ot_after"] == pytest.approx(0.2) and table["opd"]["step_s_mean"] == 1.0
    meta = {"command": "x", "wall_s": 60.0, "machine": "m", "steps": 40}
    text = experiment.write_report(tmp_path, {"robust": {"runs": runs, "table": table, "teacher": 0.99,
                                                         "before": {"local_ot": 0.5, "local_low_share": 0.1,
                                                                    "states": 4}}}, meta)
    assert ("Verdict: With the robust teacher, TOPD cannot be told apart from OPD (+3.3 points, 95% CI [-1.8, +8.5], "
            "3 seeds)") in text  # t(2) = 4.30: three seeds with SD 2.1 points cannot exclude 0
    assert "| topd | 9 | 33.3% | 66.7% | 0.0% | 33.3% | 100.0% | 100.0% |" in text
    assert (tmp_path / "results.png").stat().st_size > 0
