"""Pipeline stages: how many decoder layers each stage holds and how many microbatches it keeps in flight.

Layers: Megatron's split (`num_layers_in_first/last_pipeline_stage`, the rest even over the middle stages).
In flight: under the 1F1B schedule stage i (0-based) runs PP - i warm-up forwards before its first backward, so it
holds the activations of min(PP - i, M) microbatches (Narayanan et al. 2021, "Efficient Large-Scale Language Model
Training on GPU Clusters", section 2.2); stage 0 is the worst.
"""
from __future__ import annotations


def stage_layers(num_layers: int, pp: int, first: int | None = None, last: int | None = None) -> list[int]:
    if first is None and last is None:
        if num_layers % pp:
            raise ValueError(f"pipeline_parallel={pp} does not divide num_layers={num_layers}")
        return [num_layers // pp] * pp
    middle = pp - (first is not None) - (last is not None)
    rest = num_layers - (first or 0) - (last or 0)
    if middle < 0 or (middle == 0 and rest) or (middle and (rest <= 0 or rest % middle)):
        raise ValueError(f"num_layers={num_layers} cannot be split as first={first}, last={last} over pp={pp}")
    out = [rest // middle] * middle if middle else []
    if first is not None:
        out.insert(0, first)
    if last is not None:
        out.append(last)
    return out


def microbatches_in_flight(stage: int, pp: int, num_microbatches: int) -> int:
    return max(1, min(pp - stage, num_microbatches))
