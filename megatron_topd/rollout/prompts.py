"""`PromptDataset`: prompts from JSONL (or Parquet), chat-templated and tokenized, in a resumable deterministic order.

Each row holds `messages` (a chat: list of {role, content}) or `prompt` (text, sent as one user turn). With
`chat_template=True` the tokenizer's chat template is applied with the generation prompt; otherwise text is
tokenized as is. Order: epoch e visits all rows in a permutation seeded by (seed, e); `position` counts prompts
handed out, so `state_dict()` / `load_state_dict()` resume exactly where a run stopped. Each prompt is sampled
`n_samples` times by the rollout (the client expands n), so records carry (prompt_index, sample_index).
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Prompt:
    index: int  # row of the dataset file
    ids: list[int]
    row: dict


class PromptDataset:
    def __init__(
        self,
        path: str | Path,
        tokenizer: Any,
        *,
        n_samples: int = 4,
        chat_template: bool = True,
        max_prompt_tokens: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
    ):
        if isinstance(tokenizer, (str, Path)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        if n_samples < 1:
            raise ValueError(f"n_samples={n_samples}: use an integer >= 1")
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.n_samples = n_samples
        self.chat_template = chat_template
        self.max_prompt_tokens = max_prompt_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.rows = _read_rows(self.path)
        if not self.rows:
            raise ValueError(f"{self.path} holds no prompts")
        if chat_template and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"the tokenizer has no chat template: set chat_template=False to tokenize {self.path} as plain text")
        self.position = 0  # prompts handed out so far, over all epochs

    def __len__(self) -> int:
        return len(self.rows)

    def tokenize(self, index: int) -> Prompt:
        row = self.rows[index]
        where = f"{self.path} row {index}"
        if "messages" in row:
            messages = row["messages"]
            if not isinstance(messages, list) or not messages:
                raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
        elif isinstance(row.get("prompt"), str) and row["prompt"]:
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise ValueError(f"{where}: needs a non-empty 'prompt' string or a 'messages' list")
        if self.chat_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):  # transformers 5 may return a BatchEncoding
                ids = ids["input_ids"]
        else:
            ids = self.tokenizer("\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
        ids = [int(t) for t in ids]
        if not ids:
            raise ValueError(f"{where}: tokenizes to nothing")
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise ValueError(f"{where}: {len(ids)} tokens > max_prompt_tokens={self.max_prompt_tokens}")
        return Prompt(index, ids, row)

    def order(self, epoch: int) -> list[int]:
        idx = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(idx)
        return idx

    def next_batch(self, batch_size: int) -> list[Prompt]:
        """The next `batch_size` prompts (wrapping into the next epoch); advances `position`."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: use an integer >= 1")
        out = []
        for _ in range(batch_size):
            epoch, offset = divmod(self.position, len(self.rows))
            out.append(self.tokenize(self.order(epoch)[offset]))
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "num_rows": len(self.rows), "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_rows") != len(self.rows) or state.get("seed") != self.seed or state.get("shuffle") != self.shuffle:
            raise ValueError(
                f"resume state {state} does not match {self.path} ({len(self.rows)} rows, seed {self.seed}, "
                f"shuffle {self.shuffle}): resume with the same dataset file and seed"
            )
        self.position = int(state["position"])


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or convert it to JSONL)") from None
        return pq.read_table(path).to_pylist()
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not JSON ({e})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: each line must be a JSON object")
                rows.append(row)
    return rows
