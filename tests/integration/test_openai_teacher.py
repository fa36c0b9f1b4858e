"""Issue 27: a teacher behind an OpenAI-compatible /v1/completions endpoint (SGLang's own, on the shared CPU servers
of conftest.py), its per-row deadline, and the teacher's scores at a temperature other than 1.

- `OpenAICompletionsClient` scores (echo + logprobs, max_tokens 0) equal SGLang's native scores and the float64 HF
  model's; a top-k above the server's cap is refused before any request;
- a server that answers too late (its process group stopped with SIGSTOP: the kernel accepts the connection, nothing
  answers): rows routed to it are dropped at `deadline_s` - masked whole, counted - while the rows the other server
  scored keep their signal, and the step's loss over the batch is finite with the late rows contributing nothing;
- scores at T != 1 (`at_temperature` over the whole vocabulary's top-k) equal log-softmax(logits / T) of the model.
"""
from __future__ import annotations

import asyncio
import os
import signal

import pytest
import torch

from megatron_topd.rollout.openai_client import OpenAICompletionsClient
from megatron_topd.testing.tiny_hf import hf_token_logprobs, load_hf_model, random_state_dict
from megatron_topd.train.batches import rollout_microbatches
from megatron_topd.train.estimators import rollout_terms
from megatron_topd.train.handoffs import RolloutRows
from megatron_topd.train.teacher import RemoteTeacher

V = 1000


def rows_of(n: int, length: int, seed: int) -> list[list[int]]:
    """Random ids below V - 1 (SGLang 0.5.23 on CPU scores an input id V-1 of this tiny model as id 0)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V - 1, (n, length), generator=g).tolist()


@pytest.mark.sglang
def test_openai_scores_equal_native_and_the_model(rollout_target):
    seqs = rows_of(3, 12, seed=0)
    native = rollout_target.client().score(seqs, start=4, top_logprobs=5)
    openai = OpenAICompletionsClient([rollout_target.url], vocab_size=V, context_length=512, max_top_k=5)
    got = openai.score(seqs, start=4, top_logprobs=5)
    hf = rollout_target.hf().double()
    for seq, a, b in zip(seqs, native, got):
        assert len(b.token_logprobs) == len(seq) - 4
        torch.testing.assert_close(torch.tensor(b.token_logprobs), torch.tensor(a.token_logprobs), rtol=0, atol=1e-5)
        ref = hf_token_logprobs(hf, seq)[3:-1].gather(1, torch.tensor(seq[4:])[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(b.token_logprobs, dtype=torch.float64), ref, rtol=0, atol=1e-4)
        values = lambda score: torch.tensor([[lp for _, lp in pos] for pos in score.top_logprobs])  # noqa: E731
        torch.testing.assert_close(values(b), values(a), rtol=0, atol=1e-5)  # values; the ids come keyed by text
    with pytest.raises(ValueError, match=r"top-6 log-probs asked .* at most 5 \(teacher.api_max_top_k\)"):
        openai.score(seqs, start=4, top_logprobs=6)


@pytest.mark.sglang
def test_late_rows_are_dropped_and_counted_while_the_rest_trains(rollout_target, spare_server):
    """Two teacher servers, the second stopped: each row is one request, dealt least-loaded in order (the first to
    the running server, the second to the stopped one, and so on), so rows 1 and 3 wait on the stopped server until
    the deadline. The call returns; those rows are masked and counted; the others carry the teacher's scores."""
    prompt, responses = rows_of(1, 6, seed=1)[0], rows_of(4, 10, seed=2)
    client = OpenAICompletionsClient([rollout_target.url, spare_server.url], vocab_size=V, context_length=512)
    teacher = RemoteTeacher(client, kl="sampled", top_k=1, deadline_s=8.0)
    group = os.getpgid(spare_server.proc.pid)
    os.killpg(group, signal.SIGSTOP)
    try:
        rows = asyncio.run(teacher.ascore_samples(prompt, responses))
    finally:
        os.killpg(group, signal.SIGCONT)
    late = [bool(r.get("late")) for r in rows]
    assert late == [False, True, False, True]
    assert teacher.row_counts(rows) == {"teacher_late_rows": 2.0}
    assert all(not r["signal_mask"].any() for r, is_late in zip(rows, late) if is_late)
    hf = rollout_target.hf().double()
    for r, resp in zip(rows, responses):
        if not r.get("late"):
            ref = hf_token_logprobs(hf, prompt + resp)[len(prompt) - 1:-1].gather(1, torch.tensor(resp)[:, None])[:, 0]
            torch.testing.assert_close(r["token_logprobs"].double(), ref, rtol=0, atol=1e-4)

    # The step's loss over these rows (a student with other weights): finite, the late rows' terms exactly 0.
    batch_rows = RolloutRows([prompt] * 4, responses)
    batch_rows.teacher = rows
    (batch,) = rollout_microbatches(batch_rows, max_tokens=10**6, pad_id=0, multiple=1)
    signal_ = {"kind": "sampled", "token_logprobs": batch["teacher_token_logprobs"], "mask": batch["teacher_signal_mask"]}
    student = load_hf_model(rollout_target.model_dir, random_state_dict(rollout_target.spec, seed=5)).double()
    logits = student(input_ids=batch["tokens"]).logits.detach().requires_grad_(True)
    terms = rollout_terms(logits, batch, signal_, group=None, vocab_size=V, chunk_size=None)
    mask = batch["response_mask"][:, 1:]
    per_row = torch.where(mask, terms.loss, 0.0).sum(1)
    assert torch.isfinite(per_row).all() and per_row[[1, 3]].tolist() == [0.0, 0.0]
    assert per_row[[0, 2]].abs().min() > 0.1  # the rows scored in time carry the teacher's signal
    per_row.sum().backward()
    assert logits.grad[[1, 3]].abs().max() == 0 and torch.isfinite(logits.grad).all()


@pytest.mark.sglang
@pytest.mark.parametrize("kl", ["sampled", "topk"])
def test_scores_at_a_temperature_equal_the_models_log_softmax_over_t(rollout_target, kl):
    """SGLang ignores the temperature for input log-probs; the teacher asks for the whole vocabulary's top-k and
    renormalises (exact at k = V): log softmax(z / T) of the float64 HF model, for the sampled tokens and the top-k."""
    t = 0.7
    prompt, responses = rows_of(1, 5, seed=3)[0], rows_of(2, 8, seed=4)
    teacher = RemoteTeacher(rollout_target.client(), kl=kl, top_k=V, temperature=t)
    assert teacher.rollout_top_k == V  # sampled asks for the top-k too, at T != 1
    rows = teacher.score_rollouts([prompt] * 2, responses)
    hf = rollout_target.hf().double()
    for r, resp in zip(rows, responses):
        logits = hf(torch.tensor([prompt + resp])).logits[0, len(prompt) - 1:-1].double()
        ref = torch.log_softmax(logits / t, -1)
        torch.testing.assert_close(r["token_logprobs"].double(), ref.gather(1, torch.tensor(resp)[:, None])[:, 0],
                                   rtol=0, atol=2e-4)
        if kl == "topk":
            torch.testing.assert_close(r["topk_logprobs"].double(), ref.gather(1, r["topk_ids"].long()), rtol=0,
                                       atol=2e-4)
        else:
            assert "topk_ids" not in r  # the top-k only renormalised the scores
        unscaled = torch.log_softmax(logits, -1).gather(1, torch.tensor(resp)[:, None])[:, 0]
        assert (r["token_logprobs"].double() - unscaled).abs().max() > 0.05  # T = 0.7 does change them


@pytest.mark.sglang
def test_sglang_takes_inputs_up_to_seven_below_its_context(rollout_target):
    """`rollout.validation.longest_input` is the real server's limit: at context length 512 an input of 505 tokens is
    scored, 506 is refused (a cross-tokenizer teacher's rows longer than that get no signal instead of failing the
    step). Sent past the client's own check, straight to /generate."""
    import json
    import urllib.error
    import urllib.request

    from megatron_topd.rollout.validation import longest_input

    def score(n: int) -> int:
        body = {"input_ids": [5] * n, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True}
        request = urllib.request.Request(rollout_target.url + "/generate", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status
        except urllib.error.HTTPError as e:
            assert "maximum allowed length" in e.read().decode()
            return e.code

    assert longest_input(512) == 505
    assert (score(505), score(506)) == (200, 400)
