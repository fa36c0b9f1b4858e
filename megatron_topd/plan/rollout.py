"""The SGLang side: KV-cache bytes per token, tokens one node's servers can hold, and the nodes each role needs.

KV cache per token: K and V for every layer and KV head, bf16: 2 x layers x kv_heads x head_dim x 2 B (70B: 0.31 MiB).
One server spans `server_tp` GPUs of a node (the smallest power of two that holds the weights with room for a KV
pool); each GPU keeps kv_heads / server_tp of the heads (at least one: heads are replicated when TP > kv_heads).
SGLang's static pool: `mem_fraction_static` x GPU memory (0.85, SGLang's order of magnitude for large GPUs) minus the
weight shard. A role needs enough nodes that `concurrency` x rollouts x sequence tokens are resident at once (1.0 for
the student's rollouts, all generated together; the teacher scores prefixes in waves, 0.25 by default).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_topd.models.spec import ModelSpec
from megatron_topd.plan.model_state import total_params
from megatron_topd.plan.units import GB

MEM_FRACTION_STATIC = 0.85


def kv_bytes_per_token(spec: ModelSpec, dtype_bytes: int = 2) -> int:
    return 2 * spec.num_layers * spec.num_kv_heads * spec.kv_channels * dtype_bytes


@dataclass(frozen=True)
class ServerBudget:
    server_tp: int
    servers_per_node: int
    weights_per_gpu: float
    kv_pool_per_gpu: float
    tokens_per_node: int  # KV-cache tokens all of a node's servers hold together (0: cannot serve on one node)

    def to_dict(self) -> dict:
        return {"server_tp": self.server_tp, "servers_per_node": self.servers_per_node,
                "weights_per_gpu_gb": round(self.weights_per_gpu / GB, 2),
                "kv_pool_per_gpu_gb": round(self.kv_pool_per_gpu / GB, 2), "kv_tokens_per_node": self.tokens_per_node}


def server_budget(spec: ModelSpec, *, gpus_per_node: int, gpu_mem_gb: float) -> ServerBudget:
    weights = total_params(spec) * 2
    tp = 1
    while tp <= gpus_per_node:
        if spec.num_attention_heads % tp == 0:
            w = weights / tp
            pool = MEM_FRACTION_STATIC * gpu_mem_gb * GB - w
            if pool > 0.2 * gpu_mem_gb * GB:  # leave the KV pool at least a fifth of the GPU
                heads_per_gpu = max(1, spec.num_kv_heads // tp)
                per_token_gpu = kv_bytes_per_token(spec) * heads_per_gpu / spec.num_kv_heads
                per_server = int(pool // per_token_gpu)
                return ServerBudget(tp, gpus_per_node // tp, w, pool, per_server * (gpus_per_node // tp))
        tp *= 2
    return ServerBudget(gpus_per_node, 1, weights / gpus_per_node, 0.0, 0)


def nodes_for(spec: ModelSpec, tokens: float, *, gpus_per_node: int, gpu_mem_gb: float) -> int:
    """Nodes whose servers hold `tokens` KV tokens at once; weights needing more than one node count as extra nodes."""
    budget = server_budget(spec, gpus_per_node=gpus_per_node, gpu_mem_gb=gpu_mem_gb)
    if budget.tokens_per_node == 0:  # multi-node server: enough nodes for the weights at 50% of memory, then KV
        weight_nodes = math.ceil(total_params(spec) * 2 / (0.5 * gpus_per_node * gpu_mem_gb * GB))
        per_token = kv_bytes_per_token(spec)
        kv_per_node = 0.35 * gpus_per_node * gpu_mem_gb * GB
        return max(weight_nodes, math.ceil(tokens * per_token / kv_per_node))
    return max(1, math.ceil(tokens / budget.tokens_per_node))
