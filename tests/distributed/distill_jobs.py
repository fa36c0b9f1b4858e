"""Rank functions for the training-step tests: the step's data path (token-budget microbatches, teacher groups,
guidance rows at weighted positions, one guarded optimizer step) against a float64 full-batch reference."""
from __future__ import annotations

import torch

from megatron_topd.models import ModelSpec

SPEC = ModelSpec(vocab_size=131, hidden_size=32, num_layers=4, num_attention_heads=4, num_kv_heads=2,
                 ffn_hidden_size=64)  # vocab 131 pads to 256: padding must stay out of every softmax
VARIANTS = ("opd", "opd_suppress", "topd")
# topd with its guidance windows inside their rollout rows (train.guidance_layout=shared_prefix): the same reference
RUN_VARIANTS = VARIANTS + ("topd_shared_prefix",)
REFERENCE_OF = {"topd_shared_prefix": "topd"}
LAMBDA = 0.7
BUDGET = 160  # tokens per microbatch: several microbatches of different shapes
GROUP = 2  # teacher_group_microbatches


WINDOWS = ((4, 7, 6), (1, 50, 8), (1, 90, 35))  # (rollout row, t, K): the third outgrows BUDGET in its row


def data() -> dict:
    """6 rollouts of 5..120 tokens, token weights with suppressed positions, 3 guidance rows (a rollout's first t
    tokens + a window of K; two share rollout row 1)."""
    g = torch.Generator().manual_seed(5)
    lengths = [(2, 3), (5, 115), (3, 40), (4, 9), (6, 70), (2, 24)]  # (prompt, response)
    prompts = [torch.randint(0, SPEC.vocab_size, (p,), generator=g).tolist() for p, _ in lengths]
    responses = [torch.randint(0, SPEC.vocab_size, (r,), generator=g).tolist() for _, r in lengths]
    logprobs = [(-torch.rand(r, generator=g) * 5).tolist() for _, r in lengths]
    width = max(p + r for p, r in lengths)
    weights = torch.where(torch.rand(len(lengths), width, generator=g) < 0.25, 0.0, 1.0)
    g_rows, g_weights, g_lengths = [], [], []
    for row, prefix, k in WINDOWS:
        g_rows.append(torch.tensor((prompts[row] + responses[row])[:prefix]
                                   + torch.randint(0, SPEC.vocab_size, (k,), generator=g).tolist()))
        w = torch.zeros(prefix + k)
        w[prefix - 1 : prefix - 1 + k] = torch.rand(k, generator=g) + 0.1
        g_weights.append(w / w.sum())
        g_lengths.append(prefix + k)
    gw = max(g_lengths)
    g_tokens = torch.zeros(3, gw, dtype=torch.long)
    g_logit_weights = torch.zeros(3, gw)
    for i, (r, w) in enumerate(zip(g_rows, g_weights)):
        g_tokens[i, : len(r)] = r
        g_logit_weights[i, : len(w)] = w
    return {"prompts": prompts, "responses": responses, "logprobs": logprobs, "token_weights": weights,
            "g_tokens": g_tokens, "g_lengths": torch.tensor(g_lengths), "g_weights": g_logit_weights,
            "g_start": torch.tensor([t for _, t, _ in WINDOWS]), "g_row": [r for r, _, _ in WINDOWS]}


def make_init(root: str) -> None:
    """Student and teacher initial weights at (1,1,1): every layout starts from them."""
    from megatron_topd import parallel
    from megatron_topd.checkpointing import save_checkpoint
    from megatron_topd.models import build_gpt_model

    parallel.initialize(1, 1, seed=11)
    save_checkpoint(f"{root}/student", 0, [build_gpt_model(SPEC)])
    parallel.set_seed(12)
    save_checkpoint(f"{root}/teacher", 0, [build_gpt_model(SPEC)])


def reference(root: str) -> dict:
    """Float64, one process, one row at a time (no padding, no microbatches): topd_loss and its gradients."""
    from megatron_topd import parallel
    from megatron_topd.checkpointing import load_model_weights, unwrap
    from megatron_topd.losses import vocab_parallel_kl, vocab_parallel_opd_scores
    from megatron_topd.models import build_gpt_model
    from megatron_topd.topd import topd_loss

    parallel.initialize(1, 1, seed=1)
    student, teacher = build_gpt_model(SPEC), build_gpt_model(SPEC)
    load_model_weights(f"{root}/student/step_00000000", [student])
    load_model_weights(f"{root}/teacher/step_00000000", [teacher])
    student.double()
    teacher.double()
    d = data()

    def logits(model, ids):
        ids = torch.as_tensor(ids).unsqueeze(0)
        return model(input_ids=ids, position_ids=torch.arange(ids.shape[1]).unsqueeze(0), attention_mask=None)[0]

    out = {}
    for variant in VARIANTS:
        student.zero_grad()
        B, W = len(d["prompts"]), d["token_weights"].shape[1]
        l_t = torch.zeros(B, W, dtype=torch.float64)
        mask = torch.zeros(B, W, dtype=torch.bool)
        stats = {"entropy": 0.0, "diff_sum": 0.0, "diff_max": 0.0}
        rows_l = []
        for i, (p, r) in enumerate(zip(d["prompts"], d["responses"])):
            ids = p + r
            s = logits(student, ids)
            with torch.no_grad():
                t = logits(teacher, ids)
            sc = vocab_parallel_opd_scores(s[:-1], t[:-1], torch.tensor(ids[1:]), vocab_size=SPEC.vocab_size)
            row = torch.cat([torch.zeros(1, dtype=torch.float64), sc.reverse_kl])
            rows_l.append(row)
            mask[i, len(p) : len(ids)] = True
            resp = slice(len(p) - 1, len(ids) - 1)
            stats["entropy"] += float(sc.student_entropy[resp].sum())
            diff = (sc.student_log_probs[resp].detach() - torch.tensor(d["logprobs"][i], dtype=torch.float64)).abs()
            stats["diff_sum"] += float(diff.sum())
            stats["diff_max"] = max(stats["diff_max"], float(diff.max()))
        l_t = torch.stack([torch.nn.functional.pad(r, (0, W - len(r))) for r in rows_l])
        traj_kl = traj_w = None
        if variant == "topd":
            kls = []
            for i in range(3):
                ids = d["g_tokens"][i, : d["g_lengths"][i]]
                s = logits(student, ids)
                with torch.no_grad():
                    t = logits(teacher, ids)
                kls.append(vocab_parallel_kl(s, t, direction="forward", vocab_size=SPEC.vocab_size))
            gw = d["g_weights"].shape[1]
            traj_kl = torch.stack([torch.nn.functional.pad(k, (0, gw - len(k))) for k in kls])
            traj_w = d["g_weights"].double()
        loss, metrics = topd_loss(l_t, d["token_weights"].double(), mask, variant=variant, lambda_traj=LAMBDA,
                                  traj_kl=traj_kl, traj_weights=traj_w)
        loss.backward()
        n = int(mask.sum())
        out[variant] = {
            "loss": float(loss), "opd_loss": metrics["opd_loss"], "traj_loss": metrics["traj_loss"],
            "mean_token_kl": float(l_t[mask].sum()) / n, "entropy": stats["entropy"] / n,
            "logprob_diff_mean": stats["diff_sum"] / n, "logprob_diff_max": stats["diff_max"],
            "grads": {k: p.grad.detach().clone() for k, p in unwrap(student).named_parameters()},
        }
    return out


def parallel_step(root: str, tp: int, pp: int, out_root: str, **knobs) -> dict:
    """One SGD step (lr=1, no clipping: the update is minus the gradient) per variant through the real data path."""
    from megatron.core import parallel_state as ps

    from megatron_topd import parallel
    from megatron_topd.checkpointing import load_model_weights, save_checkpoint
    from megatron_topd.config import ParallelConfig
    from megatron_topd.models import build_gpt_model
    from megatron_topd.train.batches import guidance_microbatches, rollout_microbatches, windows_per_row
    from megatron_topd.train.distill_step import distill_step
    from megatron_topd.rollout.step_batch import StepBatch
    from megatron_topd.train.handoffs import GuidanceRows
    from megatron_topd.train.loop import replica_rows
    from megatron_topd.train.objective import ObjectiveScales
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp
    from megatron_topd.train.teacher import ColocatedTeacher

    layout = parallel.initialize(tp, pp, seed=3)
    overrides = ParallelConfig(tensor_parallel=tp, pipeline_parallel=pp, **knobs).model_overrides()
    teacher_model = build_gpt_model(SPEC, **overrides)
    load_model_weights(f"{root}/teacher/step_00000000", [teacher_model])
    teacher = ColocatedTeacher([teacher_model])
    d = data()
    batch = StepBatch.from_rows(d["prompts"], d["responses"], d["logprobs"], ["stop"] * 6, ["0"] * 6, {})
    rows = replica_rows(batch, layout)
    mine = [d["prompts"].index(p) for p in rows.prompts]  # prompts are distinct
    out = {}
    for variant in RUN_VARIANTS:
        student = [wrap_ddp(build_gpt_model(SPEC, **overrides), use_distributed_optimizer=False)]
        load_model_weights(f"{root}/student/step_00000000", student)
        sgd = OptimConfig(optimizer="sgd", lr=1.0, clip_grad=0.0, use_distributed_optimizer=False)
        sgd.validate()
        optimizer, scheduler = build_optimizer(student, sgd)
        windows = 0
        if variant == "topd_shared_prefix":  # as the loop does it: each replica carries its own rows' windows
            here = [w for w in range(3) if d["g_row"][w] in mine]
            guidance = GuidanceRows(tokens=d["g_tokens"][here], lengths=d["g_lengths"][here],
                                    window_start=d["g_start"][here], logit_weights=d["g_weights"][here],
                                    row=torch.tensor([mine.index(d["g_row"][w]) for w in here], dtype=torch.long))
            per_row, rest = windows_per_row(guidance, rows, BUDGET)
            assert rest == ([here.index(2)] if 2 in here else []), "the long window goes as a row of its own"
            batches = rollout_microbatches(rows, BUDGET, 0, token_weights=d["token_weights"][mine],
                                           guidance=guidance, windows=per_row)
            batches += guidance_microbatches(guidance.tokens[rest], guidance.lengths[rest],
                                             guidance.logit_weights[rest], BUDGET, 0) if rest else []
            windows = len(here)
        else:
            batches = rollout_microbatches(rows, BUDGET, 0, token_weights=d["token_weights"][mine])
        if variant == "topd":
            share = [i for i in range(3) if i % layout.data_parallel == layout.dp_rank]
            windows = len(share)
            batches += guidance_microbatches(d["g_tokens"][share], d["g_lengths"][share], d["g_weights"][share],
                                             BUDGET, 0)
        assert len({b["tokens"].shape for b in batches}) > 1, "microbatches of several shapes"
        n_tokens = sum(len(r) for r in d["responses"])
        is_topd = variant.startswith("topd")
        scales = ObjectiveScales(dp_size=layout.data_parallel, global_tokens=n_tokens,
                                 global_windows=3 if is_topd else 0,
                                 lambda_traj=LAMBDA if is_topd else 0.0, variant="topd" if is_topd else variant)
        result = distill_step(student, optimizer, scheduler, teacher, batches, scales, group_size=GROUP,
                              vocab_size=SPEC.vocab_size, chunk_size=16)
        save_checkpoint(f"{out_root}/{variant}", 1, student)
        s = result.metrics
        out[variant] = {"loss": result.loss, "opd_loss": s["opd_loss"], "traj_loss": s["traj_loss"],
                        "mean_token_kl": s["kl_sum"] / s["tokens"], "entropy": s["entropy_sum"] / s["tokens"],
                        "logprob_diff_mean": s["logprob_diff_sum"] / s["logprob_diff_count"],
                        "logprob_diff_max": s["logprob_diff_max"], "tokens": s["tokens"], "windows_local": windows,
                        "skipped": result.skipped, "pp_rank": ps.get_pipeline_model_parallel_rank()}
    return out


def updates_via_checkpoint(root: str, out_roots: list[str]) -> list[dict]:
    """Per run and variant: initial minus updated full parameters (= the gradient, for SGD at lr=1)."""
    from megatron_topd import parallel
    from megatron_topd.checkpointing import load_model_weights, unwrap
    from megatron_topd.models import build_gpt_model

    parallel.initialize(1, 1, seed=1)
    model = build_gpt_model(SPEC)
    load_model_weights(f"{root}/student/step_00000000", [model])
    init = {k: p.detach().clone() for k, p in unwrap(model).named_parameters()}
    out = []
    for r in out_roots:
        per_variant = {}
        for variant in RUN_VARIANTS:
            load_model_weights(f"{r}/{variant}/step_00000001", [model])
            per_variant[variant] = {k: init[k] - p.detach() for k, p in unwrap(model).named_parameters()}
        out.append(per_variant)
    return out
