"""Step metrics: a console line with a progress bar (rich), TensorBoard scalars, optional W&B, a JSONL log, and a PNG
plot of the paper's diagnostics at the end. Only rank 0 writes."""
from __future__ import annotations

import json
import os
from pathlib import Path

PLOTTED = ("heldout_accuracy", "loss", "opd_loss", "traj_loss", "mean_token_kl", "low_divergence_share",
           "mean_ot_distance")


class MetricsLogger:
    def __init__(self, out_dir: str | Path, *, enabled: bool, total_steps: int, start_step: int = 0,
                 wandb_project: str | None = None, config=None):
        self.enabled = enabled
        self.out = Path(out_dir)
        self.rows: list[dict] = []
        if not enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
        from torch.utils.tensorboard import SummaryWriter

        resume_run_dir(self.out, start_step)
        self.writer = SummaryWriter(str(self.out / "tensorboard"))
        self.jsonl = open(self.out / "metrics.jsonl", "a")
        self.progress = Progress(TextColumn("TOPD"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"))
        self.task = self.progress.add_task("", total=total_steps, completed=start_step)
        self.progress.start()
        self.wandb = None
        if wandb_project:
            import dataclasses

            import wandb

            # One W&B run per output directory: a resumed (requeued) job continues it instead of starting another.
            self.wandb = wandb.init(project=wandb_project, id=wandb_run_id(self.out), resume="allow",
                                    config=dataclasses.asdict(config) if config else None)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        for k, v in clean.items():
            self.writer.add_scalar(f"topd/{k}", v, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self.jsonl.flush()
        self.rows.append({"step": step, **clean})
        if self.wandb is not None:
            self.wandb.log(clean, step=step)
        self.progress.update(self.task, completed=step, description=(
            f"loss {clean.get('loss', 0):.4f}  l_t {clean.get('mean_token_kl', 0):.4f}  "
            f"L_traj {clean.get('traj_loss', 0):.4f}  low-div {clean.get('low_divergence_share', 0):.2f}  "
            f"OT {clean.get('mean_ot_distance', 0):.3f}  {clean.get('step_s', 0):.1f}s/step"))
        self.progress.console.log(f"step {step}: " + "  ".join(f"{k}={clean[k]:.4g}" for k in PLOTTED if k in clean))

    def close(self) -> None:
        if not self.enabled:
            return
        self.progress.stop()
        self.writer.close()
        self.jsonl.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.rows:
            plot_metrics(self.rows, self.out / "metrics.png")


def resume_run_dir(out: Path, start_step: int) -> None:
    """Make the run directory match the checkpoint the run starts from (`start_step` steps done).

    Steps after the checkpoint are about to run again: their metrics.jsonl lines and rollout record files, written by
    an attempt that was stopped before its next checkpoint, go, so a resumed run ends with exactly the lines and files
    of an uninterrupted one.
    """
    from megatron_topd.rollout.records import discard_after

    path = out / "metrics.jsonl"
    if path.exists():
        kept = [line for line in path.read_text().splitlines(keepends=True)
                if line.strip() and line.endswith("\n") and json.loads(line)["step"] <= start_step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, path)
    discard_after(out / "rollouts", start_step)


def wandb_run_id(out: Path) -> str:
    """The W&B run id of this output directory (created once, kept in `wandb_run_id.txt`)."""
    path = out / "wandb_run_id.txt"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:16])
    return path.read_text().strip()


def plot_metrics(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in PLOTTED if any(k in r for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for ax, key in zip(axes if len(keys) > 1 else [axes], keys):
        steps = [r["step"] for r in rows if key in r]
        ax.plot(steps, [r[key] for r in rows if key in r], marker="o" if len(steps) <= 30 else None)
        if key == "heldout_accuracy":  # the teacher's accuracy is the ceiling the student climbs towards
            teacher = [r["teacher_heldout_accuracy"] for r in rows if "teacher_heldout_accuracy" in r]
            if teacher:
                ax.axhline(teacher[-1], color="gray", linestyle="--", label="teacher")
                ax.legend(loc="lower right", fontsize=7)
        ax.set_title(key)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def step_metrics(result, stats, batch, probe, timings: dict, step_s: float) -> dict:
    """Everything a step logs (the same on every rank): objective, per-token statistics, rollout shape, speed.

    ``result`` the training pass's `StepResult`, ``stats`` its `PassStats`, ``batch`` the `StepBatch`, ``probe`` the
    `ProbeOutcome` (train/handoffs.py)."""
    from dataclasses import asdict

    s = result.metrics
    tokens = max(s.get("tokens", 0.0), 1.0)
    lengths = batch.response_lengths.tolist()
    versions = batch.weight_versions
    return {
        "loss": result.loss, "opd_loss": s["opd_loss"], "traj_loss": s["traj_loss"], "grad_norm": result.grad_norm,
        "lr": result.lr, "skipped": float(result.skipped),
        "mean_token_kl": s["kl_sum"] / tokens, "student_entropy": s["entropy_sum"] / tokens,
        "logprob_diff_mean": s["logprob_diff_sum"] / max(s["logprob_diff_count"], 1.0),
        "logprob_diff_max": s["logprob_diff_max"],
        "response_len_mean": sum(lengths) / len(lengths), "response_len_max": float(max(lengths)),
        "truncation_rate": sum(f == "length" for f in batch.finish_reasons) / len(lengths),
        **asdict(stats), **probe_metrics(probe), **timings, "step_s": step_s,
        "train_tokens_per_s": stats.train_tokens / max(timings["train_s"], 1e-9),
        "response_tokens_per_s": stats.response_tokens / max(step_s, 1e-9),
        "peak_mem_gb": peak_memory_gb(),
        "rollout_weight_version": max((float(v) for v in versions if v.isdigit()), default=-1.0),
        "rollout_staleness": batch.staleness,
        "step_batch_mb": batch.nbytes / 2**20,  # the rollouts' tensors every rank received
    }


def sync_metrics(stats) -> dict:
    """A weight sync's volume (its seconds are the step's sync_s): `sync_mb` in all, and `sync_stage{p}_mb` per
    pipeline stage when each stage pushed its own layers."""
    per_stage = {f"sync_stage{p}_mb": b / 2**20 for p, b in enumerate(stats.stage_bytes or [])}
    return {"sync_mb": stats.num_bytes / 2**20, **per_stage}


def probe_metrics(p) -> dict:
    """The paper's diagnostics of a `ProbeOutcome`, summed over data-parallel replicas, and the OT distances'
    quantiles and the mean OT of the suppressed / kept candidates over the whole batch (for calibrating
    topd.threshold; 0.0 without a probe). A collective over the data-parallel group."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_topd import parallel
    from megatron_topd.topd.weights import OT_STAT_KEYS

    t = torch.tensor([p.n_candidates, p.n_divergent, p.ot_sum], dtype=torch.float64, device=parallel.device())
    dist.all_reduce(t, group=ps.get_data_parallel_group())
    n, div, ot_sum = t.cpu().tolist()
    stats = p.ot_stats or {}
    return {"candidates": n, "divergent": div, "low_divergence_share": (n - div) / n if n else 0.0,
            "mean_ot_distance": ot_sum / n if n else 0.0, **{k: float(stats.get(k, 0.0)) for k in OT_STAT_KEYS}}


def peak_memory_gb() -> float:
    """The largest peak over all ranks: allocated CUDA memory on GPUs, the process's peak RSS on CPU."""
    import torch
    import torch.distributed as dist

    from megatron_topd import parallel

    if torch.cuda.is_available():
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    t = torch.tensor([peak], dtype=torch.float64, device=parallel.device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
