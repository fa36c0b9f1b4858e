"""The demo's models, built offline and cached: one tokenizer, a teacher trained on the task, a warm-started student.

    python -m megatron_topd.task_assets --out runs/demo/assets

Both models are trained through the project's own Megatron training step (`train.sft`) in one process (gloo, TP=1),
saved as Megatron checkpoints (the trainer's input) and exported to HF (the SGLang servers' input) with the
project's converter. The teacher trains until its greedy held-out accuracy reaches `teacher_target` (or its step
budget ends); the student gets `student_steps` of the same SFT, a short stage-1 warm start that leaves it well
below the teacher, so on-policy distillation has something to teach. Each model is cached behind a stamp (in
assets.json) of its own recipe and the data's: change the student's recipe and only the student is rebuilt.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from megatron_topd.tasks import check_task, make_task
from megatron_topd.tasks.addition import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, AdditionTask, Problem, build_tokenizer


@dataclass
class ModelRecipe:
    hidden_size: int
    num_layers: int
    ffn_hidden_size: int
    num_heads: int = 4
    steps: int = 1000
    lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0
    # Share of training chains with 1-2 digits replaced by wrong ones, seen as context but never trained as targets:
    # the model learns to continue a flawed chain correctly (from the prompt), so its distribution on a student's
    # mistaken prefix still points at the right answer - what makes a teacher worth distilling on-policy.
    corruption: float = 0.0
    # task addition_forms: the model's mixture of surface forms, one weight per form of tasks.addition_forms.FORMS,
    # drawn independently per chain step (None: every step in the demo's form)
    form_weights: tuple[float, ...] | None = None


@dataclass
class AssetRecipe:
    task: str = "addition"  # megatron_topd.tasks.TASKS (addition_forms: surface forms, issue 26)
    digits: int = 4
    n_train: int = 20000
    n_heldout: int = 500
    n_prompts: int = 4000  # the on-policy stage's prompts (drawn from the training problems)
    teacher: ModelRecipe = field(default_factory=lambda: ModelRecipe(hidden_size=96, num_layers=3, ffn_hidden_size=256,
                                                                     steps=1500, seed=1, corruption=0.5))
    teacher_target: float = 0.98
    student: ModelRecipe = field(default_factory=lambda: ModelRecipe(hidden_size=96, num_layers=2, ffn_hidden_size=256,
                                                                     steps=360, seed=2))
    eval_every: int = 250
    # Where a fixed step budget does not give a useful starting point (addition_forms: 360 steps leave the student at
    # 0.2% held-out accuracy, where no variant can learn in 40 steps): the student trains until its held-out accuracy
    # reaches this (checked every `student_eval_every` steps), `student.steps` being the budget. None: fixed steps.
    student_target: float | None = None
    student_eval_every: int = 25


# The surface-form task's arms (`--task addition_forms`): the teacher prefers form ab, the warm-started student
# sum_first, so at the first token of a step the student leaves the teacher's form without being wrong.
FORMS_TEACHER_WEIGHTS = (0.6, 0.2, 0.2)
FORMS_STUDENT_WEIGHTS = (0.2, 0.2, 0.6)
FORMS_STUDENT_TARGET = 0.35  # about the demo student's start (37%): well below the teacher, room to learn
FORMS_STUDENT_BUDGET = 2000
STUDENT_FIELDS = ("student_target", "student_eval_every")  # the student's stamp, not the data's
TEACHER_ARMS = {"robust": 0.5, "clean": 0.0}  # the teacher's corruption share: robust off-trajectory, or clean only


def recipe_for(task: str = "addition", teacher_arm: str = "robust") -> AssetRecipe:
    """The recipe of a task and teacher arm: ``robust`` (trained on chains with corrupted digits as context, so it
    continues a flawed prefix correctly) or ``clean`` (correct chains only: not robust off-trajectory)."""
    check_task(task)
    if teacher_arm not in TEACHER_ARMS:
        raise ValueError(f"teacher arm {teacher_arm!r}: use one of {', '.join(TEACHER_ARMS)}")
    recipe = AssetRecipe(task=task)
    recipe.teacher.corruption = TEACHER_ARMS[teacher_arm]
    if task == "addition_forms":
        recipe.teacher.form_weights, recipe.student.form_weights = FORMS_TEACHER_WEIGHTS, FORMS_STUDENT_WEIGHTS
        recipe.student_target, recipe.student.steps = FORMS_STUDENT_TARGET, FORMS_STUDENT_BUDGET
    return recipe


def _stamp(fields: dict) -> dict:
    """A recipe's fields for its cache stamp: the fields added for issue 26 are left out at their defaults, so
    assets built before them are still reused."""
    return {k: v for k, v in fields.items() if (k, v) not in (("task", "addition"), ("form_weights", None))}


def training_chains(task, problems: list[Problem], recipe: ModelRecipe) -> list[str]:
    """The SFT targets: the task's chain, or for addition_forms a chain of forms drawn with `form_weights`."""
    import random

    if recipe.form_weights is None:
        return [task.solution(p) for p in problems]
    if not hasattr(task, "sample_solution"):
        raise ValueError(f"form_weights={recipe.form_weights} needs a task with surface forms: use addition_forms")
    rng = random.Random(recipe.seed)
    return [task.sample_solution(p, rng, recipe.form_weights) for p in problems]


def asset_paths(root: str | Path) -> dict[str, Path]:
    root = Path(root)
    return {"root": root, "tokenizer": root / "tokenizer", "prompts": root / "prompts.jsonl",
            "heldout": root / "heldout.jsonl", "teacher_ckpt": root / "teacher_megatron",
            "teacher_hf": root / "teacher_hf", "student_ckpt": root / "student_megatron",
            "student_hf": root / "student_hf", "report": root / "assets.json"}


def model_spec(recipe: ModelRecipe, max_len: int):
    from megatron_topd.models import ModelSpec

    return ModelSpec(vocab_size=VOCAB_SIZE, hidden_size=recipe.hidden_size, num_layers=recipe.num_layers,
                     num_attention_heads=recipe.num_heads, num_kv_heads=recipe.num_heads,
                     ffn_hidden_size=recipe.ffn_hidden_size, max_position_embeddings=max_len, family="llama")


def encode(tokenizer, text: str) -> list[int]:
    return [int(t) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def greedy_accuracy(model, task: AdditionTask, tokenizer, problems: list[Problem], max_new_tokens: int) -> float:
    """Exact-answer accuracy of batched greedy decoding with the Megatron model (TP=1, full recompute per token).
    All prompts of the task have one length, so the batch needs no padding."""
    model.eval()
    try:
        tokens = torch.tensor([encode(tokenizer, task.prompt(p)) for p in problems])
        done = torch.zeros(len(problems), dtype=torch.bool)
        for _ in range(max_new_tokens):
            positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
            logits = model(input_ids=tokens, position_ids=positions, attention_mask=None)
            nxt = logits[:, -1, :VOCAB_SIZE].argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, PAD_ID), nxt)
            tokens = torch.cat([tokens, nxt.unsqueeze(1)], dim=1)
            done |= nxt == EOS_ID
            if bool(done.all()):
                break
        prompt_len = len(task.prompt(problems[0]))
        correct = 0
        for row, p in zip(tokens[:, prompt_len:].tolist(), problems):
            text = tokenizer.decode([t for t in row if t not in (PAD_ID, EOS_ID)])
            correct += task.is_correct(text, task.answer(p))
        return correct / len(problems)
    finally:
        model.train()


def corrupt_chains(responses: list[list[int]], tokenizer, share: float, seed: int):
    """A `share` of the responses with 1-2 of their digit tokens replaced by another digit; returns the responses and,
    per response, the corrupted positions (context only, not targets)."""
    import random

    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    rng = random.Random(seed)
    out, untrained = [], []
    for ids in responses:
        ids, bad = list(ids), []
        if rng.random() < share:
            slots = [t for t, tok in enumerate(ids) if tok in digits]
            for t in rng.sample(slots, rng.choice((1, 2))):
                ids[t] = rng.choice([d for d in digits if d != ids[t]])
                bad.append(t)
        out.append(ids)
        untrained.append(bad)
    return out, untrained


def train_and_export(name: str, recipe: ModelRecipe, task: AdditionTask, tokenizer, paths: dict, train: list[Problem],
                     heldout: list[Problem], *, target: float | None, eval_every: int) -> dict:
    """SFT one model through the project's Megatron step; save the Megatron checkpoint and its HF export."""
    from megatron_topd import parallel
    from megatron_topd.checkpointing import save_checkpoint
    from megatron_topd.convert.megatron_to_hf import convert_megatron_to_hf
    from megatron_topd.models import PrecisionConfig, build_gpt_model
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_topd.train.sft import SftExamples, sft

    t0 = time.perf_counter()
    parallel.set_seed(recipe.seed)
    prompts = [encode(tokenizer, task.prompt(p)) for p in train]
    responses = [encode(tokenizer, chain) + [EOS_ID] for chain in training_chains(task, train, recipe)]
    max_new = len(responses[0])
    responses, untrained = corrupt_chains(responses, tokenizer, recipe.corruption, seed=recipe.seed)
    spec = model_spec(recipe, max_len=128)
    model = wrap_ddp(build_gpt_model(spec, precision=PrecisionConfig(params_dtype="fp32"), perform_initialization=True),
                     use_distributed_optimizer=False)
    optim = OptimConfig(lr=recipe.lr, min_lr=recipe.lr / 10, warmup_steps=min(50, recipe.steps // 10),
                        lr_decay_style="cosine", use_distributed_optimizer=False, clip_grad=1.0)
    optimizer, scheduler = build_optimizer([model], optim, total_steps=recipe.steps)
    curve: list[tuple[int, float]] = []

    def check(step: int, loss: float) -> bool:
        if step % eval_every and step != recipe.steps:
            return False
        acc = greedy_accuracy(model, task, tokenizer, heldout, max_new)
        curve.append((step, acc))
        print(f"{name}: step {step} loss {loss:.4f} held-out greedy accuracy {acc:.3f}", flush=True)
        return target is not None and acc >= target

    losses = sft([model], optimizer, scheduler, SftExamples.from_pairs(prompts, responses, PAD_ID, untrained),
                 steps=recipe.steps, batch_size=recipe.batch_size, micro_batch_size=recipe.batch_size,
                 vocab_size=VOCAB_SIZE, seed=recipe.seed, progress=f"SFT {name}", callback=check)
    if not curve or curve[-1][0] != len(losses):
        curve.append((len(losses), greedy_accuracy(model, task, tokenizer, heldout, max_new)))
    ckpt, hf = paths[f"{name}_ckpt"], paths[f"{name}_hf"]
    for d in (ckpt, hf):
        shutil.rmtree(d, ignore_errors=True)
    save_checkpoint(ckpt, 0, [model.module])  # step 0 of the distillation run: the trainer resumes from it
    spec.save_yaml(ckpt / "model_spec.yaml")
    hf_ids = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    (ckpt / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                                  **hf_ids}, indent=2))
    for f in paths["tokenizer"].iterdir():
        shutil.copy(f, ckpt / f.name)
    convert_megatron_to_hf(ckpt, hf, dtype="fp32", log=lambda msg: None)
    (hf / "generation_config.json").write_text(json.dumps({**hf_ids, "do_sample": False}))
    return {"steps": len(losses), "first_loss": losses[0], "final_loss": losses[-1],
            "heldout_accuracy": curve[-1][1], "curve": curve, "params": sum(p.numel() for p in model.parameters()),
            "seconds": time.perf_counter() - t0, "recipe": asdict(recipe)}


def asset_stamps(recipe: AssetRecipe) -> dict[str, str]:
    """Each model's cache stamp: the data's recipe and its own (a student's stopping rule is its own, not the data's:
    changing it rebuilds the student only)."""
    data = _stamp({k: v for k, v in asdict(recipe).items() if k not in ("teacher", "student", *STUDENT_FIELDS)})
    student_target = ({"target": recipe.student_target, "eval_every": recipe.student_eval_every}
                      if recipe.student_target is not None else {})  # absent: the demo's stamps stay as they were
    return {"teacher": json.dumps({"data": data, "model": _stamp(asdict(recipe.teacher)),
                                   "target": recipe.teacher_target}, sort_keys=True),
            "student": json.dumps({"data": data, "model": _stamp(asdict(recipe.student)), **student_target},
                                  sort_keys=True)}


def _stopping(recipe: AssetRecipe, who: str) -> dict:
    if who == "teacher":
        return {"target": recipe.teacher_target, "eval_every": recipe.eval_every}
    if recipe.student_target is None:
        return {"target": None, "eval_every": recipe.eval_every}
    return {"target": recipe.student_target, "eval_every": recipe.student_eval_every}


def build_assets(root: str | Path, recipe: AssetRecipe | None = None) -> dict[str, Path]:
    """Build (or reuse) every asset under `root`; returns their paths. Runs in one process (gloo, world size 1)."""
    from transformers import AutoTokenizer

    from megatron_topd import parallel

    recipe = recipe or AssetRecipe()
    paths = asset_paths(root)
    stamps = asset_stamps(recipe)
    old = json.loads(paths["report"].read_text()) if paths["report"].is_file() else {}
    stale = [who for who in ("teacher", "student")
             if old.get(who, {}).get("stamp") != stamps[who] or not (paths[f"{who}_hf"] / "config.json").is_file()]
    if not stale:
        return paths
    paths["root"].mkdir(parents=True, exist_ok=True)
    task = make_task(recipe.task, digits=recipe.digits)
    build_tokenizer(paths["tokenizer"])
    tokenizer = AutoTokenizer.from_pretrained(str(paths["tokenizer"]))
    train, heldout = task.split(recipe.n_train, recipe.n_heldout, seed=0)
    task.write_jsonl(train[: recipe.n_prompts], paths["prompts"])
    task.write_jsonl(heldout, paths["heldout"])
    report = {who: old[who] for who in ("teacher", "student") if who not in stale}
    parallel.initialize(1, 1, backend="gloo", seed=0)
    try:
        for who in stale:  # each model is rebuilt only when its own recipe (or the data's) changed
            report[who] = train_and_export(who, getattr(recipe, who), task, tokenizer, paths, train, heldout,
                                           **_stopping(recipe, who))
            report[who]["stamp"] = stamps[who]
    finally:
        parallel.destroy()
    paths["report"].write_text(json.dumps(report, indent=1))
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="asset folder (reused when its recipe is unchanged)")
    p.add_argument("--task", default="addition", help="addition (the demo's) or addition_forms (surface forms)")
    p.add_argument("--teacher-arm", default="robust", choices=tuple(TEACHER_ARMS),
                   help="robust: trained with corrupted chains as context; clean: correct chains only")
    p.add_argument("--digits", type=int, default=None, help="operand digits (default 4)")
    p.add_argument("--teacher-steps", type=int, default=None, help="the teacher's SFT step budget")
    p.add_argument("--student-steps", type=int, default=None, help="the student's warm-start SFT steps")
    p.add_argument("--n-train", type=int, default=None)
    p.add_argument("--n-heldout", type=int, default=None)
    p.add_argument("--n-prompts", type=int, default=None)
    args = p.parse_args(argv)
    recipe = recipe_for(args.task, args.teacher_arm)
    for name in ("digits", "n_train", "n_heldout", "n_prompts"):
        if getattr(args, name) is not None:
            setattr(recipe, name, getattr(args, name))
    if args.teacher_steps is not None:
        recipe.teacher.steps = args.teacher_steps
    if args.student_steps is not None:
        recipe.student.steps = args.student_steps
    paths = build_assets(args.out, recipe)
    report = json.loads(paths["report"].read_text())
    for who in ("teacher", "student"):
        r = report[who]
        print(f"{who}: {r['params'] / 1e3:.0f}k parameters, {r['steps']} SFT steps in {r['seconds']:.0f} s, "
              f"held-out greedy accuracy {r['heldout_accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
