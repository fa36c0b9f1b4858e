"""Each weight-sync path puts new weights on a real SGLang server: outputs then equal HF on the new weights,
and the new weight_version comes back in every rollout record."""
from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch

from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.rollout import SamplingParams
from megatron_topd.rollout.records import records_from_generations
from megatron_topd.rollout.weight_sync import DiskWeightSync, DistributedWeightSync, TensorWeightSync
from megatron_topd.testing.tiny_hf import hf_greedy, load_hf_model, random_state_dict
from megatron_topd.testing.waits import wait_until
from tests.integration.conftest import server_load

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

PROMPTS = [[88, 292, 383, 81, 225, 83], [7, 600, 31]]


def assert_serves(target, state, version: str) -> None:
    """Greedy outputs equal HF with `state`, and records carry `version`."""
    before = target.state
    target.served(state, version)
    client = target.client()
    gens = client.generate(PROMPTS, SamplingParams(max_new_tokens=12, temperature=0.0, n=2))
    for prompt, row in zip(PROMPTS, gens):
        ref_ids, ref_lps = hf_greedy(target.hf(), prompt, 12)
        assert row[0].token_ids == ref_ids
        assert torch.allclose(torch.tensor(row[0].logprobs, dtype=torch.float64),
                              torch.tensor(ref_lps, dtype=torch.float64), atol=1e-4)
    old_ids, _ = hf_greedy(load_hf_model(target.model_dir, before), PROMPTS[0], 12)
    assert gens[0][0].token_ids != old_ids, "the new weights should change the greedy output"
    records = records_from_generations([0, 1], PROMPTS, gens)
    assert {r.weight_version for r in records} == {version}


def wait_until_decoding(url: str, timeout_s: float = 60.0) -> None:
    """Block until the server reports running requests (SGLang's /v1/loads), instead of sleeping a guessed time."""
    wait_until(lambda: server_load(url)["num_running_reqs"], timeout_s, f"a request decoding on {url}", poll_s=0.02)


def test_disk_sync_pauses_and_continues_generation_in_flight(rollout_target, tmp_path):
    state = random_state_dict(rollout_target.spec, seed=101)
    client = rollout_target.client()
    # near the context length (512; SGLang keeps a few positions back), so that even a fast machine is still
    # decoding when the sync pauses it
    long = SamplingParams(max_new_tokens=448, temperature=0.0, n=1, ignore_eos=True)
    result, finished = {}, {}

    def generate():
        result["gens"] = client.generate([PROMPTS[0]] * 8, long)
        finished["t"] = time.monotonic()

    worker = threading.Thread(target=generate)
    worker.start()
    wait_until_decoding(rollout_target.url)
    sync = DiskWeightSync([rollout_target.url], tmp_path / "sync", model_path=rollout_target.model_dir,
                          bucket_bytes=200_000)
    sync_started = time.monotonic()
    assert worker.is_alive(), "the generation ended before the sync began: nothing was in flight to pause"
    stats = sync.sync(iter(state.items()), "disk-1")
    worker.join(timeout=300)
    assert stats.method == "disk" and stats.num_tensors == len(state) and stats.num_buckets > 1
    assert sorted(p.name for p in (tmp_path / "sync" / "disk-1").glob("*.safetensors")) == [
        f"model-{i:05d}-of-{stats.num_buckets:05d}.safetensors" for i in range(1, stats.num_buckets + 1)
    ]
    # the in-flight generation was paused, not lost: every sample is back once, full length, finished after the sync
    assert finished["t"] > sync_started
    gens = result["gens"]
    assert len(gens) == 8 and all(len(row) == 1 and len(row[0].token_ids) == long.max_new_tokens for row in gens)
    assert {row[0].weight_version for row in gens} == {"disk-1"}
    assert_serves(rollout_target, state, "disk-1")


def test_tensor_sync_and_shm_manager_ended(rollout_target):
    state = random_state_dict(rollout_target.spec, seed=202)
    sync = TensorWeightSync([rollout_target.url], bucket_bytes=150_000)
    stats = sync.sync(iter(state.items()), "tensor-1")
    assert stats.method == "tensor" and stats.num_tensors == len(state) and stats.num_buckets > 1
    assert_serves(rollout_target, state, "tensor-1")
    managers = [p for p in psutil.Process().children() if p.name() == "torch_shm_manager"]
    assert managers, "the file_system sharing strategy starts a torch_shm_manager"
    sync.close()
    assert not [p for p in psutil.Process().children() if p.name() == "torch_shm_manager" and p.is_running()
                and p.status() != psutil.STATUS_ZOMBIE]


def _distributed_sync_on_rank(url: str, state: dict, version: str):
    """Runs on each trainer rank: every rank drains the export, rank 0 broadcasts to the server."""
    sync = DistributedWeightSync([url], backend="gloo", bucket_bytes=64 * 1024, timeout_s=120)
    try:
        stats = sync.sync(iter(state.items()), version)
    finally:
        sync.close()
    return None if stats is None else (stats.method, stats.num_tensors, stats.num_buckets)


def test_distributed_sync_from_trainer_rank0(rollout_target):
    state = random_state_dict(rollout_target.spec, seed=303)
    results = run_on_ranks(_distributed_sync_on_rank, 2, rollout_target.url, state, "dist-1", timeout=300)
    assert results[1] is None
    method, n, buckets = results[0]
    assert method == "distributed" and n == len(state) and buckets > 1
    assert_serves(rollout_target, state, "dist-1")


def _stage_sync_on_rank(url: str, hf_dir: str, version: str, seq: list[int]) -> dict:
    """TP2 x PP2: the student loaded from `hf_dir`, pushed stage by stage. Rank 0 returns the stats and the HF tensors
    exported from the live model; the last stage's first TP rank, Megatron's log-probs at every position of `seq`."""
    from megatron_topd import parallel
    from megatron_topd.convert import export_hf_weights
    from megatron_topd.convert.hf_to_megatron import build_model, inspect_hf_checkpoint, load_hf_weights
    from megatron_topd.convert.verify import megatron_logits

    layout = parallel.initialize(2, 2)
    _, spec, reader, _ = inspect_hf_checkpoint(hf_dir, 2, 2)
    model = build_model(spec, "fp32")
    load_hf_weights(model, spec, reader)
    sync = DistributedWeightSync([url], backend="gloo", bucket_bytes=64 * 1024, timeout_s=120)
    try:
        stats = sync.sync_model(model, spec, version)
    finally:
        sync.close()
    exported = {name: t for name, t in export_hf_weights(model, spec) if t is not None}
    logits = megatron_logits(model, torch.tensor([seq]), spec.vocab_size)
    out = {}
    if stats is not None:
        out.update(stats=stats, exported=exported)
    if logits is not None and layout.tp_rank == 0 and layout.dp_rank == 0:
        out["logprobs"] = torch.log_softmax(logits[0].double(), dim=-1)
    return out


def test_per_stage_sync_at_tp2_pp2_serves_the_trainers_weights(rollout_target, tmp_path):
    """Every pipeline stage pushes its own layers over its own group: afterwards the server's greedy output equals HF
    on the weights exported from the trainer, and its log-probs of a fixed sequence equal Megatron's."""
    from safetensors.torch import save_file

    state = random_state_dict(rollout_target.spec, seed=404)
    hf_dir = tmp_path / "student"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_bytes((rollout_target.model_dir / "config.json").read_bytes())
    save_file(state, str(hf_dir / "model.safetensors"))
    seq = [5, 88, 292, 383, 81, 225, 83, 7, 600, 31, 412, 9]
    results = run_on_ranks(_stage_sync_on_rank, 4, rollout_target.url, str(hf_dir), "stages-1", seq, timeout=300)
    assert [sorted(r) for r in results[1:]] == [[], ["logprobs"], []]
    stats, exported = results[0]["stats"], results[0]["exported"]
    assert stats.method == "distributed" and stats.num_tensors == len(state) and stats.num_buckets > 2
    assert len(stats.stage_bytes) == 2 and min(stats.stage_bytes) > 0 and sum(stats.stage_bytes) == stats.num_bytes
    assert sorted(exported) == sorted(state) and all(torch.equal(exported[k], state[k]) for k in state)
    assert_serves(rollout_target, exported, "stages-1")
    served = rollout_target.client().score([seq])[0]
    megatron = results[2]["logprobs"]
    want = torch.tensor([float(megatron[t - 1, seq[t]]) for t in range(1, len(seq))], dtype=torch.float64)
    assert served.weight_version == "stages-1"
    assert torch.allclose(torch.tensor(served.token_logprobs, dtype=torch.float64), want, atol=1e-4, rtol=0)
