"""Memory planning for TOPD runs: what one GPU holds at a layout, and which layout of a cluster fits and runs fastest.

    from megatron_topd.plan import predict_memory
    plan = predict_memory(cfg, student_spec, teacher_spec, gpu_mem_gb=80, data_parallel=2)
    plan.fits, plan.peak_bytes, plan.worst.terms, plan.why_not()

`tools/plan_layout.py` is the command line; docs/planning.md explains every term and shows plans for real models.
"""
from megatron_topd.plan.fixtures import known_models, load_spec
from megatron_topd.plan.layout import Layout
from megatron_topd.plan.predict import TERMS, Plan, StageMemory, predict_layout, predict_memory
from megatron_topd.plan.search import Choice, Problem, choose

__all__ = ["TERMS", "Choice", "Layout", "Plan", "Problem", "StageMemory", "choose", "known_models", "load_spec",
           "predict_layout", "predict_memory"]
