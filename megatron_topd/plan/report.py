"""Plans for people (rich tables) and for machines (one JSON document the launcher reads)."""
from __future__ import annotations

from megatron_topd.plan.predict import TERMS, Plan
from megatron_topd.plan.rollout import kv_bytes_per_token, server_budget
from megatron_topd.plan.search import Choice, Problem
from megatron_topd.plan.units import GB


def plan_table(plan: Plan, title: str):
    from rich.table import Table

    table = Table(title=title, caption="L: layers, mb: microbatches in flight")
    table.add_column("GB per GPU", no_wrap=True)
    for s in plan.stages:
        table.add_column(f"stage {s.stage}\n{s.layers} L, {s.in_flight} mb", justify="right", no_wrap=True)
    for term in TERMS:
        if any(s.terms.get(term) for s in plan.stages):
            table.add_row(term, *(f"{s.terms[term] / GB:.1f}" for s in plan.stages))
    table.add_row("[bold]total[/bold]", *(f"[bold]{s.total / GB:.1f}[/bold]" for s in plan.stages))
    return table


def phases_table(p: Problem, plan: Plan):
    from rich.table import Table

    est = p.phases(plan)
    table = Table(title=f"one TOPD step, estimated (plan/step_time.py): {est.total / 60:.1f} min")
    for name in ("phase", "seconds", "share"):
        table.add_column(name, justify="left" if name == "phase" else "right", no_wrap=True)
    for name, seconds in est.phases.items():
        table.add_row(name, f"{seconds:.1f}", f"{seconds / est.total:.0%}")
        for part, part_s in est.detail.items() if name == "windows" else ():  # asked at once: the slower counts
            table.add_row(f"  {part}", f"{part_s:.1f}", "")
    return table


def rollout_dict(p: Problem) -> dict:
    out = {"student": {"kv_mib_per_token": round(kv_bytes_per_token(p.student) / 2**20, 4),
                       "kv_tb_per_step": round(p.rollouts_per_step * p.seq * kv_bytes_per_token(p.student) / 1e12, 3),
                       **server_budget(p.student, gpus_per_node=p.gpus_per_node, gpu_mem_gb=p.gpu_mem_gb).to_dict()}}
    if p.teacher is not None:
        out["teacher"] = {"kv_mib_per_token": round(kv_bytes_per_token(p.teacher) / 2**20, 4),
                          **server_budget(p.teacher, gpus_per_node=p.gpus_per_node, gpu_mem_gb=p.gpu_mem_gb).to_dict()}
    return out


def choice_dict(p: Problem, choice: Choice, given: Plan | None = None) -> dict:
    out = {
        "nodes": choice.nodes,
        "fits": choice.best is not None,
        "note": choice.note,
        "overrides": choice.best.layout.overrides() if choice.best else None,
        "plan": choice.best.to_dict() if choice.best else None,
        "step_seconds_estimate": round(p.seconds(choice.best), 2) if choice.best else None,
        "step_phases_seconds": ({k: round(v, 2) for k, v in {**p.phases(choice.best).phases,
                                                             **p.phases(choice.best).detail}.items()}
                                if choice.best else None),
        "alternatives": [{"layout": a.layout.short(), "peak_gb": round(a.peak_bytes / GB, 1),
                          "step_seconds_estimate": round(p.seconds(a), 2)} for a in choice.alternatives],
        "layouts_considered": choice.considered,
        "layouts_fitting": choice.fitting,
        "rollout": rollout_dict(p),
        "assumptions": {"gpu_mem_gb": p.gpu_mem_gb, "gpus_per_node": p.gpus_per_node, "margin": p.margin,
                        "seq": p.seq, "rollouts_per_step": p.rollouts_per_step, "fp8": p.fp8,
                        "activation_profile": "te_flash", "loss_chunk": p.loss_chunk},
    }
    if given is not None:
        out["given"] = given.to_dict()
    return out


def print_choice(p: Problem, choice: Choice, given: Plan | None = None, given_title: str = "") -> None:
    from rich.console import Console

    console = Console()
    if given is not None:
        verdict = "[green]fits[/green]" if given.fits else "[red]does NOT fit[/red]"
        console.print(f"{given_title}: {given.layout.short()} {verdict}")
        if given.stages:
            console.print(plan_table(given, f"{given_title} (peak {given.peak_bytes / GB:.1f} GB)"))
        if not given.fits:
            console.print(f"[red]why:[/red] {given.why_not()}")
    r = rollout_dict(p)["student"]
    console.print(f"rollout KV cache: {r['kv_mib_per_token']} MiB/token, {r['kv_tb_per_step']} TB for "
                  f"{p.rollouts_per_step} x {p.seq} tokens; one node holds {r['kv_tokens_per_node']} tokens "
                  f"(server TP{r['server_tp']}, {r['kv_pool_per_gpu_gb']} GB KV pool per GPU)")
    console.print(f"nodes: {choice.nodes}")
    if choice.best is None:
        console.print(f"[red]no layout fits:[/red] {choice.note}")
        return
    best = choice.best
    console.print(f"[green]proposed[/green]: {best.layout.short()}  peak {best.peak_bytes / GB:.1f} GB of "
                  f"{p.gpu_mem_gb:.0f} GB (margin {p.margin:.0%}), training pass ~{p.seconds(best):.0f} s, "
                  f"{choice.fitting} of {choice.considered} layouts fit")
    console.print(plan_table(best, "proposed layout, per GPU"))
    console.print(phases_table(p, best))
    console.print("overrides: " + " ".join(f"{k}={'null' if v is None else str(v).lower() if isinstance(v, bool) else v}"
                                           for k, v in best.layout.overrides().items()))
