"""Rollout layer: SGLang servers, the HTTP client, weight sync and rollout records (docs/rollout.md).

The trainer never imports sglang: servers run in their own environment and are reached over HTTP (plus a gloo/NCCL
group for distributed weight sync).
"""
from .client import Generation, Score, SGLangClient
from .collect import collect_rollouts, sampling_from_config
from .config import RolloutConfig
from .errors import InvalidResponse, RequestFailed, RolloutError, ServerStartError, WeightSyncError
from .prompts import Prompt, PromptDataset
from .records import RolloutRecord, read_records, records_from_generations, write_records
from .sampling import SamplingParams
from .server import ServerGroup, SGLangServer

__all__ = [
    "Generation", "InvalidResponse", "Prompt", "PromptDataset", "RequestFailed", "RolloutConfig", "RolloutError",
    "RolloutRecord", "SamplingParams", "Score", "ServerGroup", "SGLangClient", "SGLangServer", "ServerStartError",
    "WeightSyncError", "collect_rollouts", "read_records", "records_from_generations", "sampling_from_config",
    "write_records",
]
