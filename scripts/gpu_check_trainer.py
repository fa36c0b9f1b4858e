"""GPU check of the trainer foundation (issue 2), one process on one GPU; prints figures, writes $OUT/trainer_gpu.json.

1. FP8 validation: with Transformer Engine missing, precision.fp8 must fail with the clear message; with TE present,
   a tiny GPTModel (TE layer spec) runs forward/backward under TE's fp8 autocast and its loss is compared with bf16.
2. The same tiny model trained 3 steps in bf16 through our train_step (Megatron DDP + DistributedOptimizer, NCCL).
"""
import json
import os
import time

import torch


def main():
    assert torch.cuda.is_available(), "needs CUDA"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    from megatron_topd import parallel
    from megatron_topd.models import ModelSpec, PrecisionConfig, build_gpt_model
    from megatron_topd.models.precision import transformer_engine_available
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_topd.train.step import cross_entropy_loss, make_lm_batches, train_step

    out = {"device": torch.cuda.get_device_name(), "capability": list(torch.cuda.get_device_capability())}
    te_ok, te_why = transformer_engine_available()
    out["transformer_engine"] = te_ok or te_why
    try:
        PrecisionConfig(fp8="hybrid", fp8_recipe="delayed", params_dtype="bf16").validate()
        out["fp8_validation"] = "accepted"
    except RuntimeError as exc:
        out["fp8_validation"] = f"RuntimeError: {exc}"
    parallel.initialize(1, 1, seed=3)
    spec = ModelSpec(vocab_size=32000, hidden_size=1024, num_layers=4, num_attention_heads=16, num_kv_heads=4,
                     ffn_hidden_size=4096)
    precisions = [("bf16", PrecisionConfig(params_dtype="bf16"))]
    if te_ok:
        precisions.append(("fp8", PrecisionConfig(params_dtype="bf16", fp8="hybrid", fp8_recipe="delayed")))
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, spec.vocab_size, (8, 1025), generator=g)
    for name, prec in precisions:
        torch.manual_seed(0)
        model = wrap_ddp(build_gpt_model(spec, precision=prec))
        opt, sch = build_optimizer([model], OptimConfig(lr=1e-4), params_dtype=prec.torch_dtype, total_steps=3)
        batches = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in b.items()} for b in make_lm_batches(tokens, 2, spec.vocab_size)]
        losses, times = [], []
        for _ in range(3):
            torch.cuda.synchronize()
            t = time.perf_counter()
            losses.append(train_step([model], opt, sch, batches, cross_entropy_loss).loss)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        out[name] = {"losses": losses, "step_s": times, "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}
        print(name, out[name], flush=True)
    print(json.dumps(out, indent=1))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "trainer_gpu.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
