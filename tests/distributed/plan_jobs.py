"""Rank functions for the planner's tests (module level: the harness spawns them)."""
from __future__ import annotations

import torch

from megatron_topd.models import ModelSpec

# Qwen3-like dense (tied embeddings, q/k norm, head_dim != hidden/heads) and Qwen2-like MoE (q/k/v bias, untied).
DENSE = ModelSpec(vocab_size=1000, hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                  ffn_hidden_size=96, head_dim=32, qk_norm=True, tie_word_embeddings=True, family="qwen3")
MOE = ModelSpec(vocab_size=1000, hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, qkv_bias=True, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48,
                family="qwen3_moe")


def _storage_bytes(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def count_state(spec_name: str, tp: int, pp: int, params_dtype: str, first: int | None = None,
                last: int | None = None) -> dict:
    """Build the student as the trainer does, take one optimizer step, count bytes from the tensors' storages."""
    from megatron.core import parallel_state as ps

    from megatron_topd import parallel
    from megatron_topd.models import build_gpt_model
    from megatron_topd.models.precision import PrecisionConfig
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_topd.train.step import cross_entropy_loss, make_lm_batches, train_step

    spec = {"dense": DENSE, "moe": MOE}[spec_name]
    parallel.initialize(tp, pp, seed=3)
    overrides = {}
    if first is not None:
        overrides.update(num_layers_in_first_pipeline_stage=first, num_layers_in_last_pipeline_stage=last)
    precision = PrecisionConfig(params_dtype=params_dtype)
    model = build_gpt_model(spec, precision=precision, **overrides)
    names = [(n, tuple(p.shape)) for n, p in model.named_parameters()]
    ddp = wrap_ddp(model)
    optimizer, scheduler = build_optimizer([ddp], OptimConfig(lr=1e-3), params_dtype=precision.torch_dtype)
    if spec.is_moe and tp > 1:
        # Megatron's MoE layer refuses to *train* at TP > 1 without sequence parallelism (a performance guard that
        # checks `self.training`), and the local spec's torch RMSNorm cannot do sequence parallelism. Eval mode only
        # changes that flag here (no dropout): same forward, backward, buffers and optimizer step.
        ddp.eval()
    tokens = torch.randint(0, spec.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    train_step([ddp], optimizer, scheduler, make_lm_batches(tokens, 1, spec.vocab_size), cross_entropy_loss)

    params = list(model.parameters())
    weights = _storage_bytes(params)
    grads = _storage_bytes([p.main_grad for p in params])
    state_tensors = []
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in opt.optimizer.param_groups:
            state_tensors += list(group["params"])
        for state in opt.optimizer.state.values():
            state_tensors += [v for v in state.values() if torch.is_tensor(v) and v.dim() > 0]  # not step counters
    optim = {k: v for k, v in _storage_bytes(state_tensors).items() if k not in weights and k not in grads}
    return dict(names=names, weights=sum(weights.values()), gradients=sum(grads.values()),
                optimizer=sum(optim.values()), tp_rank=ps.get_tensor_model_parallel_rank(),
                pp_rank=ps.get_pipeline_model_parallel_rank(), dp_rank=ps.get_data_parallel_rank(),
                dp=ps.get_data_parallel_world_size())


def count_layouts(cases: list[tuple]) -> list[dict]:
    """Several (spec, tp, pp, dtype[, first, last]) cases in one spawn (each re-initialises the model-parallel groups)."""
    return [count_state(*case) for case in cases]



# ---- activation memory -----------------------------------------------------------------------------------------
ACT = ModelSpec(vocab_size=1000, hidden_size=64, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                ffn_hidden_size=96, head_dim=32)


def _allocation_peak(fn) -> int:
    """Peak of live CPU bytes allocated while `fn` runs, above what was live when it started.

    From the profiler's allocator events (`profile_memory=True`: every allocation and free with its size), replayed in
    time order. Unlike ru_maxrss this sees frees and ignores what glibc keeps cached, so it is deterministic.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def activation_peaks(cases: list[tuple[int, str]]) -> list[int]:
    """Measured activation peak of one training microbatch (forward, loss, backward) per (seq length, recompute).

    The student is DDP-wrapped as in training, so gradients land in the preallocated fp32 buffers; weights, gradient
    buffers and optimizer exist before the measurement and are not part of it.
    """
    from megatron_topd import parallel
    from megatron_topd.models import build_gpt_model
    from megatron_topd.train.optim import wrap_ddp
    from megatron_topd.train.step import cross_entropy_loss, make_lm_batches, run_schedule

    out = []
    for seq, recompute in cases:
        parallel.initialize(1, 1, seed=5)
        overrides = {}
        if recompute != "none":
            overrides["recompute_granularity"] = recompute
        if recompute == "full":
            overrides.update(recompute_method="uniform", recompute_num_layers=1)
        ddp = wrap_ddp(build_gpt_model(ACT, **overrides))
        tokens = torch.randint(0, ACT.vocab_size, (1, seq + 1), generator=torch.Generator().manual_seed(seq))
        batches = make_lm_batches(tokens, 1, ACT.vocab_size)
        run_schedule([ddp], batches, cross_entropy_loss, forward_only=False)  # warm-up: lazily built buffers
        out.append(_allocation_peak(lambda: run_schedule([ddp], batches, cross_entropy_loss, forward_only=False)))
    return out
