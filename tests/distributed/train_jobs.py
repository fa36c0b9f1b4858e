"""Rank functions shared by the training-layout and checkpoint tests (module level: the harness spawns them)."""
from __future__ import annotations

import torch

from megatron_topd.models import ModelSpec

SPEC = ModelSpec(vocab_size=100, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2, ffn_hidden_size=64)
GLOBAL_BATCH = 4
SEQ = 16
LR = 1e-2


def data(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, SPEC.vocab_size, (GLOBAL_BATCH, SEQ + 1), generator=g)


def setup(tp: int, pp: int):
    from megatron_topd import parallel
    from megatron_topd.models import build_gpt_model
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp

    layout = parallel.initialize(tp, pp, seed=7)
    ddp = wrap_ddp(build_gpt_model(SPEC))
    optimizer, scheduler = build_optimizer([ddp], OptimConfig(lr=LR, clip_grad=1.0), total_steps=3)
    return layout, [ddp], optimizer, scheduler


def local_batches(layout, step: int):
    """This DP rank's share of the global batch, one sequence per microbatch."""
    from megatron_topd.train.step import make_lm_batches

    tokens = data(step)
    per_rank = GLOBAL_BATCH // layout.data_parallel
    mine = tokens[layout.dp_rank * per_rank : (layout.dp_rank + 1) * per_rank]
    return make_lm_batches(mine, micro_batch_size=1, vocab_size=SPEC.vocab_size)


def train_steps(layout, chunks, optimizer, scheduler, steps):
    from megatron_topd.train.step import cross_entropy_loss, train_step

    return [train_step(chunks, optimizer, scheduler, local_batches(layout, s), cross_entropy_loss).loss for s in steps]


def eval_loss(layout, chunks) -> float:
    from megatron_topd.train.step import cross_entropy_loss, eval_step

    return eval_step(chunks, local_batches(layout, 99), cross_entropy_loss)["loss"]


def local_params(chunks) -> dict[str, torch.Tensor]:
    from megatron_topd.checkpointing import unwrap

    return {k: v.detach().clone() for k, v in unwrap(chunks[0]).state_dict().items() if not k.endswith("_extra_state")}


# ---- jobs ------------------------------------------------------------------------------------------------------
def make_initial_checkpoint(root: str) -> None:
    """Freshly initialised weights at (1,1,1), saved as step 0: every layout starts from them (as a converted
    HF student would), because Megatron's random init differs across pipeline layouts."""
    from megatron_topd.checkpointing import save_checkpoint

    _, chunks, _, _ = setup(1, 1)
    save_checkpoint(root, 0, chunks)


def train_from(init_root: str, tp: int, pp: int, out_root: str) -> list[float]:
    from megatron_topd.checkpointing import load_model_weights, save_checkpoint

    layout, chunks, optimizer, scheduler = setup(tp, pp)
    load_model_weights(f"{init_root}/step_00000000", chunks)
    losses = train_steps(layout, chunks, optimizer, scheduler, range(3))
    save_checkpoint(out_root, 3, chunks)
    return losses


def gather_via_checkpoint(roots: list[str]) -> list[dict[str, torch.Tensor]]:
    """Full (unsharded) parameters of each checkpoint, by loading it into a (1,1,1) model."""
    from megatron_topd.checkpointing import load_model_weights

    _, chunks, _, _ = setup(1, 1)
    out = []
    for root in roots:
        load_model_weights(f"{root}/step_00000003", chunks)
        out.append(local_params(chunks))
    return out


def train_save_continue(init_root: str, ckpt_root: str) -> dict:
    """Uninterrupted TP2 run: 2 steps, checkpoint, eval, step 3."""
    from megatron_topd.checkpointing import load_model_weights, save_checkpoint

    layout, chunks, optimizer, scheduler = setup(2, 1)
    load_model_weights(f"{init_root}/step_00000000", chunks)
    train_steps(layout, chunks, optimizer, scheduler, range(2))
    save_checkpoint(ckpt_root, 2, chunks, optimizer, scheduler, extra={"data_position": 2})
    ev = eval_loss(layout, chunks)
    (loss3,) = train_steps(layout, chunks, optimizer, scheduler, [2])
    return {"eval": ev, "loss3": loss3, "params": local_params(chunks), "rng": torch.rand(3)}


def resume_and_continue(ckpt_root: str, tp: int, pp: int, with_optimizer: bool) -> dict:
    from megatron_topd.checkpointing import load_checkpoint

    layout, chunks, optimizer, scheduler = setup(tp, pp)
    info = load_checkpoint(ckpt_root, chunks, optimizer if with_optimizer else None, scheduler if with_optimizer else None)
    out = {"info": info, "eval": eval_loss(layout, chunks)}
    if with_optimizer:
        (out["loss3"],) = train_steps(layout, chunks, optimizer, scheduler, [info["extra"]["data_position"]])
        out["params"] = local_params(chunks)
        out["rng"] = torch.rand(3)
    return out
