"""Device profiles of the step-time model (plan/step_time.py): what a machine does per second, and what it pays per
call where a small model is launch-bound.

`H100` is an H100 SXM node from its data sheet and the utilisations large runs reach; its trainer's per-call costs
are 0 because at 70B scale they vanish into the utilisation (`speed.trainer_mfu`); the host-side costs of a weight
sync's calls and of a checkpoint's save are counted (see below). `CPU_2CORE` is this project's CPU
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
    tp_backward_speedup: float = 2.0  # the same for the backward's share (its GEMMs are shaped differently)
    mfu_from_layout: bool = True  # utilisation = speed.trainer_mfu(layout); False: 1.0 plus the per-call costs below
    memory_bytes_per_s: float = 0.0  # HBM / DRAM
    decode_efficiency: float = 1.0  # of memory bandwidth in a decode step
    prefill_mfu: float = 1.0
    # per-call costs (0 where the utilisation already holds them)
    decode_step_overhead_s: float = 0.0  # one decode step of a server, whatever its batch
    decode_seq_step_s: float = 0.0  # each running sequence's share of a decode step
    prefill_request_s: float = 0.0  # one request prefilled (scheduling, its attention call)
    server_light_call_s: float = 0.0  # one admin round trip of a sync (pause, begin, end, model_info, continue)
    weight_update_call_s: float = 0.0  # one bucket's update call apart from its bytes
    weight_sync_rest_s: float = 0.0  # a sync's work beyond its calls, tensors and bytes (its cache flush, the client)
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
    weight_load_bytes_per_s: float = math.inf  # a server loading a received bucket into its model
    filesystem_bytes_per_s: float = 20e9
    checkpoint_call_s: float = 0.0  # one dist checkpoint save apart from its bytes (its plan, metadata, barriers)
    checkpoint_layer_s: float = 0.0  # each layer's share of a save apart from its bytes (its sharded tensors)
    ot_seconds_per_window: float = 2e-3  # one window pair's costs and exact EMD on one core (topd/divergence.py)
    ot_tp_speedup: float = 2.0  # how much faster a rank solves its share of the pairs dealt over a TP doubling


# The H100's host-side costs are this machine's (the same Python: SGLang's HTTP server, tokenizer manager and
# scheduler for a sync's calls; Megatron's dist checkpointing for a save's plan and metadata), rounded up from
# calibrate_cpu_profile.py's figures in three calibrations (light call 2.3-3.6 ms, one more bucket 4.6-18 ms, the
# rest of a sync 0-18 ms, a save 0.2-0.53 s + 0.05-0.09 s per layer): a GPU node's host cores are no slower. A server loads a received bucket into its weights with a
# device-to-device copy (each byte read and written: half the HBM bandwidth). OT's pairs split evenly over the TP
# ranks (`ot_tp_speedup` 2, the default): each rank solves its share on its own host core.
H100 = DeviceProfile(
    name="H100 SXM (data sheet: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM; 400 Gb/s per node; 20 GB/s filesystem)",
    flops=989e12, fp8_speedup=2.0, memory_bytes_per_s=3.35e12, decode_efficiency=0.6, prefill_mfu=0.5,
    server_light_call_s=4e-3, weight_update_call_s=20e-3, weight_sync_rest_s=20e-3, inter_node_bytes_per_s=50e9,
    weight_load_bytes_per_s=3.35e12 / 2, filesystem_bytes_per_s=20e9, checkpoint_call_s=0.5, checkpoint_layer_s=0.1,
    ot_seconds_per_window=2e-3)

# benchmarks/calibrate_cpu_profile.py on this machine (AMD EPYC, 2 cores, one thread per process), Dec 7 2026 08:26
# (the calibration of `make bench-step-model`'s final run, the background experiment paused; docs/planning.md): a d96
# Megatron local layer reaches 49 GFLOP/s per token of forward, its backward 3.3x the forward per token, 0.89 ms per
# forward call; 0.78 ms per model call outside the layers, 0.33 us per token; a schedule call 0.14 ms; an optimizer
# step 4.1 ms; a collective inside a pass 1.9 ms (a TP=2 layer's calls over a TP=1 layer's, per all-reduce; back to
# back: 0.30 ms), gloo 1.0 GB/s; at TP=2 a rank runs its forward share 1.39x as fast per token as one rank the
# whole layer, its backward 1.51x, its share of OT's pairs 1.20x; SGLang CPU decode step 2.9 ms + 0.14 ms per running
# sequence, 1.3 ms per prefilled request; a sync's light call 1.2 ms, one more bucket 3.6 ms, the rest of a sync
# 8.5 ms; a dist checkpoint save 0.32 s + 0.011 s per layer (the first of a process 2.4 s); OT 38 us per window pair
# (K=8); DRAM 19 GB/s; filesystem 1.4 GB/s. Per-call intercepts are the least noisy they have been but still noisy
# (this run's layer_train_s, 0.30 ms, came out below its layer_forward_s); calibrations 30 minutes apart differ by
# 20-50% per figure.
CPU_2CORE = DeviceProfile(
    name="CPU, 2 cores (AMD EPYC; benchmarks/calibrate_cpu_profile.py)",
    mfu_from_layout=False, flops=4.93e+10, backward_ratio=3.32, tp_speedup=1.39, tp_backward_speedup=1.51,
    memory_bytes_per_s=1.87e+10, decode_step_overhead_s=0.00286, decode_seq_step_s=0.000138,
    prefill_request_s=0.00132, server_light_call_s=0.0012, weight_update_call_s=0.00361, weight_sync_rest_s=0.00848,
    layer_forward_s=0.000888, layer_train_s=0.000297, model_forward_s=0.000781, model_train_s=0.000934,
    model_forward_token_s=3.25e-07, schedule_call_s=0.000145, optimizer_step_s=0.00411, collective_latency_s=0.00189,
    collective_bytes_per_s=1.02e+09, inter_node_bytes_per_s=1.02e+09, weight_load_bytes_per_s=1.16e+09,
    filesystem_bytes_per_s=1.42e+09, checkpoint_call_s=0.324, checkpoint_layer_s=0.0112,
    ot_seconds_per_window=3.83e-05, ot_tp_speedup=1.2)

PROFILES = {"h100": H100, "cpu": CPU_2CORE}
