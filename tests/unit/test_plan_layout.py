"""Issue 12: the planner's arithmetic on real model shapes, its refusals, and the command line."""
import json
import subprocess
import sys

import pytest

from megatron_topd.config import Config
from megatron_topd.plan import Layout, load_spec, predict_layout, predict_memory
from megatron_topd.plan.activations import layer_activations
from megatron_topd.plan.grad_buffer import buffer_layout
from megatron_topd.plan.model_state import student_state, total_params
from megatron_topd.plan.param_shapes import ParamShape
from megatron_topd.plan.rollout import kv_bytes_per_token
from megatron_topd.plan.stages import microbatches_in_flight, stage_layers


def test_fixtures_have_the_published_sizes():
    sizes = {name: total_params(load_spec(name)) / 1e9 for name in
             ("Llama-3.1-8B", "Llama-3.1-70B", "Llama-3.1-405B", "Qwen3-4B", "Qwen3-30B-A3B", "Qwen2.5-72B")}
    for name, billions in {"Llama-3.1-8B": 8.0, "Llama-3.1-70B": 70.6, "Llama-3.1-405B": 405.9, "Qwen3-4B": 4.0,
                           "Qwen3-30B-A3B": 30.5, "Qwen2.5-72B": 72.7}.items():
        assert sizes[name] == pytest.approx(billions, rel=0.01), (name, sizes[name])


def test_stage_split_and_in_flight():
    assert stage_layers(126, 4, None, 30) == [32, 32, 32, 30]
    assert stage_layers(80, 4, 17, None) == [17, 21, 21, 21]
    assert [microbatches_in_flight(s, 4, 128) for s in range(4)] == [4, 3, 2, 1]
    assert microbatches_in_flight(0, 4, 2) == 2


def test_buffer_padding_and_shards():
    params = [ParamShape("a", (100,)), ParamShape("b", (10, 10))]  # laid out back to front: b at 0, a at 128
    buf = buffer_layout(params, dp=2)
    assert buf.ranges == ((128, 228), (0, 100)) and buf.numel == 256  # 64-aligned start, bucket padded to 256
    assert buf.shard_numel(2, 0) + buf.shard_numel(2, 1) == 200 and buf.shard_numel(2, 1) == 100


def test_issue_hand_numbers_for_70b():
    spec = load_spec("Llama-3.1-70B")
    state = student_state(spec, tp=8, pp=4, stage=0, layers=[20] * 4, dp=2, params_dtype="bf16", norm_dtype="bf16")
    assert (state.weights + state.gradients + state.optimizer) / 1e9 == pytest.approx(27, abs=1)  # "about 27 GB"
    act = layer_activations(spec, tp=8, sp=False, recompute="none").per_token * 16384 * 20
    assert act / 1e9 == pytest.approx(30.0, abs=0.5)  # "about 30 GB per 16k microbatch"
    assert kv_bytes_per_token(spec) / 2**20 == pytest.approx(0.3125)  # "about 0.31 MiB per token"
    sp = layer_activations(spec, tp=8, sp=True).per_token
    full = layer_activations(spec, tp=8, sp=True, recompute="full").per_token
    assert full < sp < layer_activations(spec, tp=8).per_token


def test_refusals_name_the_reason():
    student, teacher = load_spec("Qwen3-4B"), load_spec("Qwen3-30B-A3B")
    plan = predict_layout(student, teacher, Layout(tp=8, dp=1, max_tokens_per_microbatch=16384), seq=16384,
                          rows_per_step=256, gpu_mem_gb=80)
    assert not plan.fits and "4 KV heads" in plan.why_not()
    plan = predict_layout(teacher, None, Layout(tp=2, sp=False, max_tokens_per_microbatch=4096, placement="remote"),
                          seq=4096, rows_per_step=8, gpu_mem_gb=80)
    assert "sequence parallelism" in plan.why_not()


def test_predict_memory_from_a_config():
    cfg = Config()
    cfg.parallel.tensor_parallel, cfg.parallel.pipeline_parallel = 2, 2
    cfg.train.max_seq_length, cfg.train.max_tokens_per_microbatch = 4096, 8192
    spec = load_spec("Qwen3-8B")
    plan = predict_memory(cfg, spec, spec, gpu_mem_gb=80, data_parallel=2, profile="te_flash")
    assert len(plan.stages) == 2 and plan.valid
    last = plan.stages[-1].terms
    # G x tokens x V/TP x 4 B: the teacher's logit stash on the last stage only
    assert last["teacher_logits"] == cfg.train.teacher_group_microbatches * 8192 * (151936 // 2) * 4
    assert plan.stages[0].terms["teacher_logits"] == 0
    assert plan.peak_bytes == max(s.total for s in plan.stages)
    assert plan.stages[0].allocated == plan.stages[0].total - plan.stages[0].terms["runtime_reserve"]


def test_cli_refuses_the_70b_example_and_proposes_a_layout_that_fits(tmp_path):
    config = tmp_path / "topd_70b.yaml"  # the issue's layout: TP8 PP4 DP2, co-located teacher, 16k tokens
    config.write_text("parallel: {tensor_parallel: 8, pipeline_parallel: 4}\n"
                      "train: {prompts_per_step: 64, max_seq_length: 16384, max_tokens_per_microbatch: 16384}\n"
                      "teacher: {placement: colocated}\nrollout: {n_samples: 4}\n")
    out = subprocess.run([sys.executable, "tools/plan_layout.py", "--student", "Llama-3.1-70B", "--teacher",
                          "Llama-3.1-70B", "--trainer-nodes", "8", "--config", str(config), "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    doc = json.loads(out.stdout)
    assert not doc["given"]["fits"] and "GB usable" in doc["given"]["why_not"]
    assert doc["given"]["peak_gb"] > 80
    assert doc["fits"] and doc["plan"]["peak_gb"] <= 72
    assert set(doc["nodes"]) == {"trainer", "rollout", "teacher"} and doc["nodes"]["trainer"] == 8
    assert doc["overrides"]["parallel.tensor_parallel"] * doc["overrides"]["parallel.pipeline_parallel"] <= 64
