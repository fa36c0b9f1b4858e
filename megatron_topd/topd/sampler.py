"""The "continue these prefixes" interface the near-future probe needs, and a reference implementation.

The SGLang client (`megatron_topd.rollout`) implements `ContinuationSampler` against the teacher's and the
student's servers; `TorchModelSampler` implements it over any causal torch model, for tests and the CPU demo.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import torch


@runtime_checkable
class ContinuationSampler(Protocol):
    def continue_prefixes(
        self,
        prefixes: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        n: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        servers: Sequence[str | None] | None = None,
    ) -> list[list[list[int]]]:
        """For each prefix (token ids, non-empty), ``n`` continuations of new token ids only.

        - ``result[i][j]`` is continuation ``j`` of ``prefixes[i]``; ``len(result) == len(prefixes)``, each ``n`` long.
        - Each continuation has 1..``max_new_tokens`` ids; it is shorter only when generation stopped at an EOS
          token, and then that EOS id is its last element (so a window is never empty).
        - ``temperature == 0.0`` means greedy decoding (``n`` identical continuations); otherwise sample at
          ``temperature`` with nucleus ``top_p`` (1.0 = off). No other sampling filters (no top-k, no penalties).
        - ``seed``: makes the call reproducible where the backend supports it; ``None`` = unseeded.
        - The prefix is used verbatim: no chat template, no BOS insertion, no stop strings.
        - ``servers`` (given only when known): where each prefix's row was generated, a routing hint for samplers
          that hold KV caches (SGLang's radix cache); the continuations must not depend on it.
        """
        ...


class TorchModelSampler:
    """`ContinuationSampler` over a causal torch model ``model(ids [B, L]) -> logits [B, L, V]`` (reference, CPU-sized).

    Recomputes the whole prefix each step (no KV cache): meant for tiny models in tests and the CPU demo.
    """

    def __init__(self, model: Callable[[torch.Tensor], torch.Tensor], *, eos_id: int | None):
        self.model = model
        self.eos_id = eos_id

    @torch.no_grad()
    def continue_prefixes(
        self,
        prefixes: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        n: int,
        temperature: float,
        top_p: float = 1.0,
        seed: int | None = None,
        servers=None,  # routing hint: one model, nothing to route
    ) -> list[list[list[int]]]:
        if max_new_tokens < 1 or n < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens} and n={n} must both be >= 1")
        if temperature < 0 or not 0.0 < top_p <= 1.0:
            raise ValueError(f"temperature={temperature} must be >= 0 and top_p={top_p} in (0, 1]")
        gen = torch.Generator()
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(seed)
        out = []
        for i, prefix in enumerate(prefixes):
            if len(prefix) == 0:
                raise ValueError(f"prefix {i} is empty: continuations need at least one context token")
            out.append(self._continue(list(prefix), max_new_tokens, n, temperature, top_p, gen))
        return out

    def _continue(self, prefix, max_new, n, temperature, top_p, gen) -> list[list[int]]:
        ids = torch.tensor([prefix] * n, dtype=torch.long)
        done = torch.zeros(n, dtype=torch.bool)
        for _ in range(max_new):
            logits = self.model(ids)[:, -1, :].float()
            nxt = _sample(logits, temperature, top_p, gen)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if self.eos_id is not None:
                done |= nxt == self.eos_id
                if bool(done.all()):
                    break
        new = ids[:, len(prefix):].tolist()
        return [_cut_at_eos(row, self.eos_id) for row in new]


def _sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        keep = sorted_p.cumsum(dim=-1) - sorted_p < top_p  # always keeps the most likely token
        sorted_p = sorted_p * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    return torch.multinomial(probs, 1, generator=gen)[:, 0]


def _cut_at_eos(row: list[int], eos_id: int | None) -> list[int]:
    if eos_id is not None and eos_id in row:
        return row[: row.index(eos_id) + 1]
    return row
