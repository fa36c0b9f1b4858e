"""Cross-tokenizer OPD through the real loop (issue 27): the tests' tiny student (byte-level BPE, 1000 tokens) and a
tiny teacher built here whose tokenizer really differs (byte-level BPE, 300 tokens, trained on another corpus),
served by a real SGLang CPU server and scored through its OpenAI-compatible /v1/completions (teacher.api=openai,
with a per-row deadline it meets); one OPD step at TP=2 over gloo with teacher.placement=remote, teacher.kl=sampled,
teacher.tokenizer=cross."""
import json
import math

import pytest
from transformers import AutoTokenizer

from megatron_topd.parallel.spawn import run_on_ranks
from megatron_topd.testing.tiny_hf import build_tiny_model
from megatron_topd.topd.cross_tokenizer import tokenizer_relation
from tests.integration.test_loop_topd import demo_overrides, run_remote_training


@pytest.fixture(scope="module")
def cross_teacher_hf(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("cross_teacher") / "hf", arch="llama", seed=1, vocab_size=300,
                            hidden_size=96, intermediate_size=192, num_layers=3)


@pytest.mark.slow
@pytest.mark.sglang
def test_opd_step_with_a_teacher_of_another_tokenizer(tmp_path, demo_assets, demo_servers, cross_teacher_hf):
    student_tok = AutoTokenizer.from_pretrained(demo_assets["student_hf"])
    teacher_tok = AutoTokenizer.from_pretrained(cross_teacher_hf)
    assert tokenizer_relation(student_tok, teacher_tok).kind == "cross"  # the tokenizers really differ
    overrides = demo_overrides(demo_assets, tmp_path, colocated=False,  # the loop launches the teacher's server
                               servers={"student": demo_servers["student"]}) + [
        f"teacher.hf_path={cross_teacher_hf}", "teacher.placement=remote", "teacher.kl=sampled",
        "teacher.tokenizer=cross", "topd.variant=opd", "rollout.max_new_tokens=24", "train.steps=1",
        "teacher.api=openai", "teacher.deadline_s=300", "eval.teacher=false",
        # the teacher's 300-token BPE writes a row in more tokens than the student's 1000-token one, and the loop
        # launches the teacher's server at rollout.context_length: room for every row (a row over SGLang's input
        # limit, 7 below the context, gets no signal and is counted; at 128 one row once went over and, with the
        # limit then taken as the context itself, failed the step)
        "rollout.context_length=256"]
    ranks = run_on_ranks(run_remote_training, 2, overrides, timeout=1200)
    assert [r["models_built"] for r in ranks] == [1, 1]  # the student only
    (row,) = ranks[0]["history"]
    assert ranks[1]["history"][0]["cross_tokenizer_masked_tokens"] == row["cross_tokenizer_masked_tokens"]
    assert math.isfinite(row["loss"]) and row["loss"] > 0 and row["skipped"] == 0.0
    assert row["grad_norm"] > 0 and math.isfinite(row["grad_norm"])
    assert row["response_tokens"] > 0
    assert row["cross_tokenizer_response_tokens"] == row["response_tokens"]
    # Tokens without a teacher signal are counted and some tokens have one. The random student samples byte tokens
    # that are not UTF-8 in most rows (only those tokens are masked: every row aligns) and <|im_end|>, which the
    # teacher's EOS map leaves unmapped (a masked span).
    assert row["cross_tokenizer_unaligned_rows"] == 0 and row["teacher_late_rows"] == 0
    assert 0 < row["cross_tokenizer_masked_tokens"] < row["response_tokens"]
    assert row["traj_loss"] == 0.0 and row["loss"] == pytest.approx(row["opd_loss"])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["cross_tokenizer_masked_tokens"] == row["cross_tokenizer_masked_tokens"]
    print("cross-tokenizer step:", {k: row[k] for k in ("loss", "grad_norm", "response_tokens", "mean_token_kl",
                                                         "cross_tokenizer_masked_tokens",
                                                         "cross_tokenizer_unaligned_rows", "teacher_late_rows")})
