"""Cross-tokenizer OPD and TOPD through the real loop (issue 27): the tests' tiny student (byte-level BPE, 1000
tokens) and a tiny teacher built here whose tokenizer really differs (byte-level BPE, 300 tokens, trained on another
corpus), served by a real SGLang CPU server; teacher.placement=remote, teacher.kl=sampled, teacher.tokenizer=cross -
OPD at TP=2 scored through the server's OpenAI-compatible /v1/completions (teacher.api=openai, with a per-row
deadline it meets); TOPD through its /generate (the probe's windows) at TP=2, then the same step batch at DP=2
(TP=1), whose loss, metrics and gradients equal the DP=1 step's."""
import json
import math

import pytest
import torch
from transformers import AutoTokenizer

from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.testing.tiny_hf import build_tiny_model, build_tokenizer
from megatron_topd.topd.cross_tokenizer import tokenizer_relation
from tests.integration.conftest import REPO, sglang_python
from tests.integration.test_loop_topd import demo_overrides, run_remote_training

# The teacher's 300-token BPE writes a row in more tokens than the student's 1000-token one: its server gets
# teacher.context_length=256 while the student's keep rollout.context_length=128 (examples/cpu_demo.yaml). A row
# over SGLang's input limit, 7 below the context, would get no signal and be counted; at 128 one row once went over.
TEACHER_CONTEXT = 256
# DP=2 (TP=1) against DP=1 (TP=2) on one step batch, relative: measured 5e-8 (loss), 2e-7 (grad norm), 2.3e-6
# (largest gradient difference over the largest element); 1e-4 leaves a margin of 40 over the largest.
LAYOUT_RTOL = 1e-4


@pytest.fixture(scope="module")
def cross_teacher_hf(tmp_path_factory):
    """The teacher: 300 tokens, 301 model rows. SGLang 0.5.23 on CPU scores an input id V-1 as id 0 (the client
    refuses that answer: docs/remote_teacher.md "Not done"), so no token of the tokenizer is the last row, as in the
    demo's vocabulary; the random model may still sample the padding row in a window (that candidate drops out)."""
    hf = build_tiny_model(tmp_path_factory.mktemp("cross_teacher") / "hf", arch="llama", seed=1, vocab_size=301,
                          hidden_size=96, intermediate_size=192, num_layers=3)
    build_tokenizer(hf, 300, seed=1)
    return hf


@pytest.fixture(scope="module")
def cross_teacher_url(demo_assets, demo_servers, cross_teacher_hf, tmp_path_factory) -> str:
    """The teacher's server, launched once for both runs by the loop's own launcher (`LaunchedServers`: the teacher
    alone, at teacher.context_length, the student's servers being the shared demo ones)."""
    from megatron_topd.config import load_config
    from megatron_topd.train.setup import LaunchedServers

    cfg = load_config(REPO / "examples" / "cpu_demo.yaml", [
        f"train.student_hf_path={demo_assets['student_hf']}", f"teacher.hf_path={cross_teacher_hf}",
        f"rollout.urls={json.dumps(demo_servers['student'])}", f"rollout.server_python={sglang_python()}",
        f"rollout.server_log_dir={tmp_path_factory.mktemp('cross_teacher_logs')}",
        f"teacher.context_length={TEACHER_CONTEXT}"])
    servers = LaunchedServers(cfg)
    assert servers.student is None and servers.teacher_cfg.context_length == TEACHER_CONTEXT
    try:
        _, (url,) = servers.start()
        yield url
    finally:
        servers.stop()


def cross_overrides(demo_assets, demo_servers, tmp_path, teacher_hf, teacher_url) -> list[str]:
    student_tok = AutoTokenizer.from_pretrained(demo_assets["student_hf"])
    assert tokenizer_relation(student_tok, AutoTokenizer.from_pretrained(teacher_hf)).kind == "cross"  # really differ
    return demo_overrides(demo_assets, tmp_path, colocated=False, servers={"student": demo_servers["student"]}) + [
        f"teacher.hf_path={teacher_hf}", f"teacher.urls={json.dumps([teacher_url])}", "teacher.placement=remote",
        "teacher.kl=sampled", "teacher.tokenizer=cross", "rollout.max_new_tokens=24", "train.steps=1",
        "eval.teacher=false", f"teacher.context_length={TEACHER_CONTEXT}"]


def check_cross_step(histories) -> dict:
    """What every cross-tokenizer step shows (one history per rank): finite loss and gradients, the masked tokens
    counted (the random student samples byte tokens that are not UTF-8 - only those are masked, every row aligns -
    and <|im_end|>, which the teacher's EOS map leaves unmapped) and the same on both ranks."""
    (row,) = histories[0]
    assert histories[1][0]["cross_tokenizer_masked_tokens"] == row["cross_tokenizer_masked_tokens"]
    assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["skipped"] == 0.0
    assert row["grad_norm"] > 0 and math.isfinite(row["grad_norm"])
    assert row["response_tokens"] > 0 and row["cross_tokenizer_response_tokens"] == row["response_tokens"]
    assert row["cross_tokenizer_unaligned_rows"] == 0 and row["teacher_late_rows"] == 0
    assert 0 < row["cross_tokenizer_masked_tokens"] < row["response_tokens"]
    return row


@pytest.mark.slow
@pytest.mark.sglang
def test_opd_step_with_a_teacher_of_another_tokenizer(tmp_path, demo_assets, demo_servers, cross_teacher_hf,
                                                      cross_teacher_url):
    overrides = cross_overrides(demo_assets, demo_servers, tmp_path, cross_teacher_hf, cross_teacher_url) + [
        "topd.variant=opd", "teacher.api=openai", "teacher.deadline_s=300"]
    ranks = run_on_ranks(run_remote_training, 2, overrides, timeout=1200)
    assert [r["models_built"] for r in ranks] == [1, 1]  # the student only
    row = check_cross_step([r["history"] for r in ranks])
    assert row["traj_loss"] == 0.0 and row["loss"] == pytest.approx(row["opd_loss"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["cross_tokenizer_masked_tokens"] == row["cross_tokenizer_masked_tokens"]
    print("cross-tokenizer OPD step:", {k: row[k] for k in (
        "loss", "grad_norm", "response_tokens", "mean_token_kl", "cross_tokenizer_masked_tokens",
        "cross_tokenizer_unaligned_rows", "teacher_late_rows")})


class RecordedRollouts:
    """The loop's rollout source, keeping the step's batch (rank 0: rollouts, the teacher's span-level scores, and
    its renderings of the prompts, which the probe reads) in ``path`` for a run at another layout."""

    def __init__(self, run, path: str):
        self.run, self.path = run, path
        self.source = run.rollout_source

    def next(self, step: int):
        import torch
        import torch.distributed as dist

        batch = self.source.next(step)
        if dist.get_rank() == 0:
            torch.save({"batch": batch, "prompts": dict(self.run.teacher.prompts)}, self.path)
        return batch

    def settle(self) -> float:
        return self.source.settle()


class ReplayedRollouts(RecordedRollouts):
    """That batch handed out again (rank 0 loads it, `broadcast_step_batch` shares it as the real sources do)."""

    def next(self, step: int):
        import torch
        import torch.distributed as dist

        from megatron_topd.rollout.step_batch import broadcast_step_batch

        saved = torch.load(self.path, weights_only=False) if dist.get_rank() == 0 else None
        if saved is not None:
            self.run.teacher.prompts.update(saved["prompts"])
        return broadcast_step_batch(saved["batch"] if saved is not None else None)

    def settle(self) -> float:
        return 0.0


def run_shared_step(config_overrides: list[str], path: str, source: str) -> dict:
    """One step of the real loop (`set_up`, `train_step`) whose rollouts are recorded in (``source="record"``) or
    replayed from (``"replay"``) ``path``; its metrics and this rank's gradients after the step, each parameter with
    its tensor-parallel split dimension (None: whole on every rank)."""
    from megatron_topd.checkpointing import unwrap
    from megatron_topd.config import load_config
    from megatron_topd.train.loop import train_step
    from megatron_topd.train.setup import set_up

    with set_up(load_config(REPO / "examples" / "cpu_demo.yaml", config_overrides)) as run:
        run.rollout_source = {"record": RecordedRollouts, "replay": ReplayedRollouts}[source](run, path)
        metrics, _ = train_step(run, 0)
        grads = {name: (p.main_grad.detach().cpu().clone(),
                        p.partition_dim if getattr(p, "tensor_model_parallel", False) else None)
                 for name, p in unwrap(run.student[0]).named_parameters()}
    return {"metrics": metrics, "grads": grads}


def untimed(metrics: dict) -> dict:
    """A step's metrics without its timings and sync size (rank 0's own)."""
    return {k: v for k, v in metrics.items() if not k.endswith("_s") and k != "sync_mb"}


def full_gradients(ranks) -> dict:
    """Each parameter's whole gradient from the ranks of one tensor-parallel group: shards joined in rank order
    (SwiGLU's fc1 holds [gate; up] of its shard on each rank: gates first, then ups), the others from its first
    rank."""
    out = {}
    for name, (grad, dim) in ranks[0]["grads"].items():
        shards = [r["grads"][name][0] for r in ranks]
        if dim is not None and name.endswith("mlp.linear_fc1.weight"):
            halves = [s.chunk(2, dim) for s in shards]
            shards = [h[0] for h in halves] + [h[1] for h in halves]
        out[name] = torch.cat(shards, dim) if dim is not None else grad
    return out


@pytest.mark.slow
@pytest.mark.sglang
def test_topd_step_with_a_teacher_of_another_tokenizer_at_dp1_and_dp2(tmp_path, demo_assets, demo_servers,
                                                                      cross_teacher_hf, cross_teacher_url):
    """TOPD across tokenizers (train/cross_probe.py): candidates at span starts, the teacher continuing its own
    tokenization of each prefix on its server, both windows in the student's tokens for OT, and guidance rows
    with hard targets: L_traj > 0 and the loss is L_OPD + L_traj (lambda_traj = 1). First at TP=2 (DP=1), then
    the same step batch at DP=2 (TP=1): the replica of rank 1 asks the servers for its rows' windows from the
    teacher's renderings of their prompts, which only rank 0 holds (`teacher_prompts`), and its dropped candidates
    count in the step's. Windows are greedy (topd.probe_greedy), so both runs probe with the same windows; the
    non-distributed optimizer leaves every rank the whole reduced gradient to compare."""
    record = str(tmp_path / "step_batch.pt")
    overrides = cross_overrides(demo_assets, demo_servers, tmp_path, cross_teacher_hf, cross_teacher_url) + [
        "topd.variant=topd", "topd.window=8", "topd.low_fraction=0.3", "topd.probe_greedy=true",
        "optim.use_distributed_optimizer=false"]
    dp1 = run_on_ranks(run_shared_step, 2, overrides + [f"train.output_dir={tmp_path / 'dp1'}"], record, "record",
                       timeout=1200)
    row = check_cross_step([[r["metrics"]] for r in dp1])
    assert row["candidates"] > 0 and 0 < row["divergent"] == row["guidance_windows"]
    assert row["traj_loss"] > 0 and row["mean_ot_distance"] > 0
    assert row["loss"] == pytest.approx(row["opd_loss"] + row["traj_loss"], rel=1e-5)
    assert row["cross_tokenizer_dropped_candidates"] >= 0  # logged every step

    dp2 = run_on_ranks(run_shared_step, 2, overrides + [f"train.output_dir={tmp_path / 'dp2'}",
                                                        "parallel.tensor_parallel=1"], record, "replay", timeout=1200)
    other = dp2[0]["metrics"]
    assert untimed(dp2[1]["metrics"]) == untimed(other)  # both replicas report the whole batch's metrics
    for key in ("candidates", "divergent", "guidance_windows", "response_tokens", "cross_tokenizer_dropped_candidates",
                "cross_tokenizer_masked_tokens", "cross_tokenizer_unaligned_rows"):
        assert other[key] == row[key], key
    for key in ("loss", "opd_loss", "traj_loss", "grad_norm", "mean_ot_distance"):
        assert other[key] == pytest.approx(row[key], rel=LAYOUT_RTOL), key
    ref, got = full_gradients(dp1), full_gradients(dp2[:1])  # TP=2 shards; each DP=2 rank holds the whole
    assert got.keys() == ref.keys() and all(dp2[1]["grads"][k][0].equal(got[k]) for k in got)
    scale = max(float(g.abs().max()) for g in ref.values())
    diffs = {k: float((got[k] - ref[k]).abs().max()) for k in ref}
    worst = max(diffs.values())
    assert worst <= LAYOUT_RTOL * scale, (f"gradients differ by {worst} (largest element {scale}): "
                                          f"{sorted(diffs.items(), key=lambda kv: -kv[1])[:3]}")
    print("cross-tokenizer TOPD step:", {k: row[k] for k in (
        "loss", "opd_loss", "traj_loss", "candidates", "divergent", "mean_ot_distance",
        "cross_tokenizer_dropped_candidates", "cross_tokenizer_masked_tokens", "window_s")},
        "DP=2 vs DP=1:", {k: other[k] - row[k] for k in ("loss", "grad_norm")}, "gradients", worst / scale)
