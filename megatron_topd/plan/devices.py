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

# benchmarks/calibrate_cpu_profile.py on this machine (AMD EPYC, 2 cores, one thread per process), Dec 7 2026 04:09
# (`--from-json` of that run derives these fields): a d96 Megatron local layer reaches 59 GFLOP/s per token of
# forward (GEMMs alone: 61-89 GFLOP/s) and costs 0.93 ms per call (2.0 ms with backward; the backward 3.2x the
# forward per token), 3.7 us per token outside the layers; an optimizer step 4.1 ms; DRAM 22 GB/s; a collective
# inside a pass 1.9 ms (a TP=2 layer's calls over a TP=1 layer's, per all-reduce; back to back: 0.48 ms), gloo
# 0.85 GB/s; at TP=2 a rank's forward work runs 0.73x as fast per token as at TP=1, its backward 0.89x, not 2x;
# SGLang CPU decode step 4.0 ms + 0.26 ms per running sequence, 2.6 ms per prefilled request; a sync's light call
# 3.6 ms, one more bucket 4.6 ms, 17 ns per bucket byte (16 ns of it the server's load), the rest of a sync 6.2 ms;
# a dist checkpoint save 0.53 s + 0.047 s per layer (the first of a process 3.3 s); OT 46 us per window pair (K=8);
# filesystem 0.95 GB/s. Calibrations 30 minutes apart on this shared machine differ by 30-50% per figure, and two
# taken under heavy load came out unphysical (04:39: negative per-call costs; 05:01: a TP=2 rank faster per token
# than a TP=1 layer): docs/planning.md.
CPU_2CORE = DeviceProfile(
    name="CPU, 2 cores (AMD EPYC; benchmarks/calibrate_cpu_profile.py)",
    mfu_from_layout=False, flops=5.94e+10, backward_ratio=3.21, tp_speedup=0.733, tp_backward_speedup=0.889,
    memory_bytes_per_s=2.15e+10, decode_step_overhead_s=0.00396, decode_seq_step_s=0.000257,
    prefill_request_s=0.00259, server_light_call_s=0.00361, weight_update_call_s=0.00464, weight_sync_rest_s=0.00619,
    layer_forward_s=0.000932, layer_train_s=0.002, model_forward_s=6.7e-05, model_train_s=0.000575,
    model_forward_token_s=3.71e-06, schedule_call_s=6.33e-05, optimizer_step_s=0.00413, collective_latency_s=0.00187,
    collective_bytes_per_s=8.49e+08, inter_node_bytes_per_s=8.49e+08, weight_load_bytes_per_s=6.2e+07,
    filesystem_bytes_per_s=9.48e+08, checkpoint_call_s=0.53, checkpoint_layer_s=0.0466,
    ot_seconds_per_window=4.6e-05)

PROFILES = {"h100": H100, "cpu": CPU_2CORE}
