"""Device profiles of the step-time model (plan/step_time.py): what a machine does per second, and what it pays per
call where a small model is launch-bound.

`H100` is an H100 SXM node from its data sheet and the utilisations large runs reach; its per-call costs are 0
because at 70B scale they vanish into the utilisation (`speed.trainer_mfu`). `CPU_2CORE` is this project's CPU
machine, measured by `benchmarks/calibrate_cpu_profile.py` (each figure apart from any TOPD step): at the demo's size
(d96, 2-3 layers) the time is the per-call costs, not the FLOPs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    flops: float  # FLOP/s a trainer device reaches in a layer's GEMMs (CPU: a small layer's, elementwise work included)
    fp8_speedup: float = 1.0
    backward_ratio: float = 2.0  # a backward's cost over its forward's (2 by FLOPs)
    tp_speedup: float = 2.0  # how much faster a rank's share of work split over a TP doubling runs (2: evenly)
    mfu_from_layout: bool = True  # utilisation = speed.trainer_mfu(layout); False: 1.0 plus the per-call costs below
    memory_bytes_per_s: float = 0.0  # HBM / DRAM
    decode_efficiency: float = 1.0  # of memory bandwidth in a decode step
    prefill_mfu: float = 1.0
    # per-call costs (0 where the utilisation already holds them)
    decode_step_overhead_s: float = 0.0  # one decode step of a server, whatever its batch
    decode_seq_step_s: float = 0.0  # each running sequence's share of a decode step
    prefill_request_s: float = 0.0  # one request prefilled (scheduling, its attention call)
    server_call_s: float = 0.0  # one HTTP call answered by a server (the weight-update call)
    layer_forward_s: float = 0.0  # one decoder layer, one microbatch, forward without autograd
    layer_train_s: float = 0.0  # forward with autograd + backward
    model_forward_s: float = 0.0  # a model pass outside its layers (embedding, output layer)
    model_train_s: float = 0.0
    model_forward_token_s: float = 0.0  # per token outside the layers (embedding, logits), a forward
    schedule_call_s: float = 0.0  # one call of Megatron's forward-backward schedule (train/step.py run_schedule)
    optimizer_step_s: float = 0.0  # one Megatron optimizer step of a small model (launch-bound, per tensor)
    collective_latency_s: float = 0.0  # one collective among a node's ranks (TP)
    collective_bytes_per_s: float = math.inf
    inter_node_bytes_per_s: float = 50e9  # weight broadcast to the servers
    filesystem_bytes_per_s: float = 20e9
    ot_seconds_per_window: float = 2e-3  # one window pair's costs and exact EMD on one core (topd/divergence.py)


H100 = DeviceProfile(
    name="H100 SXM (data sheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM; 400 Gb/s per node; 20 GB/s filesystem)",
    flops=989e12, fp8_speedup=2.0, memory_bytes_per_s=3.35e12, decode_efficiency=0.6, prefill_mfu=0.5,
    inter_node_bytes_per_s=50e9, filesystem_bytes_per_s=20e9, ot_seconds_per_window=2e-3)

# benchmarks/calibrate_cpu_profile.py on this machine (AMD EPYC, 2 cores, one thread per process), Dec 7 2026 01:40
# (`--from-json` of that run derives these fields): a d96 Megatron local layer reaches 51 GFLOP/s per token of
# forward (GEMMs alone: 68-90 GFLOP/s) and costs 1.0 ms per call (2.0 ms with backward; the backward 2.7x the
# forward per token), 3.2 us per token outside the layers; a schedule call 0.26 ms, an optimizer step 4.0 ms; DRAM
# 20 GB/s; gloo all-reduce 0.36 ms + 1.06 GB/s; SGLang CPU decode step 1.9 ms + 0.19 ms per running sequence,
# 1.9 ms per prefilled request, 11 ms per call; OT 40 us per window pair (K=8); filesystem 1.3 GB/s. Two
# calibrations 20 minutes apart differed by up to 40% on the SGLang figures (decode per sequence 0.135 vs 0.194 ms).
# At TP=2 (01:54, `--only-tp`) a rank of the d96 layer spends 10.9 us per token of forward (10.2 less its
# all-reduces' bytes) against 4.6 us at TP=1: work split over the two ranks runs 0.45x as fast, not 2x, on these
# 2 vCPUs (tp_speedup).
CPU_2CORE = DeviceProfile(
    name="CPU, 2 cores (AMD EPYC; benchmarks/calibrate_cpu_profile.py)",
    flops=51.3e9, backward_ratio=2.67, tp_speedup=0.448, mfu_from_layout=False, memory_bytes_per_s=19.9e9,
    decode_step_overhead_s=1.89e-3, decode_seq_step_s=0.194e-3, prefill_request_s=1.92e-3, server_call_s=11.3e-3,
    layer_forward_s=1.01e-3, layer_train_s=2.03e-3, model_forward_s=0.0, model_train_s=0.04e-3,
    model_forward_token_s=3.21e-6, schedule_call_s=0.26e-3, optimizer_step_s=4.0e-3,
    collective_latency_s=0.36e-3, collective_bytes_per_s=1.06e9, inter_node_bytes_per_s=1.06e9,
    filesystem_bytes_per_s=1.3e9, ot_seconds_per_window=40e-6)

PROFILES = {"h100": H100, "cpu": CPU_2CORE}
