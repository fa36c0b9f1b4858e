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

# benchmarks/calibrate_cpu_profile.py on this machine (AMD EPYC, 2 cores, one thread per process), Dec 7 2026:
# matmul 93 GFLOP/s ([1024, 96] x [96, 256] and 2048^3 alike), DRAM copy 21 GB/s, gloo all-reduce 0.34 ms latency
# and 0.84 GB/s, Megatron local layer 0.81 ms forward / 1.63 ms forward + backward per 16-token microbatch (model
# outside its layers 0.33 / 0.72 ms), SGLang CPU decode step 1.85 ms + 0.135 ms per running sequence (5.8k tokens/s
# at batch 48), 1.2 ms per prefilled request, EMD of a K=8 window pair 5.4 us, filesystem 1.1 GB/s. Not measured
# yet (0): a server call's round trip, a schedule call, an optimizer step, per-token layer costs beyond the GEMMs.
CPU_2CORE = DeviceProfile(
    name="CPU, 2 cores (AMD EPYC; benchmarks/calibrate_cpu_profile.py)",
    flops=93e9, mfu_from_layout=False, memory_bytes_per_s=21e9,
    decode_step_overhead_s=1.85e-3, decode_seq_step_s=0.135e-3, prefill_request_s=1.23e-3,
    layer_forward_s=0.81e-3, layer_train_s=1.63e-3, model_forward_s=0.33e-3, model_train_s=0.72e-3,
    collective_latency_s=0.34e-3, collective_bytes_per_s=0.84e9, inter_node_bytes_per_s=0.84e9,
    filesystem_bytes_per_s=1.1e9, ot_seconds_per_window=5.4e-6)

PROFILES = {"h100": H100, "cpu": CPU_2CORE}
