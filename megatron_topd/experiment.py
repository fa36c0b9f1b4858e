"""`megatron-topd experiment`: the paper's comparison at CPU scale, with one command.

Variants (same assets, same step budget, same seeds), each a set of config overrides:

    opd               plain on-policy distillation (reverse KL on every response token)
    opd_suppress      OPD with the low-OT candidates suppressed (the paper's surface-form filter)
    suppress_high     the paper's control: a matched number of the *highest*-OT candidates suppressed
    suppress_random   a matched number of randomly chosen candidates suppressed
    topd              low-OT suppression + trajectory guidance along the teacher's windows
    topd_no_suppress  attribution: guidance on every candidate, nothing suppressed
    topd_random       attribution: guidance, with a matched number of random candidates suppressed

The SGLang student and teacher servers start once per teacher arm; every run is its own torchrun job pointed at them
(`rollout.urls` / `teacher.urls`), and the trainer brings the student's servers to the run's initial weights
before its first step. Runs whose metrics already reach the last step are reused, so an interrupted experiment
continues where it stopped. With `rollout.deterministic: true` (the presets) every request carries its sampling
seed, so a seed's step-1 rollouts are the same in every variant: the comparison is paired by seed.

A preset (`--preset surface`, `make experiment PRESET=surface`) names the config, the task, the teacher arms, the
variants and the seeds. Per arm it builds the task's assets (megatron_topd/task_assets.py), measures the local OT of
a fixed set of held-out probe states (`--probe-states`) on the initial student and after every run, and reports the
endpoint (mean of the last 3 evaluations), the paired differences against OPD with 95% confidence intervals, and the
OT filter's precision and recall against the task's labels (train/candidate_log.py). Output under --out: one folder
per run, results.json, results.md and results.png; a preset also replaces its section of docs/results.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_topd.demo import REPO, asset_overrides, build_assets, run_summary, torchrun, world_size

VARIANTS = {
    "opd": ["topd.variant=opd"],
    "opd_suppress": ["topd.variant=opd_suppress", "topd.suppress=low"],
    "suppress_high": ["topd.variant=opd_suppress", "topd.suppress=high"],
    "suppress_random": ["topd.variant=opd_suppress", "topd.suppress=random"],
    "topd": ["topd.variant=topd", "topd.suppress=low"],
    "topd_no_suppress": ["topd.variant=topd", "topd.low_fraction=0.0"],
    "topd_random": ["topd.variant=topd", "topd.suppress=random"],
}
ENDPOINT_EVALS = 3  # the endpoint: mean held-out accuracy of a run's last 3 evaluations
PROBE_SEED = 26  # the probe states' windows: teacher seed 2 * 26, student 2 * 26 + 1, in every measurement
LOW_OT = 0.025  # the low-divergence share is measured as the share of OT distances below this (about half of one
# token's worth in a 20-token window: 1 - cos is about 1 between different digits' embeddings)


@dataclass(frozen=True)
class Preset:
    config: str
    task: str
    arms: tuple[str, ...]  # teacher arms (task_assets.TEACHER_ARMS)
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    probe_states: int  # held-out problems whose step starts are the fixed probe states
    docs: str  # the page whose marked section the report replaces


PRESETS = {
    "surface": Preset("examples/experiment_surface.yaml", "addition_forms", ("robust", "clean"),
                      ("opd", "opd_suppress", "topd", "topd_no_suppress", "topd_random"), (0, 1, 2, 3, 4),
                      probe_states=64, docs="docs/results.md"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="megatron-topd experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default=None, choices=tuple(PRESETS), help="config, task, arms, variants and seeds "
                   "in one name; --variants/--seeds/--arms given here override its own")
    p.add_argument("--config", default=None, help="default: examples/experiment.yaml, or the preset's")
    p.add_argument("--variants", default=None, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default=None, help="comma-separated training seeds (rollouts and probes follow)")
    p.add_argument("--arms", default=None, help="a preset's teacher arms to run (comma-separated)")
    p.add_argument("--probe-states", type=int, default=None, help="held-out problems whose chain-step starts are "
                   "the fixed probe states of the local-OT diagnostic (0: off; preset: its own)")
    p.add_argument("--docs", default=None, help="replace the experiment's section of this page (preset: its own; "
                   "'none': leave every page alone)")
    p.add_argument("--asset-args", default="", help="more task_assets options for a preset's assets, e.g. "
                   "'--teacher-steps 250 --n-heldout 100' (a quick pipeline check; the assets are rebuilt to match)")
    p.add_argument("--out", default=None, help="default: runs/experiment, or runs/experiment_<preset>")
    p.add_argument("--fresh", action="store_true", help="rerun every run instead of reusing finished ones")
    p.add_argument("--assets", default=None, help="use this asset folder as it is (megatron_topd/task_assets.py "
                   "output) instead of building the demo's under runs/demo/assets (not with --preset)")
    p.add_argument("overrides", nargs="*", help="dotted config overrides applied to every run")
    return p.parse_args(argv)


def run_finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.is_file() and any(json.loads(line).get("step") == steps for line in open(path) if line.strip())


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _share(part: int, whole: int) -> float:
    return part / whole if whole else float("nan")


# ---- diagnostics --------------------------------------------------------------------------------------------------
def probe_states(heldout_path: str, tokenizer, n: int) -> list[list[int]]:
    """The fixed held-out probe states: each of the first ``n`` held-out prompts followed by 0, 1, ... all whole steps
    of its reference chain (form ab), i.e. every state where a chain step or the answer begins."""
    from megatron_topd.rollout.prompts import PromptDataset
    from megatron_topd.tasks import AdditionFormsTask

    data = PromptDataset(heldout_path, tokenizer, n_samples=1, chat_template=False, shuffle=False)
    states = []
    for i in range(min(n, len(data))):
        prompt = data.tokenize(i)
        task = AdditionFormsTask(len(prompt.row["prompt"].split("+")[0]))
        steps = task.solution(task.problem_from_prompt(prompt.row["prompt"])).split(">")[0].split(";")[:-1]
        for k in range(len(steps) + 1):
            prefix = "".join(s + ";" for s in steps[:k])
            states.append(prompt.ids + tokenizer(prefix, add_special_tokens=False)["input_ids"] if prefix
                          else list(prompt.ids))
    return states


def server_clients(cfg, vocab: int, student_urls: list[str], teacher_urls: list[str]):
    """Clients of the arm's student and teacher servers for the experiment's own measurements (no progress bars)."""
    from megatron_topd.rollout import SGLangClient

    return tuple(SGLangClient(urls, vocab_size=vocab, context_length=cfg.rollout.context_length, progress=False)
                 for urls in (student_urls, teacher_urls))


def local_ot(cfg, student_urls: list[str], teacher_urls: list[str], states: list[list[int]], table) -> dict:
    """The paper's local OT on the probe states: the teacher's and the student's servers each continue every state for
    topd.window tokens (fixed seeds) and the windows' OT distance is measured as in training (teacher's embedding
    table, topd.ot_position_weight). Returns the mean and the share below `LOW_OT`."""
    from megatron_topd.topd.divergence import window_divergence

    kw = dict(max_new_tokens=cfg.topd.window, n=cfg.topd.samples_per_side, temperature=cfg.topd.sampling_temperature,
              top_p=cfg.topd.probe_top_p)
    student, teacher = server_clients(cfg, int(table.shape[0]), student_urls, teacher_urls)
    d = window_divergence(teacher.continue_prefixes(states, seed=2 * PROBE_SEED, **kw),
                          student.continue_prefixes(states, seed=2 * PROBE_SEED + 1, **kw),
                          lambda ids: table[ids], position_weight=cfg.topd.ot_position_weight).distance
    return {"local_ot": float(d.mean()), "local_low_share": float((d < LOW_OT).double().mean()), "states": len(d)}


def measure_baseline(cfg, student_urls: list[str], teacher_urls: list[str], tokenizer, path: Path) -> None:
    """The held-out accuracy of the initial student (and of the teacher, eval.teacher) on freshly started servers,
    written once for every run of the arm (eval.baseline_file): 25 runs from one student would otherwise decode the
    same held-out set 50 times to measure the same start."""
    from megatron_topd.train.evaluation import write_baseline
    from megatron_topd.train.setup import held_out_eval

    heldout = held_out_eval(cfg, tokenizer)
    vocab = json.loads((Path(cfg.train.student_hf_path) / "config.json").read_text())["vocab_size"]
    student, teacher = server_clients(cfg, vocab, student_urls, teacher_urls)
    accuracies = {"heldout_accuracy": heldout.accuracy(student)}
    if cfg.eval.teacher:
        accuracies["teacher_heldout_accuracy"] = heldout.accuracy(teacher)
    write_baseline(path, heldout_path=cfg.eval.heldout_path, student=cfg.train.student_checkpoint,
                   accuracies=accuracies)


def teacher_embeddings(teacher_hf: Path):
    """The teacher's input-embedding table (the OT space training uses: topd.embedding_source auto, co-located)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(teacher_hf)).get_input_embeddings().weight.detach().double()


def label_stats(candidates: list[dict]) -> dict:
    """The OT filter against the task's labels: label shares of the candidates (the high-loss tokens), precision
    (suppressed that are surface) and recall (surface that were suppressed) of the run's suppression and of the
    threshold rule OT < `LOW_OT`, and the mean OT per label."""
    out = {"candidates": len(candidates), "low_share": _share(sum(c["ot"] < LOW_OT for c in candidates),
                                                              len(candidates))}
    labelled = [c for c in candidates if "label" in c]
    if not labelled:
        return out
    surface = [c for c in labelled if c["label"] == "surface"]
    for label in ("surface", "divergent", "neither"):
        mine = [c["ot"] for c in labelled if c["label"] == label]
        out[f"{label}_share"] = _share(len(mine), len(labelled))
        out[f"ot_{label}"] = statistics.fmean(mine) if mine else float("nan")
    for name, picked in (("suppressed", lambda c: c["suppressed"]), ("threshold", lambda c: c["ot"] < LOW_OT)):
        hits = sum(picked(c) for c in surface)
        out[f"precision_{name}"] = _share(hits, sum(picked(c) for c in labelled))
        out[f"recall_{name}"] = _share(hits, len(surface))
    return out


def summarize(run_dir: Path) -> dict:
    """One run: `demo.run_summary` plus the endpoint, its candidates' label statistics and its local OT after."""
    from megatron_topd.train.candidate_log import read_candidates

    s = run_summary(run_dir)
    trained = s["curve"][1:] or s["curve"]  # the evaluations after step 0 (a run of no steps: its start)
    s["endpoint"] = statistics.fmean(a for _, a in trained[-ENDPOINT_EVALS:])
    s["labels"] = label_stats(read_candidates(run_dir))
    ot = run_dir / "local_ot.json"
    s["local_ot_after"] = json.loads(ot.read_text()) if ot.is_file() else None
    return s


# ---- statistics and the report --------------------------------------------------------------------------------------
def paired_difference(a: list[float], b: list[float]) -> dict:
    """Mean of the per-seed differences a - b with its 95% t confidence interval (NaN bounds with one seed)."""
    from scipy.stats import t

    diffs = [x - y for x, y in zip(a, b)]
    mean, n = statistics.fmean(diffs), len(diffs)
    half = t.ppf(0.975, n - 1) * statistics.stdev(diffs) / math.sqrt(n) if n > 1 else float("nan")
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "diffs": diffs}


def aggregate(runs: dict[str, dict[int, dict]]) -> dict[str, dict]:
    table = {}
    for variant, by_seed in runs.items():
        seeds = sorted(by_seed)
        finals = [by_seed[s]["after"] for s in seeds]
        endpoints = [by_seed[s]["endpoint"] for s in seeds]
        after = [by_seed[s]["local_ot_after"] for s in seeds if by_seed[s]["local_ot_after"]]
        table[variant] = {
            "n": len(seeds), "seeds": seeds, "finals": finals, "final_mean": statistics.fmean(finals),
            "final_sd": _sd(finals), "endpoints": endpoints, "endpoint_mean": statistics.fmean(endpoints),
            "endpoint_sd": _sd(endpoints), "before": statistics.fmean(by_seed[s]["before"] for s in seeds),
            "step_s_mean": statistics.fmean(by_seed[s]["step_s"] for s in seeds),
            "local_ot_after": statistics.fmean(a["local_ot"] for a in after) if after else None,
            "local_low_share_after": statistics.fmean(a["local_low_share"] for a in after) if after else None,
            "labels": _pool_labels([by_seed[s]["labels"] for s in seeds])}
        if "opd" in runs and variant != "opd":
            common = [s for s in seeds if s in runs["opd"]]
            table[variant]["vs_opd"] = paired_difference([by_seed[s]["endpoint"] for s in common],
                                                         [runs["opd"][s]["endpoint"] for s in common])
    return table


def _pool_labels(per_run: list[dict]) -> dict:
    """Candidate-weighted means of the runs' label statistics (each run's shares weighted by its candidates)."""
    total = sum(r["candidates"] for r in per_run)
    out = {"candidates": total}
    for key in sorted({k for r in per_run for k in r} - {"candidates"}):
        pairs = [(r[key], r["candidates"]) for r in per_run if key in r and not math.isnan(r[key])]
        out[key] = sum(v * w for v, w in pairs) / sum(w for _, w in pairs) if pairs and sum(
            w for _, w in pairs) else float("nan")
    return out


def verdict(arm: str, table: dict) -> str:
    """One sentence that follows from the paired 95% intervals of TOPD - OPD and OPD_suppress - OPD."""
    def reading(variant: str, name: str) -> str:
        d = table.get(variant, {}).get("vs_opd")
        if d is None:
            return f"{name} was not run"
        ci = f"{100 * d['mean']:+.1f} points, 95% CI [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}], {d['n']} seeds"
        if d["n"] < 2:
            return f"{name} cannot be judged ({100 * d['mean']:+.1f} points from one seed)"
        if d["lo"] > 0:
            return f"{name} beats OPD ({ci})"
        if d["hi"] < 0:
            return f"{name} is worse than OPD ({ci})"
        return f"{name} cannot be told apart from OPD ({ci})"

    return f"With the {arm} teacher, {reading('topd', 'TOPD')}, and {reading('opd_suppress', 'low-OT suppression')}."


def _pct(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def _num(x) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def arm_report(arm: str, table: dict, before: dict | None, teacher: float | None) -> str:
    title = f"#### Teacher arm: {arm}" + ("" if teacher is None else f" (teacher held-out accuracy {teacher:.1%})")
    lines = [title,
             "", f"| variant | seeds | start | endpoint: mean of the last {ENDPOINT_EVALS} evaluations (mean +- sd) | "
             "per seed | last evaluation | vs opd (paired, 95% CI) | local OT after | local low share after | s/step |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for variant, t in table.items():
        d = t.get("vs_opd")
        vs = "-" if d is None else (f"{100 * d['mean']:+.1f} pts [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]"
                                    if d["n"] > 1 else f"{100 * d['mean']:+.1f} pts (1 seed)")
        lines.append(f"| {variant} | {t['n']} | {_pct(t['before'])} | {_pct(t['endpoint_mean'])} +- "
                     f"{_pct(t['endpoint_sd'])} | {', '.join(_pct(e) for e in t['endpoints'])} | "
                     f"{_pct(t['final_mean'])} | {vs} | {_num(t['local_ot_after'])} | "
                     f"{_pct(t['local_low_share_after'])} | {t['step_s_mean']:.2f} |")
    if before is not None:
        lines += ["", f"Local OT on {before['states']} fixed held-out probe states, initial student: "
                  f"{before['local_ot']:.3f} (share below {LOW_OT}: {_pct(before['local_low_share'])}); after each "
                  "variant: the table's column (the paper: 0.538 before, 0.350 after OPD, 0.204 after TOPD)."]
    labelled = {v: t["labels"] for v, t in table.items() if "surface_share" in t["labels"]}
    if labelled:
        lines += ["", "The OT filter against the task's labels (candidates pooled over seeds; precision: suppressed "
                  "candidates that are surface-form; recall: surface-form candidates suppressed; the threshold rule "
                  f"is OT < {LOW_OT}):", "",
                  f"| variant | candidates | surface | divergent | neither | OT < {LOW_OT} | precision | recall | "
                  f"precision (OT < {LOW_OT}) | recall (OT < {LOW_OT}) | mean OT surface / divergent / neither |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for v, s in labelled.items():
            lines.append(f"| {v} | {s['candidates']} | {_pct(s['surface_share'])} | {_pct(s['divergent_share'])} | "
                         f"{_pct(s['neither_share'])} | {_pct(s['low_share'])} | {_pct(s['precision_suppressed'])} | "
                         f"{_pct(s['recall_suppressed'])} | {_pct(s['precision_threshold'])} | "
                         f"{_pct(s['recall_threshold'])} | {_num(s['ot_surface'])} / {_num(s['ot_divergent'])} / "
                         f"{_num(s['ot_neither'])} |")
        lines += ["", "The paper: about 30% of high-loss tokens are surface-form."]
    lines += ["", "Verdict: " + verdict(arm, table)]
    return "\n".join(lines) + "\n"


def write_report(out: Path, arms: dict, meta: dict) -> str:
    text = "\n".join(arm_report(arm, a["table"], a["before"], a["teacher"]) for arm, a in arms.items())
    text += (f"\nCommand: `{meta['command']}`; {meta['steps']} steps per run; wall time {meta['wall_s'] / 60:.1f} min "
             f"on {meta['machine']}.\n")
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"arms": arms, "meta": meta}, indent=1))
    plot(out / "results.png", {f"{arm}/{v}" if len(arms) > 1 else v: runs
                               for arm, a in arms.items() for v, runs in a["runs"].items()})
    return text


def replace_docs_section(page: Path, name: str, text: str) -> None:
    """Put ``text`` between this preset's markers on ``page`` (appended the first time): the rest stays as it is."""
    begin, end = f"<!-- experiment {name}: begin -->", f"<!-- experiment {name}: end -->"
    old = page.read_text() if page.is_file() else ""
    block = f"{begin}\n{text}{end}\n"
    if begin in old and end in old:
        new = old[: old.index(begin)] + block + old[old.index(end) + len(end):].lstrip("\n")
    else:
        new = old.rstrip("\n") + "\n\n" + block
    page.write_text(new)


def plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for variant, runs in results.items():
        curves = [dict(r["curve"]) for r in runs.values()]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [sum(c[s] for c in curves) / len(curves) for s in steps]
        sd = [_sd([c[s] for c in curves]) for s in steps]
        ax.plot(steps, mean, marker="o", label=variant)
        ax.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)], alpha=0.15)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out accuracy (greedy)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- running ------------------------------------------------------------------------------------------------------
def share_student(root: Path, siblings: list[Path]) -> None:
    """Start a teacher arm's asset folder from another arm's: the arms share the data and the student's recipe, so
    task_assets keeps the copied student (its stamp matches) and trains only this arm's teacher."""
    if root.exists():
        return
    done = next((s for s in siblings if (s / "assets.json").is_file()), None)
    if done is not None:
        shutil.copytree(done, root)


def run_arm(args, config: str, paths: dict, out: Path, variants: list[str], seeds: list[int], n_states: int) -> dict:
    """Every (seed, variant) run of one asset set on one pair of servers; the local OT before (the servers' initial
    student) and after each run (the servers hold the run's last weights); returns the arm's runs and table."""
    from transformers import AutoTokenizer

    from megatron_topd.config import load_config
    from megatron_topd.train.setup import LaunchedServers

    base = [*asset_overrides(paths), *args.overrides]
    cfg = load_config(config, base + [f"train.output_dir={out}"])
    world = world_size(config, base)
    # Seed-major order: an interrupted experiment has every variant at the seeds it finished.
    runs = [(seed, variant) for seed in seeds for variant in variants]
    todo = [(s, v) for s, v in runs if args.fresh or not run_finished(out / f"{v}-seed{s}", cfg.train.steps)]
    before_path, baseline_path = out / "local_ot_before.json", out / "baseline.json"
    measure = n_states > 0 and (todo or not before_path.is_file())
    servers = LaunchedServers(cfg) if todo or measure else None
    try:
        if servers is not None:  # every measurement below, and every run, needs them
            student_urls, teacher_urls = servers.start()
            tokenizer = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
            arm_overrides = [f"rollout.urls=[{','.join(student_urls)}]", f"teacher.urls=[{','.join(teacher_urls)}]"]
        if todo and cfg.eval.enabled:  # the servers were just started from the initial student: its start, once
            if args.fresh or not baseline_path.is_file():
                measure_baseline(cfg, student_urls, teacher_urls, tokenizer, baseline_path)
            arm_overrides.append(f"eval.baseline_file={baseline_path}")
        if measure:  # the servers were just started from the initial student
            states = probe_states(str(paths["heldout"]), tokenizer, n_states)
            table = teacher_embeddings(paths["teacher_hf"])
            if args.fresh or not before_path.is_file():
                before_path.write_text(json.dumps(local_ot(cfg, student_urls, teacher_urls, states, table)))
        for seed, variant in todo:
            run_dir = out / f"{variant}-seed{seed}"
            shutil.rmtree(run_dir, ignore_errors=True)
            cmd = torchrun(config, [*base, *VARIANTS[variant], *arm_overrides, f"train.seed={seed}",
                                    f"train.output_dir={run_dir}"], world)
            print(f"== {variant} seed {seed}: {' '.join(cmd)}", flush=True)
            code = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}).returncode
            if code != 0:
                raise SystemExit(f"{variant} seed {seed} failed (exit {code}); its logs are in {run_dir}")
            if measure:  # the servers hold the run's last weights (synced after its last step)
                (run_dir / "local_ot.json").write_text(
                    json.dumps(local_ot(cfg, student_urls, teacher_urls, states, table)))
            print(f"== {variant} seed {seed}: held-out accuracy " + "{before:.1%} -> {after:.1%}".format(
                **run_summary(run_dir)), flush=True)
    finally:
        if servers is not None:
            servers.stop()
    by_variant = {v: {s: summarize(out / f"{v}-seed{s}") for s in seeds} for v in variants}
    teacher = next((r["teacher"] for rs in by_variant.values() for r in rs.values() if r["teacher"] is not None), None)
    return {"runs": by_variant, "table": aggregate(by_variant), "teacher": teacher, "steps": cfg.train.steps,
            "before": json.loads(before_path.read_text()) if before_path.is_file() else None}


def main(argv=None) -> int:
    from megatron_topd.task_assets import asset_paths

    args = parse_args(argv)
    preset = PRESETS.get(args.preset)
    config = args.config or str(REPO / (preset.config if preset else "examples/experiment.yaml"))
    variants = [v.strip() for v in (args.variants or ",".join(preset.variants if preset else
                                                                  [v for v in VARIANTS if not v.startswith("topd_")])
                                    ).split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; choose from {', '.join(VARIANTS)}")
    seeds = [int(s) for s in (args.seeds or ",".join(map(str, preset.seeds if preset else (0, 1, 2)))).split(",")
             if s.strip()]
    n_states = args.probe_states if args.probe_states is not None else (preset.probe_states if preset else 0)
    out = Path(args.out or REPO / "runs" / (f"experiment_{args.preset}" if preset else "experiment"))
    out.mkdir(parents=True, exist_ok=True)
    # One thread per process, as in the demo (its servers inherit torchrun's setting): the servers and the trainer
    # share 2 cores, and oversubscribed torch threads made generation 30x slower (31 s instead of 0.4 s a step).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    if preset is not None:
        if args.assets:
            raise SystemExit("--assets with --preset: a preset builds its own assets per teacher arm")
        arms = [a.strip() for a in (args.arms or ",".join(preset.arms)).split(",") if a.strip()]
        bad = [a for a in arms if a not in preset.arms]
        if bad:
            raise SystemExit(f"--arms: unknown {bad}; preset {args.preset} has {', '.join(preset.arms)}")
        extra = shlex.split(args.asset_args)
        plan = {}
        for arm in arms:
            root = out / f"assets_{arm}"
            share_student(root, [out / f"assets_{a}" for a in preset.arms if a != arm])
            plan[arm] = (build_assets(root, ["--task", preset.task, "--teacher-arm", arm, *extra]), out / arm)
    elif args.assets:
        paths = asset_paths(args.assets)
        if not paths["report"].is_file():
            raise SystemExit(f"--assets {args.assets}: no assets.json there; build it with python -m "
                             "megatron_topd.task_assets --out DIR")
        plan = {"demo": (paths, out)}
    else:
        plan = {"demo": (build_assets(REPO / "runs" / "demo" / "assets"), out)}
    results = {}
    for arm, (paths, arm_out) in plan.items():
        arm_out.mkdir(parents=True, exist_ok=True)
        results[arm] = run_arm(args, config, paths, arm_out, variants, seeds, n_states)
    meta = {"command": "megatron-topd experiment " + " ".join(sys.argv[2:] if argv is None else argv),
            "wall_s": time.perf_counter() - t0, "machine": f"{os.cpu_count()} CPU cores ({platform.machine()})",
            "variants": variants, "seeds": seeds, "steps": next(iter(results.values()))["steps"]}
    text = write_report(out, results, meta)
    docs = args.docs if args.docs is not None else (preset.docs if preset else "none")
    if docs != "none":
        replace_docs_section(REPO / docs if not Path(docs).is_absolute() else Path(docs), args.preset or "default",
                             "### Results of the last full run\n\n" + text)
    print(text)
    return 0
