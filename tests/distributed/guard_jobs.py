"""Rank functions for the non-finite guard and the padded-vocabulary cross entropy (issue 9)."""
from __future__ import annotations

import torch

from tests.distributed.distill_jobs import SPEC, data


def nan_in_one_rank(root: str, policy: str, out_root: str) -> dict:
    """TP=2: a NaN injected into rank 1's gradients during the backward; the guard decides for every rank."""
    import torch.distributed as dist

    from megatron_topd import parallel
    from megatron_topd.checkpointing import load_model_weights, save_checkpoint, unwrap
    from megatron_topd.models import build_gpt_model
    from megatron_topd.train.batches import rollout_microbatches
    from megatron_topd.train.handoffs import RolloutRows
    from megatron_topd.train.distill_step import distill_step
    from megatron_topd.train.guard import NonFiniteError
    from megatron_topd.train.objective import ObjectiveScales
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_topd.train.teacher import ColocatedTeacher

    parallel.initialize(2, 1, seed=3)
    teacher_model = build_gpt_model(SPEC)
    load_model_weights(f"{root}/teacher/step_00000000", [teacher_model])
    student = [wrap_ddp(build_gpt_model(SPEC))]
    load_model_weights(f"{root}/student/step_00000000", student)
    optimizer, scheduler = build_optimizer(student, OptimConfig(lr=1e-2))
    before = {k: v.detach().clone() for k, v in unwrap(student[0]).named_parameters()}
    d = data()
    rows = RolloutRows(d["prompts"], d["responses"], d["logprobs"])
    batches = rollout_microbatches(rows, 160, 0)
    if dist.get_rank() == 1:  # poison one parameter's gradient on this rank only
        param = next(unwrap(student[0]).parameters())
        param.register_hook(lambda g: torch.full_like(g, float("nan")))
    scales = ObjectiveScales(dp_size=1, global_tokens=sum(len(r) for r in d["responses"]), global_windows=0,
                             lambda_traj=0.0, variant="opd")
    out = {"rank": dist.get_rank()}
    try:
        result = distill_step(student, optimizer, scheduler, ColocatedTeacher([teacher_model]), batches, scales,
                              group_size=2, vocab_size=SPEC.vocab_size, chunk_size=32, on_nonfinite=policy)
        out["skipped"] = result.skipped
        out["lr_steps"] = scheduler.num_steps
    except NonFiniteError as exc:
        out["error"] = str(exc)
    after = {k: v.detach() for k, v in unwrap(student[0]).named_parameters()}
    out["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    out["finite"] = all(bool(torch.isfinite(v).all()) for v in after.values())
    save_checkpoint(out_root, 1, student, optimizer, scheduler)  # what a run would save after a skipped step
    dist.barrier()
    return out


def checkpoint_is_finite(path: str) -> bool:
    from megatron_topd import parallel
    from megatron_topd.checkpointing import load_model_weights, unwrap
    from megatron_topd.models import build_gpt_model

    parallel.initialize(1, 1, seed=1)
    model = build_gpt_model(SPEC)
    load_model_weights(path, [model])
    return all(bool(torch.isfinite(p).all()) for p in unwrap(model).parameters())


def cross_entropy_at_tp(mg_dir: str, tokens: torch.Tensor, tp: int) -> float:
    """Megatron's loss through eval_step at TP=tp on a converted model whose vocabulary is padded."""
    from megatron_topd import parallel
    from megatron_topd.checkpointing import load_model_weights
    from megatron_topd.models import ModelSpec, build_gpt_model
    from megatron_topd.train.step import cross_entropy_loss, eval_step, make_lm_batches

    parallel.initialize(tp, 1, seed=1)
    spec = ModelSpec.load_yaml(f"{mg_dir}/model_spec.yaml")
    model = build_gpt_model(spec)
    load_model_weights(f"{mg_dir}/step_00000000", [model])
    return eval_step([model], make_lm_batches(tokens, 1, spec.vocab_size), cross_entropy_loss)["loss"]


def convert(hf_dir: str, mg_dir: str) -> None:
    from megatron_topd import parallel
    from megatron_topd.convert.hf_to_megatron import convert_hf_to_megatron

    parallel.initialize(1, 1, seed=1)
    convert_hf_to_megatron(hf_dir, mg_dir, log=lambda _: None)
