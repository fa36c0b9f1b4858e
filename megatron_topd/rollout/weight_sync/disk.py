"""Weight sync through a shared filesystem: write a safetensors checkpoint, then `/update_weights_from_disk`.

The simplest path and the one that works everywhere the servers can read `sync_dir` (a shared filesystem on a
cluster). Cost: a full write and read of the weights per sync. Each version goes to `sync_dir/<version>/`, sharded by
the bucket size with an HF index; older versions are removed after a successful sync (`keep` newest are kept).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import admin
from .base import WeightSync
from .buckets import iter_buckets


class DiskWeightSync(WeightSync):
    method = "disk"

    def __init__(self, urls, sync_dir: str | Path, *, model_path: str | Path | None = None, keep: int = 1, **kw):
        super().__init__(urls, **kw)
        self.sync_dir = Path(sync_dir).absolute()
        self.model_path = Path(model_path) if model_path else None
        self.keep = keep
        self._written: list[Path] = []

    def _push(self, named_tensors, version: str):
        from safetensors.torch import save_file

        out = self.sync_dir / _safe_dirname(version)
        if out.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)
        shards, weight_map, n, nbytes = [], {}, 0, 0
        for bucket in iter_buckets(named_tensors, self.bucket_bytes):
            shard = f"shard-{len(shards):05d}.safetensors"
            save_file({k: v.detach().cpu().contiguous() for k, v in bucket}, str(out / shard), metadata={"format": "pt"})
            shards.append(shard)
            for name, t in bucket:
                weight_map[name] = shard
                n += 1
                nbytes += t.numel() * t.element_size()
        final = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for old, new in zip(shards, final):
            (out / old).rename(out / new)
        rename = dict(zip(shards, final))
        index = {"metadata": {"total_size": nbytes}, "weight_map": {k: rename[v] for k, v in weight_map.items()}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
        if self.model_path is not None:  # config files make the directory a complete checkpoint for humans and tools
            for name in ("config.json", "generation_config.json"):
                if (self.model_path / name).is_file():
                    shutil.copy(self.model_path / name, out / name)
        admin.call_all(self.urls, "/update_weights_from_disk",
                       {"model_path": str(out), "weight_version": version, "flush_cache": True},
                       timeout_s=self.timeout_s)
        self._prune(keep_dir=out)
        return n, nbytes, len(shards)

    def _prune(self, keep_dir: Path) -> None:
        """Remove versions this object wrote, all but the `keep` newest (never anything else in sync_dir)."""
        self._written = [d for d in self._written if d != keep_dir] + [keep_dir]
        while len(self._written) > max(1, self.keep):
            shutil.rmtree(self._written.pop(0), ignore_errors=True)


def _safe_dirname(version: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in version)
