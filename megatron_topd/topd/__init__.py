"""The TOPD objective (arXiv 2606.00305; DESIGN section 2, docs/method.md): candidates, near-future windows,
OT divergence, suppression weights, trajectory guidance - on per-token statistics and embedding rows only."""
from megatron_topd.topd.candidates import select_candidates
from megatron_topd.topd.config import TopdConfig, resolve_embedding_source
from megatron_topd.topd.divergence import WindowDivergence, window_divergence
from megatron_topd.topd.embedding import embedding_lookup, vocab_parallel_rows
from megatron_topd.topd.loss import topd_loss
from megatron_topd.topd.ot import ot_distance, ot_distances, ot_plan
from megatron_topd.topd.positions import logits_to_tokens
from megatron_topd.topd.probe import ProbeResult, gather_distances, run_probe
from megatron_topd.topd.sampler import ContinuationSampler, TorchModelSampler
from megatron_topd.topd.weights import divergence_weights, ot_statistics, token_weights
from megatron_topd.topd.windows import GuidanceBatch, ProbeRequests, build_guidance, build_requests, position_weights

__all__ = [
    "ContinuationSampler",
    "GuidanceBatch",
    "ProbeRequests",
    "ProbeResult",
    "TopdConfig",
    "TorchModelSampler",
    "WindowDivergence",
    "build_guidance",
    "build_requests",
    "divergence_weights",
    "embedding_lookup",
    "gather_distances",
    "logits_to_tokens",
    "ot_distance",
    "ot_distances",
    "ot_plan",
    "ot_statistics",
    "position_weights",
    "resolve_embedding_source",
    "run_probe",
    "select_candidates",
    "token_weights",
    "topd_loss",
    "vocab_parallel_rows",
    "window_divergence",
]
