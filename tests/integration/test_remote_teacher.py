"""Issue 10: the remote teacher's estimators against a real SGLang CPU server serving the tiny teacher.

- topk with k = V equals the exact full KL (values and gradients); for k < V it is a lower bound that grows with k;
- the sampled-token estimator's mean over the student's own samples matches the full KL within its standard error,
  and its gradient is the policy-gradient form (checked against a float64 autograd reference);
- the server's log-probs are the unscaled distribution (they reproduce the float64 HF teacher).
"""
import pytest
import torch

from megatron_topd.losses import vocab_parallel_kl, vocab_parallel_log_probs
from megatron_topd.testing.tiny_hf import build_tiny_model, load_hf_model
from megatron_topd.train.batches import rollout_microbatches
from megatron_topd.train.handoffs import RolloutRows
from megatron_topd.train.estimators import rollout_terms
from megatron_topd.train.teacher import RemoteTeacher

V = 1000


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    student_dir = build_tiny_model(tmp_path_factory.mktemp("student") / "model", arch="llama", seed=1)
    return load_hf_model(student_dir).double(), load_hf_model(tiny_model_dir).double()


def _rows(student, n: int, prompt_len: int, new_tokens: int, seed: int) -> RolloutRows:
    """Responses sampled from the student itself (as on-policy rollouts are). The last id (999) is left out: SGLang
    0.5.23 on CPU scores an input id V-1 of this tiny model as id 0 (the client refuses such an answer)."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, V - 1, (1, prompt_len), generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = student.generate(prompt.repeat(n, 1), do_sample=True, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                               top_k=0, top_p=1.0, temperature=1.0, pad_token_id=0,
                               bad_words_ids=[[V - 1]])
    return RolloutRows([prompt[0].tolist()] * n, [r[prompt_len:].tolist() for r in out])


def _microbatch(rows: RolloutRows, teacher: RemoteTeacher):
    rows.teacher = teacher.score_rollouts(rows.prompts, rows.responses)
    (batch,) = rollout_microbatches(rows, max_tokens=10**6, pad_id=0, multiple=1)
    return batch


def _logits(model, batch):
    return model(input_ids=batch["tokens"]).logits


@pytest.mark.sglang
def test_topk_equals_full_kl_at_k_v_and_is_a_growing_lower_bound(spare_server, models):
    student, teacher_hf = models
    rows = _rows(student, 3, prompt_len=5, new_tokens=12, seed=0)
    client_kw = dict(vocab_size=V, context_length=512)
    from megatron_topd.rollout import SGLangClient

    client = SGLangClient([spare_server.url], **client_kw)
    batch = _microbatch(rows, RemoteTeacher(client, kl="topk", top_k=V))
    mask = batch["response_mask"][:, 1:]
    s_logits = _logits(student, batch).detach().requires_grad_(True)
    with torch.no_grad():
        t_logits = _logits(teacher_hf, batch)

    # The server's sampled-token log-probs are the unscaled teacher distribution.
    ref_lp_t = vocab_parallel_log_probs(t_logits[:, :-1], batch["tokens"][:, 1:])
    got_lp_t = batch["teacher_token_logprobs"][:, :-1]
    assert (got_lp_t - ref_lp_t)[mask].abs().max() < 1e-4

    full = vocab_parallel_kl(s_logits[:, :-1], t_logits[:, :-1])
    full_sum = full[mask].sum()
    (full_grad,) = torch.autograd.grad(full_sum, s_logits)
    signal = {"kind": "topk", "token_logprobs": batch["teacher_token_logprobs"],
              "topk_ids": batch["teacher_topk_ids"], "topk_logprobs": batch["teacher_topk_logprobs"]}
    terms = rollout_terms(s_logits, batch, signal, group=None, vocab_size=V, chunk_size=None)
    topk_sum = terms.loss[mask].sum()
    (topk_grad,) = torch.autograd.grad(topk_sum, s_logits)
    assert float(topk_sum) == pytest.approx(float(full_sum), rel=1e-4)
    torch.testing.assert_close(topk_grad, full_grad, rtol=1e-4, atol=1e-7)

    values = {}
    for k in (1, 8, 64, 256):  # truncate the k = V answer: the server returns the top-k best first
        sig = dict(signal, topk_ids=signal["topk_ids"][..., :k].contiguous(),
                   topk_logprobs=signal["topk_logprobs"][..., :k].contiguous())
        values[k] = float(rollout_terms(s_logits, batch, sig, group=None, vocab_size=V, chunk_size=None).loss[mask].sum())
    values[V] = float(topk_sum)
    print("top-k KL / full KL:", {k: round(v / float(full_sum), 4) for k, v in values.items()})
    ks = sorted(values)
    assert all(values[a] <= values[b] + 1e-6 for a, b in zip(ks, ks[1:]))  # refining the buckets never lowers it
    assert values[1] < 0.9 * float(full_sum)


@pytest.mark.sglang
def test_sampled_estimator_is_unbiased_and_has_the_policy_gradient(spare_server, models):
    from megatron_topd.rollout import SGLangClient

    student, teacher_hf = models
    client = SGLangClient([spare_server.url], vocab_size=V, context_length=512)
    rows = _rows(student, 200, prompt_len=4, new_tokens=6, seed=1)
    batch = _microbatch(rows, RemoteTeacher(client, kl="sampled", top_k=V))
    assert "teacher_topk_ids" not in batch  # sampled: only the sampled token's log-prob travels
    mask = batch["response_mask"][:, 1:]
    s_logits = _logits(student, batch).detach().requires_grad_(True)
    with torch.no_grad():
        t_logits = _logits(teacher_hf, batch)
    signal = {"kind": "sampled", "token_logprobs": batch["teacher_token_logprobs"]}
    terms = rollout_terms(s_logits, batch, signal, group=None, vocab_size=V, chunk_size=None)

    # Per sequence: sum_t l_t (the estimator) against sum_t KL_t at the same contexts (chain rule: same mean).
    per_seq = torch.where(mask, terms.token_loss, 0.0).sum(1).double()
    full = torch.where(mask, vocab_parallel_kl(s_logits[:, :-1], t_logits[:, :-1]).detach(), 0.0).sum(1)
    diff = per_seq - full
    se = float(diff.std() / diff.numel() ** 0.5)
    assert abs(float(diff.mean())) < 3 * se, (float(diff.mean()), se)
    assert float(full.mean()) > 10 * se  # the check has power: the KL is far from 0 at this noise level

    # Gradient: l_t * grad log pi_S(y_t), against float64 autograd of sum_t sg(l_t) log pi_S(y_t).
    loss = torch.where(mask, terms.loss, 0.0).sum()
    (grad,) = torch.autograd.grad(loss, s_logits)
    logp_s = torch.log_softmax(s_logits[:, :-1], -1).gather(-1, batch["tokens"][:, 1:, None])[..., 0]
    ref_l = (logp_s - batch["teacher_token_logprobs"][:, :-1].double()).detach()
    (ref_grad,) = torch.autograd.grad(torch.where(mask, ref_l * logp_s, 0.0).sum(), s_logits)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-8)
    assert float(loss) == pytest.approx(float(torch.where(mask, ref_l, 0.0).sum()), rel=1e-5)
