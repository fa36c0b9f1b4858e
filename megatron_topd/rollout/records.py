"""`RolloutRecord`: one sampled response with everything training needs, validated, stored as JSONL.

Why JSONL and not Arrow/Parquet: records are written as they come (one line per sample, appended and flushed, so a
crash loses at most the line being written), each line reads on its own in any tool, and no extra dependency is
needed in the trainer environment. A rollout step is small (tokens as ints: a 1k-prompt x 4-sample x 4k-token step is
~100 MB of text), and training reads a step's file once; columnar storage would pay off only for analytics over many
steps, which can convert these files later.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

FINISH_REASONS = ("stop", "length")


@dataclass
class RolloutRecord:
    prompt_index: int  # position of the prompt in its dataset (stable across resumes)
    sample_index: int  # 0..n-1 among the prompt's samples
    prompt_ids: list[int]
    response_ids: list[int]
    response_logprobs: list[float]  # the rollout policy's log-prob of each response token (from SGLang)
    finish_reason: str  # "stop" (EOS/stop token, which ends response_ids) or "length"
    weight_version: str  # the servers' weight version that generated it

    def validate(self, vocab_size: int | None = None, max_response_len: int | None = None) -> "RolloutRecord":
        """Raise ValueError naming the field and what is wrong; return self."""
        who = f"record (prompt {self.prompt_index}, sample {self.sample_index})"
        for name in ("prompt_index", "sample_index"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{who}: {name}={v!r} must be an integer >= 0")
        for name in ("prompt_ids", "response_ids"):
            ids = getattr(self, name)
            if not isinstance(ids, list) or not ids:
                raise ValueError(f"{who}: {name} is empty; every record needs a prompt and a response")
            for j, t in enumerate(ids):
                if isinstance(t, bool) or not isinstance(t, int) or t < 0 or (vocab_size is not None and t >= vocab_size):
                    raise ValueError(f"{who}: {name}[{j}]={t!r} is not a token id in [0, {vocab_size})")
        if max_response_len is not None and len(self.response_ids) > max_response_len:
            raise ValueError(f"{who}: {len(self.response_ids)} response tokens > max {max_response_len}")
        if len(self.response_logprobs) != len(self.response_ids):
            raise ValueError(
                f"{who}: {len(self.response_logprobs)} response_logprobs for {len(self.response_ids)} response_ids"
            )
        for j, x in enumerate(self.response_logprobs):
            if isinstance(x, bool) or not isinstance(x, (int, float)) or math.isnan(x) or x > 1e-4:
                raise ValueError(f"{who}: response_logprobs[{j}]={x!r} is not a log-probability (<= 0)")
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"{who}: finish_reason={self.finish_reason!r}, expected one of {FINISH_REASONS}")
        if not isinstance(self.weight_version, str) or not self.weight_version:
            raise ValueError(f"{who}: weight_version={self.weight_version!r} must be a non-empty string")
        return self

    def to_json(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutRecord":
        fields = set(cls.__dataclass_fields__)
        if set(d) != fields:
            raise ValueError(f"record fields {sorted(d)} differ from {sorted(fields)}")
        return cls(**d)


def records_from_generations(
    prompt_indices: Sequence[int], prompts: Sequence[Sequence[int]], generations: Sequence[Sequence]
) -> list[RolloutRecord]:
    """Flatten `SGLangClient.generate` output (per prompt, n `Generation`s) into records, prompt-major."""
    if not (len(prompt_indices) == len(prompts) == len(generations)):
        raise ValueError(f"{len(prompt_indices)} indices, {len(prompts)} prompts, {len(generations)} generation lists")
    out = []
    for pi, prompt, gens in zip(prompt_indices, prompts, generations):
        for j, g in enumerate(gens):
            if g.logprobs is None:
                raise ValueError("generations were made with return_logprobs=False: records need log-probs")
            out.append(RolloutRecord(pi, j, list(prompt), list(g.token_ids), list(g.logprobs), g.finish_reason,
                                     g.weight_version))
    return out


def write_records(path: str | os.PathLike, records: Iterable[RolloutRecord], *, vocab_size: int | None = None) -> int:
    """Validate and append records to a JSONL file (created with its directory); fsync at the end. Returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "a", encoding="utf-8") as f:
        for rec in records:
            f.write(rec.validate(vocab_size).to_json() + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def read_records(path: str | os.PathLike, *, vocab_size: int | None = None) -> list[RolloutRecord]:
    """Read and validate a JSONL file of records; errors name the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.readlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as e:
            if lineno == len(lines) and not line.endswith("\n"):  # the write a crash interrupted
                warnings.warn(f"{path}:{lineno}: skipping the unterminated last line (interrupted write)")
                break
            raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
        try:
            out.append(RolloutRecord.from_dict(data).validate(vocab_size))
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path}:{lineno}: {e}") from None
    return out


def discard_after(directory: str | os.PathLike, completed_steps: int) -> list[str]:
    """Remove the per-step record files `step_XXXXXXXX.jsonl` of steps >= `completed_steps` (0-based file index).

    A run resumed from the checkpoint after `completed_steps` steps generates those steps again; their files from the
    interrupted attempt would otherwise get a second set of records appended. Returns the removed file names.
    """
    removed = []
    for path in sorted(Path(directory).glob("step_*.jsonl")):
        try:
            index = int(path.stem.split("_", 1)[1])
        except ValueError:
            continue
        if index >= completed_steps:
            path.unlink()
            removed.append(path.name)
    return removed
