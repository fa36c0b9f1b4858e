"""Peak extra memory per rank of one TOPD training pass, old data path vs new, side by side in one run (issue 9).

TP=2 over gloo on CPU, tiny layers (hidden 64, 2 layers) and the real vocabulary size V=151936 (Qwen), so the
logit-sized buffers ([rows, S, V/TP]) dominate exactly as they do at scale. Each (path, case) runs in fresh rank
processes; the figure is the process's peak RSS (ru_maxrss) minus its RSS right before the pass, the larger of the
two ranks. bf16 parameters and logits (as at scale). Rows: lengths log-uniform in [16, max length], one row at the
maximum; 2 guidance rows of prefix + 16 tokens per rank.

- old: the path as it was at the start of issue 9 (commit a122847): every row padded to the step's longest, one row
  per microbatch, the scoring pass keeps every teacher logit shard for the whole step, `F.pad` copies them for the
  training pass, guidance rows are padded to the step width and their KL runs at every position.
- new: `train.batches` token-budget microbatches (budget = the max length, as the example configs set
  train.max_tokens_per_microbatch = train.max_seq_length), `score_rollouts` keeping per-token scalars only,
  `distill_step` with the teacher over groups of G=2 microbatches and the guidance KL at weighted positions only.

    .venv/bin/python benchmarks/bench_step_memory.py                  # the three cases of the issue
    .venv/bin/python benchmarks/bench_step_memory.py --cases 8x512     # one case
"""
from __future__ import annotations

import argparse
import math
import resource

import torch

V = 151936
GROUP = 2


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _lengths(rows: int, max_len: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(rows, generator=g)
    lengths = torch.exp(math.log(16) + u * (math.log(max_len) - math.log(16))).long().clamp(16, max_len).tolist()
    lengths[0] = max_len
    return lengths


def _setup(rows: int, max_len: int):
    from megatron_topd import parallel
    from megatron_topd.models import ModelSpec, PrecisionConfig, build_gpt_model
    from megatron_topd.train.handoffs import RolloutRows
    from megatron_topd.train.optim import OptimConfig, build_optimizer, wrap_ddp

    parallel.initialize(2, 1, seed=0)
    spec = ModelSpec(vocab_size=V, hidden_size=64, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                     ffn_hidden_size=128, max_position_embeddings=4096)
    prec = PrecisionConfig(params_dtype="bf16")
    student = [wrap_ddp(build_gpt_model(spec, precision=prec))]
    optimizer, scheduler = build_optimizer(student, OptimConfig(lr=1e-5), params_dtype=torch.bfloat16)
    teacher = build_gpt_model(spec, precision=prec).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(1)
    prompts, responses = [], []
    for n in _lengths(rows, max_len):
        prompts.append(torch.randint(0, V, (8,), generator=g).tolist())
        responses.append(torch.randint(0, V, (n - 8,), generator=g).tolist())
    guidance = [torch.randint(0, V, (n,), generator=g) for n in (max_len // 2 + 16, max_len // 4 + 16)]
    return spec, student, optimizer, scheduler, teacher, RolloutRows(prompts, responses), guidance


def _old_pass(spec, student, optimizer, scheduler, teacher, rows, guidance):
    """The data path of commit a122847, reproduced with today's primitives (same schedule, same KL kernel)."""
    from megatron_topd import parallel
    from megatron_topd.losses import vocab_parallel_kl
    from megatron_topd.train.step import run_schedule

    group = parallel.tensor_parallel_group()
    tokens, mask = rows.padded(0)
    seq = math.ceil(tokens.shape[1] / 8) * 8
    tokens = torch.nn.functional.pad(tokens, (0, seq - tokens.shape[1]))
    mask = torch.nn.functional.pad(mask, (0, seq - mask.shape[1]))
    pos = torch.arange(seq).unsqueeze(0)
    batches = [{"kind": "rollout", "tokens": tokens[i : i + 1], "response_mask": mask[i : i + 1], "position_ids": pos}
               for i in range(tokens.shape[0])]

    def forward(chunks, bs):
        stash = []

        def keep(logits, batch):
            stash.append(logits.detach())
            return logits.new_zeros(()), {}

        with torch.no_grad():
            run_schedule(chunks, bs, keep, forward_only=True)
        return stash

    t_logits = forward([teacher], batches)  # the scoring pass: every teacher shard, kept for the step
    it = iter(t_logits)

    def score(logits, batch):
        vocab_parallel_kl(logits[:, :-1], next(it)[:, :-1], group=group, vocab_size=V, chunk_size=1024)
        return logits.new_zeros(()), {}

    with torch.no_grad():
        run_schedule(student, batches, score, forward_only=True)
    g_tokens = torch.zeros(len(guidance), seq, dtype=torch.long)
    g_weights = torch.zeros(len(guidance), seq)
    for i, row in enumerate(guidance):
        g_tokens[i, : len(row)] = row
        g_weights[i, len(row) - 17 : len(row) - 1] = 1 / 16
    g_batches = [{"kind": "guidance", "tokens": g_tokens[i : i + 1], "logit_weights": g_weights[i : i + 1],
                  "position_ids": pos} for i in range(len(guidance))]
    train_teacher = [torch.nn.functional.pad(t, (0, 0, 0, seq - t.shape[1])) for t in t_logits]  # the F.pad copies
    train_teacher += forward([teacher], g_batches)
    it = iter(train_teacher)

    def loss_fn(logits, batch):
        t = next(it)
        if batch["kind"] == "rollout":
            kl = vocab_parallel_kl(logits[:, :-1], t[:, :-1], group=group, vocab_size=V, chunk_size=1024)
            return torch.where(batch["response_mask"][:, 1:], kl, torch.zeros_like(kl)).sum() * 1e-3, {}
        kl = vocab_parallel_kl(logits, t, direction="forward", group=group, vocab_size=V, chunk_size=1024)
        return (kl * batch["logit_weights"]).sum(), {}

    for c in student:
        c.zero_grad_buffer()
    run_schedule(student, batches + g_batches, loss_fn, forward_only=False)
    optimizer.step()


def _new_pass(spec, student, optimizer, scheduler, teacher, rows, guidance):
    from megatron_topd.train.batches import guidance_microbatches, rollout_microbatches
    from megatron_topd.train.distill_step import distill_step
    from megatron_topd.train.objective import ObjectiveScales
    from megatron_topd.train.scoring import score_rollouts
    from megatron_topd.train.teacher import ColocatedTeacher

    colocated = ColocatedTeacher([teacher])
    budget = max(rows.lengths())
    batches = rollout_microbatches(rows, budget, 0)
    score_rollouts(student, colocated, batches, rows=len(rows), width=max(rows.lengths()), group_size=GROUP,
                   vocab_size=V, chunk_size=1024)
    width = max(len(r) for r in guidance)
    g_tokens = torch.zeros(len(guidance), width, dtype=torch.long)
    g_weights = torch.zeros(len(guidance), width)
    for i, row in enumerate(guidance):
        g_tokens[i, : len(row)] = row
        g_weights[i, len(row) - 17 : len(row) - 1] = 1 / 16
    batches += guidance_microbatches(g_tokens, torch.tensor([len(r) for r in guidance]), g_weights, budget, 0)
    scales = ObjectiveScales(dp_size=1, global_tokens=sum(len(r) for r in rows.responses),
                             global_windows=len(guidance), lambda_traj=1.0, variant="topd")
    distill_step(student, optimizer, scheduler, colocated, batches, scales, group_size=GROUP, vocab_size=V,
                 chunk_size=1024)
    return batches


def measure(path: str, rows: int, max_len: int) -> dict:
    state = _setup(rows, max_len)
    before = _rss_mib()
    out = {}
    if path == "old":
        _old_pass(*state)
        seq = math.ceil(max_len / 8) * 8
        out["padding_fraction"] = 1 - sum(state[5].lengths()) / (rows * seq)
    else:
        from megatron_topd.train.batches import padding_fraction

        batches = _new_pass(*state)
        real, padded = padding_fraction([b for b in batches if b["kind"] == "rollout"])
        out["padding_fraction"] = 1 - real / padded
    out["peak_extra_mib"] = _peak_mib() - before
    return out


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    from megatron_topd.parallel.spawn import run_on_ranks

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["8x512", "32x512", "8x2048"], help="ROWSxMAXLEN")
    args = parser.parse_args()
    table = Table(title="Peak extra memory per rank, one TOPD training pass (TP=2, CPU, V=151936, bf16)")
    for col in ("rollouts x max len", "old MiB", "new MiB", "old/new", "old padding", "new padding"):
        table.add_column(col, justify="right")
    results = {}
    for case in args.cases:
        rows, max_len = (int(x) for x in case.split("x"))
        res = {p: run_on_ranks(measure, 2, p, rows, max_len, timeout=1800) for p in ("old", "new")}
        peak = {p: max(r["peak_extra_mib"] for r in res[p]) for p in res}
        results[case] = peak
        table.add_row(case, f"{peak['old']:.0f}", f"{peak['new']:.0f}", f"{peak['old'] / max(peak['new'], 1):.1f}x",
                      f"{res['old'][0]['padding_fraction']:.1%}", f"{res['new'][0]['padding_fraction']:.1%}")
        print(case, peak, flush=True)
    Console().print(table)
    if "8x512" in results and "32x512" in results:
        for p in ("old", "new"):
            print(f"{p}: 8 -> 32 rollouts at 512 tokens grows the peak {results['32x512'][p] / results['8x512'][p]:.2f}x")


if __name__ == "__main__":
    main()
