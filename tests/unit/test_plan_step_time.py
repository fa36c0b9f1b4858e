"""The step-time model's structure (plan/step_time.py): what each phase counts, on the H100 and the CPU profiles.
Its figures against a measured step are benchmarks/bench_step_time_model.py's (docs/planning.md)."""
from dataclasses import replace

import pytest

from megatron_topd.plan import Layout, load_spec
from megatron_topd.plan.devices import CPU_2CORE, H100
from megatron_topd.plan.model_state import total_params
from megatron_topd.plan.speed import forward_flops_per_token, trainer_mfu
from megatron_topd.plan.step_time import TopdStep, step_time

SPEC = load_spec("Llama-3.1-8B")
LAYOUT = Layout(tp=8, dp=2, max_tokens_per_microbatch=16384, teacher_group_microbatches=8)

TINY = replace(SPEC, num_layers=2, hidden_size=96, ffn_hidden_size=256, num_attention_heads=4, num_kv_heads=4,
               vocab_size=128, head_dim=24)
CPU_LIKE = replace(CPU_2CORE, server_light_call_s=2e-3, weight_update_call_s=5e-3, weight_sync_rest_s=3e-3,
                   collective_latency_s=1e-3, inter_node_bytes_per_s=1e9,
                   weight_load_bytes_per_s=2e9, checkpoint_call_s=1.0, checkpoint_layer_s=0.1,
                   filesystem_bytes_per_s=1e9)


def _est(step=TopdStep(), device=H100, layout=LAYOUT, teacher=SPEC):
    return step_time(SPEC, teacher, layout, step, seq=16384, microbatches_per_step=16, device=device)


def test_windows_are_the_slower_server_and_every_phase_counts():
    est = _est()
    assert set(est.phases) == {"generation", "scoring", "windows", "ot", "training", "weight_sync", "checkpoint"}
    assert est.phases["windows"] == max(est.detail["teacher_windows"], est.detail["student_windows"])
    assert all(v > 0 for v in est.phases.values())
    assert "scoring" not in _est(replace(TopdStep(), variant="opd")).phases


def test_decode_steps_follow_the_longest_response_of_a_wave():
    same_mean = [_est(replace(TopdStep(), longest_response=n)).phases["generation"] for n in (8000, 16000)]
    step_s = 2 * total_params(SPEC) / (8 * H100.memory_bytes_per_s * H100.decode_efficiency)  # bf16 weights, TP8
    assert same_mean[1] - same_mean[0] == pytest.approx(8000 * step_s, rel=1e-3)  # 8000 more steps, same tokens
    # a KV pool too small for every rollout at once adds waves
    assert _est(replace(TopdStep(), server_kv_tokens=4 * 16384)).phases["generation"] > 4 * same_mean[1]


def test_gpu_training_pass_is_flops_at_the_layouts_utilisation():
    step = replace(TopdStep(), variant="opd")
    tokens = step.rows * step.row_tokens
    flops = tokens * forward_flops_per_token(SPEC, 16384) * (3 + 1)  # student fwd + bwd, the teacher's forward
    bubble = 1 + 0 / 8  # PP1
    expected = flops * bubble / (LAYOUT.gpus * H100.flops * trainer_mfu(LAYOUT))
    assert _est(step).phases["training"] == pytest.approx(expected)


def test_cpu_costs_are_per_call():
    step = TopdStep(rows=64, prompt_tokens=11, response_tokens=40, longest_response=48, window=8, student_servers=1,
                    decode_batch=64, server_kv_tokens=4096, guidance_layout="shared_prefix", dtype_bytes=4)
    layout = Layout(tp=2, max_tokens_per_microbatch=1024, teacher_group_microbatches=2)
    est = step_time(TINY, TINY, layout, step, seq=128, microbatches_per_step=4, gpus_per_node=1, device=CPU_2CORE)
    deeper = step_time(replace(TINY, num_layers=4), TINY, layout, step, seq=128, microbatches_per_step=4,
                       gpus_per_node=1, device=CPU_2CORE)
    per_layer = CPU_2CORE.layer_forward_s + 2 * CPU_2CORE.collective_latency_s
    # two more student layers: their forward calls in each of the scoring pass's 4 microbatches, at least
    assert deeper.phases["scoring"] - est.phases["scoring"] >= 4 * 2 * per_layer
    # decode: the step overhead per decode step (48 steps, one wave) plus each generated token's share
    decode = 48 * CPU_2CORE.decode_step_overhead_s + 64 * 40 * CPU_2CORE.decode_seq_step_s
    assert est.phases["generation"] == pytest.approx(decode + 64 * CPU_2CORE.prefill_request_s, rel=0.05)


def test_weight_sync_counts_its_light_calls_buckets_tensors_and_bytes():
    """5 admin round trips, 3 object collectives (2 collectives each) and a sync's rest; per stage its TP gathers
    (QKV, projection, FC1, FC2 per layer; the embedding and output layer at the ends); then every stage's buckets,
    each an update call, its broadcast and the server's load of its bytes."""
    step = TopdStep(rows=64, student_servers=1, sync_bucket_mb=0.1, dtype_bytes=4)
    weight_bytes = 4 * total_params(TINY)
    for pp, gathers in ((1, 4 * 2 + 2), (2, 4 + 1)):
        layout = Layout(tp=2, pp=pp, max_tokens_per_microbatch=1024, teacher_group_microbatches=2)
        est = step_time(TINY, None, layout, step, seq=128, microbatches_per_step=4, gpus_per_node=1, device=CPU_LIKE)
        buckets = pp * -(-weight_bytes // pp // int(0.1 * 2**20))
        expected = (5 * 2e-3 + 3e-3 + (6 + gathers) * 1e-3 + buckets * 5e-3
                    + weight_bytes / 1e9 + weight_bytes / 2e9)
        assert est.phases["weight_sync"] == pytest.approx(expected)


def test_checkpoint_is_a_saves_costs_amortised():
    step = TopdStep(rows=64, student_servers=1, save_interval=20, dtype_bytes=4)
    layout = Layout(tp=2, max_tokens_per_microbatch=1024, teacher_group_microbatches=2)
    est = step_time(TINY, None, layout, step, seq=128, microbatches_per_step=4, gpus_per_node=1, device=CPU_LIKE)
    save = 1.0 + 2 * 0.1 + total_params(TINY) * (4 + 8) / 1e9  # fp32 weights: no main copy; Adam m and v
    assert est.phases["checkpoint"] == pytest.approx(save / 20)


def test_backward_splits_over_tp_at_its_own_speed_up():
    """Only the backward's share moves with tp_backward_speedup (the teacher's forward and the student's forward
    do not)."""
    step = replace(TopdStep(), variant="opd")
    even, none = (_est(step, device=replace(H100, tp_backward_speedup=s)).phases["training"] for s in (2.0, 1.0))
    backward = step.rows * step.row_tokens * forward_flops_per_token(SPEC, 16384) * H100.backward_ratio
    per_rank_rate = LAYOUT.dp * H100.flops * trainer_mfu(LAYOUT)
    assert none - even == pytest.approx(backward * (1 - 1 / 8) / per_rank_rate)  # TP8: 3 doublings


def test_scoring_takes_the_rollout_microbatches_the_trainer_packs():
    """Rows of unequal length pack into more microbatches than the mean row (train/batches.py pack_rows keeps
    padding within 10%); a step that states its count is charged per microbatch of that count. Per-call costs
    only (no FLOPs, no bytes): each microbatch pays each model's pass outside its layers, its layers and its
    all-reduces; each group of 2 microbatches one schedule call per model."""
    calls_only = replace(CPU_LIKE, flops=float("inf"), model_forward_token_s=0.0, collective_bytes_per_s=float("inf"),
                         model_forward_s=1e-3, layer_forward_s=2e-3, collective_latency_s=0.5e-3,
                         schedule_call_s=4e-3)
    layout = Layout(tp=2, max_tokens_per_microbatch=1024, teacher_group_microbatches=2)
    step = TopdStep(rows=64, prompt_tokens=10, response_tokens=43, longest_response=46, window=8,
                    student_servers=1, decode_batch=64, guidance_layout="shared_prefix", dtype_bytes=4)

    def scoring(s):
        return step_time(TINY, TINY, layout, s, seq=128, microbatches_per_step=1, gpus_per_node=1,
                         device=calls_only).phases["scoring"]

    # TINY: 2 layers; the student's pass: 2 x 2 layer all-reduces, the embedding's, the loss call's 2; the
    # teacher's the same less the loss call's
    per_mb = (1e-3 + 2 * 2e-3 + (5 + 2) * 0.5e-3) + (1e-3 + 2 * 2e-3 + 5 * 0.5e-3)
    assert scoring(step) == pytest.approx(4 * per_mb + 2 * 2 * 4e-3)  # 64 rows of 53 tokens: 18 per microbatch
    assert scoring(replace(step, rollout_microbatches=5)) == pytest.approx(5 * per_mb + 2 * 3 * 4e-3)


def test_ot_splits_its_pairs_over_tp_at_its_own_speed_up():
    """OT: every window pair's costs and solve, dealt over the TP ranks at the device's `ot_tp_speedup` per TP
    doubling (not the layers' `tp_speedup`), and the split's two all-reduces (the embedding lookup's, the
    distances')."""
    layout = Layout(tp=2, max_tokens_per_microbatch=1024, teacher_group_microbatches=2)
    step = TopdStep(rows=64, prompt_tokens=10, response_tokens=43, window=8, student_servers=1, dtype_bytes=4)
    device = replace(CPU_LIKE, ot_seconds_per_window=40e-6, ot_tp_speedup=1.25, tp_speedup=2.0,
                     collective_latency_s=1e-3)
    est = step_time(TINY, TINY, layout, step, seq=128, microbatches_per_step=1, gpus_per_node=1, device=device)
    assert est.phases["ot"] == pytest.approx(64 * 3 * 40e-6 / 1.25 + 2 * 1e-3)  # 192 windows
