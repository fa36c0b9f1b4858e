"""`PromptDataset`: prompts from JSONL (or Parquet), chat-templated and tokenized, in a resumable deterministic order.

Each row holds `messages` (a chat: list of {role, content}) or `prompt` (text, sent as one user turn). With
`chat_template=True` the tokenizer's chat template is applied with the generation prompt; otherwise text is
tokenized as is. Order: epoch e visits all rows in a permutation seeded by (seed, e), made once per epoch (a draw is
O(1)); `position` counts prompts handed out, so `state_dict()` / `load_state_dict()` resume exactly where a run
stopped. Each prompt is sampled `n_samples` times by the rollout (the client expands n), so records carry
(prompt_index, sample_index).

With `max_prompt_tokens`, every row is tokenized once when the dataset is made (the lengths are cached beside the file,
keyed by its content and the tokenizer), so no prompt can fail mid-run or again after a requeue: rows over the limit
raise a `PromptOverflowError` listing them (``overflow="error"``) or are left out of the order and counted
(``overflow="skip"``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Prompt:
    index: int  # row of the dataset file
    ids: list[int]
    row: dict


class PromptOverflowError(ValueError):
    """Prompts that leave no room for a response; raised when the dataset is made, before any model is built."""


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
        overflow: str = "error",
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
        if overflow not in ("error", "skip"):
            raise ValueError(f"overflow={overflow!r}: use 'error' or 'skip' (train.prompt_overflow)")
        self.position = 0  # prompts handed out so far, over all epochs
        self.eligible = list(range(len(self.rows)))  # the rows the order visits
        self.skipped: list[int] = []  # rows over max_prompt_tokens, left out (overflow="skip")
        if max_prompt_tokens is not None:
            self._check_lengths(overflow)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its permutation): made once per epoch
        self.permutations_made = 0

    def __len__(self) -> int:
        return len(self.rows)

    def _check_lengths(self, overflow: str) -> None:
        lengths = self.prompt_lengths()
        room = self.max_prompt_tokens
        over = [i for i, n in enumerate(lengths) if n > room]
        if over and overflow == "error":
            first = ", ".join(f"row {i} ({lengths[i]} tokens)" for i in over[:5])
            raise PromptOverflowError(
                f"{len(over)} of {len(self.rows)} prompts in {self.path} are longer than the {room} tokens a prompt "
                f"may take (train.max_seq_length - rollout.max_new_tokens - topd.window under TOPD): {first}"
                f"{' ...' if len(over) > 5 else ''}. Drop them with train.prompt_overflow=skip, or make room (raise "
                "train.max_seq_length or lower rollout.max_new_tokens)")
        self.skipped = over
        self.eligible = [i for i, n in enumerate(lengths) if n <= room]
        if not self.eligible:
            raise PromptOverflowError(f"every prompt in {self.path} is longer than {room} tokens: nothing to train on")

    def prompt_lengths(self) -> list[int]:
        """Every row's token count, from one pass over the file (a malformed row raises here, naming it), cached in
        ``<file>.lengths-<key>.json`` beside it; the key covers the file's bytes, the tokenizer and the template."""
        key = hashlib.sha256()
        key.update(self.path.read_bytes() if self.path.is_file() else b"")
        key.update(_tokenizer_fingerprint(self.tokenizer).encode())
        key.update(b"chat" if self.chat_template else b"plain")
        cache = self.path.with_name(f"{self.path.name}.lengths-{key.hexdigest()[:16]}.json")
        if cache.is_file():
            lengths = json.loads(cache.read_text())
            if isinstance(lengths, list) and len(lengths) == len(self.rows):
                return lengths
        lengths = [len(self._ids(i)) for i in range(len(self.rows))]
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        try:  # atomic: ranks of one job may write it at once; a read-only folder only costs the cache
            tmp.write_text(json.dumps(lengths))
            os.replace(tmp, cache)
        except OSError:
            tmp.unlink(missing_ok=True)
        return lengths

    def tokenize(self, index: int) -> Prompt:
        ids = self._ids(index)
        if self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise PromptOverflowError(f"{self.path} row {index}: {len(ids)} tokens > max_prompt_tokens="
                                      f"{self.max_prompt_tokens}")
        return Prompt(index, ids, self.rows[index])

    def _ids(self, index: int) -> list[int]:
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
        return ids

    def order(self, epoch: int) -> list[int]:
        """Epoch ``epoch``'s visiting order of the eligible rows (computed once per epoch, then reused)."""
        if self._order is None or self._order[0] != epoch:
            idx = list(self.eligible)
            if self.shuffle:
                random.Random(f"{self.seed}:{epoch}").shuffle(idx)
            self._order = (epoch, idx)
            self.permutations_made += 1
        return self._order[1]

    def next_batch(self, batch_size: int) -> list[Prompt]:
        """The next `batch_size` prompts (wrapping into the next epoch); advances `position`."""
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: use an integer >= 1")
        out = []
        for _ in range(batch_size):
            epoch, offset = divmod(self.position, len(self.eligible))
            out.append(self.tokenize(self.order(epoch)[offset]))
            self.position += 1
        return out

    def state_dict(self) -> dict:
        """Where the order stands: ``position`` prompts handed out (epoch = position // eligible rows)."""
        return {"position": self.position, "seed": self.seed, "num_rows": len(self.rows), "shuffle": self.shuffle,
                "num_eligible": len(self.eligible)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_eligible", len(self.eligible)) != len(self.eligible):
            raise ValueError(f"resume state {state} was made with {state['num_eligible']} eligible prompts, this run "
                             f"has {len(self.eligible)} (max_seq_length, max_new_tokens or the window changed): "
                             "resume with the same lengths")
        if state.get("num_rows") != len(self.rows) or state.get("seed") != self.seed or state.get("shuffle") != self.shuffle:
            raise ValueError(
                f"resume state {state} does not match {self.path} ({len(self.rows)} rows, seed {self.seed}, "
                f"shuffle {self.shuffle}): resume with the same dataset file and seed"
            )
        self.position = int(state["position"])


def _tokenizer_fingerprint(tokenizer) -> str:
    """What decides a prompt's token count: the tokenizer's full definition where it has one, and its template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else f"{getattr(tokenizer, 'name_or_path', '')}:{len(tokenizer)}"
    return hashlib.sha256(f"{body}\n{getattr(tokenizer, 'chat_template', None) or ''}".encode()).hexdigest()


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
