"""Each step's probed candidates beside their OT distance (candidates/step_k.jsonl): where the filter cut, and for a
task that knows its surface forms (tasks/addition_forms.py) each candidate's ground-truth label, so the experiment
measures the OT filter's precision and recall against the labels (docs/results.md)."""
from __future__ import annotations

import json
from pathlib import Path

from megatron_topd.tasks.addition_forms import END


def candidate_rows(task, tokenizer, rows, token_loss, candidates) -> list[dict]:
    """One dict per candidate ``(row, t, ot, divergent)`` (t token-aligned in the row): its response position, token,
    l_t, OT distance, whether it was suppressed and, when ``task`` has `candidate_label`, the label."""
    label = getattr(task, "candidate_label", None)
    out = []
    for b, t, ot, divergent in candidates:
        prompt, response = rows.prompts[b], rows.responses[b]
        r = t - len(prompt)
        pieces = [END if i == tokenizer.eos_token_id else tokenizer.convert_ids_to_tokens(i) for i in response[:r + 1]]
        entry = {"row": b, "position": r, "token": pieces[r], "token_loss": float(token_loss[b, t]), "ot": ot,
                 "suppressed": not divergent}
        if label is not None:
            problem = task.problem_from_prompt(tokenizer.decode(prompt, skip_special_tokens=True))
            entry["label"] = label(problem, "".join(pieces[:r]), pieces[r])
        out.append(entry)
    return out


def write_candidates(path: Path, entries: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in entries)


def read_candidates(run_dir: Path) -> list[dict]:
    """Every candidate a run logged, each with its ``step`` (1-based, as in metrics.jsonl)."""
    out = []
    for path in sorted((Path(run_dir) / "candidates").glob("step_*.jsonl")):
        step = int(path.name.split("_")[1].split(".")[0]) + 1
        out += [{**json.loads(line), "step": step} for line in open(path) if line.strip()]
    return out
