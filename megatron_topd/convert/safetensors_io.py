"""Streaming access to HF safetensors checkpoints: read one tensor at a time, write size-bounded shards + index.

Why: a 70B checkpoint is ~140 GB in bf16; the converters must never hold it whole. Reading goes through
`safetensors.safe_open` per tensor (files are memory-mapped; only the requested tensor is copied out). Writing
buffers at most one shard (`max_shard_bytes`) before it goes to disk.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class CheckpointFilesError(FileNotFoundError):
    """The HF checkpoint folder lacks a file its index (or the HF layout) requires."""


class SafetensorsReader:
    """Names, shapes and per-tensor reads of an HF checkpoint folder (single file or sharded with an index)."""

    def __init__(self, folder: str | Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.exists():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        elif (self.folder / SINGLE_FILE).exists():
            weight_map = None
        else:
            found = sorted(p.name for p in self.folder.glob("*.safetensors"))
            raise CheckpointFilesError(
                f"{self.folder}: neither {INDEX_FILE} nor {SINGLE_FILE} exists (found {found or 'no .safetensors'}); "
                "point --hf at a Hugging Face checkpoint folder saved with safetensors"
            )
        if weight_map is None:
            files = [SINGLE_FILE]
        else:
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.folder / f).exists()]
            if missing:
                raise CheckpointFilesError(
                    f"{self.folder}: {len(missing)} shard file(s) named in {INDEX_FILE} are missing: {missing}; "
                    "re-download the checkpoint"
                )
        self._file_of: dict[str, str] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        for f in files:  # headers only; the handles are closed again
            with safe_open(str(self.folder / f), framework="pt") as handle:
                for name in handle.keys():
                    self._file_of[name] = f
                    self._shapes[name] = tuple(handle.get_slice(name).get_shape())
        if weight_map is not None:
            absent = sorted(n for n, f in weight_map.items() if self._file_of.get(n) != f)
            if absent:
                raise CheckpointFilesError(
                    f"{self.folder}: {len(absent)} tensor(s) listed in {INDEX_FILE} are not in their shard file, "
                    f"e.g. {absent[:5]}; the checkpoint is incomplete or its index is stale"
                )
        self._unread = {f: {n for n, g in self._file_of.items() if g == f} for f in files}
        self._open: dict[str, object] = {}

    def names(self) -> set[str]:
        return set(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> torch.Tensor:
        """A copy of one tensor. A shard stays memory-mapped only until each of its tensors has been read once, so
        its pages do not stay counted in this process's resident memory for the rest of a conversion."""
        from safetensors import safe_open

        f = self._file_of[name]
        handle = self._open.get(f)
        if handle is None:
            handle = self._open[f] = safe_open(str(self.folder / f), framework="pt")
        tensor = handle.get_tensor(name)
        self._unread[f].discard(name)
        if not self._unread[f]:
            del self._open[f]
        return tensor


class ShardedSafetensorsWriter:
    """Add tensors one by one; each shard is written once it would exceed `max_shard_bytes`; `close` writes the index.

    Files follow HF's naming (`model-0000i-of-0000N.safetensors` + index, or a single `model.safetensors`).
    """

    def __init__(self, folder: str | Path, max_shard_bytes: int = 5 * 2**30):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._written):
            raise ValueError(f"tensor {name!r} added twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        # A private contiguous copy: safetensors refuses tensors that share storage (views of one fused parameter).
        self._pending[name] = tensor.detach().to("cpu").contiguous().clone()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        tmp = f"shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(self.folder / tmp), metadata={"format": "pt"})
        self._written.append((tmp, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index; return the file names written."""
        if self._pending or not self._written:
            self._flush()
        n = len(self._written)
        if n == 1:
            os.replace(self.folder / self._written[0][0], self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, files = {}, []
        for i, (tmp, names) in enumerate(self._written):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / tmp, self.folder / final)
            files.append(final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return files + [INDEX_FILE]
