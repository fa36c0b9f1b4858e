"""One rollout step: prompts in, validated `RolloutRecord`s out (n samples each, with log-probs and weight version)."""
from __future__ import annotations

from typing import Sequence

from .client import SGLangClient
from .prompts import Prompt
from .records import RolloutRecord, records_from_generations
from .sampling import SamplingParams


def sampling_from_config(cfg) -> SamplingParams:
    """The rollout `SamplingParams` of a validated `RolloutConfig`."""
    return SamplingParams(max_new_tokens=cfg.max_new_tokens, n=cfg.n_samples, temperature=cfg.temperature,
                          top_p=cfg.top_p, top_k=cfg.top_k, seed=cfg.seed)


def collect_rollouts(client: SGLangClient, prompts: Sequence[Prompt], params: SamplingParams) -> list[RolloutRecord]:
    """Generate `params.n` samples per prompt; records are prompt-major and validated against the vocabulary."""
    gens = client.generate([p.ids for p in prompts], params)
    records = records_from_generations([p.index for p in prompts], [p.ids for p in prompts], gens)
    for r in records:
        r.validate(client.vocab_size, max_response_len=params.max_new_tokens)
    return records
