"""One candidate layout of a TOPD run: the trainer's parallel sizes and the knobs that bound per-GPU memory.

`overrides()` writes it in the config's own field names (megatron_topd/config.py), as dotted `section.key=value`
strings the CLI and the launcher accept.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    pp: int = 1
    cp: int = 1
    dp: int = 1
    sp: bool = False
    recompute: str = "none"  # none | selective | full
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    max_tokens_per_microbatch: int = 4096
    teacher_group_microbatches: int = 4
    placement: str = "colocated"  # colocated | remote

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.cp * self.dp

    def overrides(self) -> dict:
        return {
            "parallel.tensor_parallel": self.tp,
            "parallel.pipeline_parallel": self.pp,
            "parallel.context_parallel": self.cp,
            "parallel.sequence_parallel": self.sp,
            "parallel.recompute": self.recompute,
            "parallel.first_stage_layers": self.first_stage_layers,
            "parallel.last_stage_layers": self.last_stage_layers,
            "train.max_tokens_per_microbatch": self.max_tokens_per_microbatch,
            "train.teacher_group_microbatches": self.teacher_group_microbatches,
            "teacher.placement": self.placement,
            # a remote teacher has no full logits to give: top-k (the trainer refuses kl=full with it)
            **({"teacher.kl": "topk"} if self.placement == "remote" else {}),
        }

    def short(self) -> str:
        uneven = f" stages {self.first_stage_layers or '-'}/{self.last_stage_layers or '-'}" if (
            self.first_stage_layers or self.last_stage_layers) else ""
        return (f"TP{self.tp} PP{self.pp} CP{self.cp} DP{self.dp}{' SP' if self.sp else ''} recompute={self.recompute}"
                f"{uneven} mb={self.max_tokens_per_microbatch} G={self.teacher_group_microbatches} {self.placement}")

    def to_dict(self) -> dict:
        return asdict(self)
