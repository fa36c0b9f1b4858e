"""Generation, scoring and continuation windows from a real SGLang server equal Hugging Face transformers."""
from __future__ import annotations

import pytest
import torch

from megatron_topd.rollout import PromptDataset, SamplingParams, collect_rollouts, read_records, write_records
from megatron_topd.rollout.client import WINDOW_PROMPTS_PER_REQUEST, RequestJob, window_prompts_per_request
from megatron_topd.testing.tiny_hf import EOS_ID, IM_START_ID, hf_greedy, hf_token_logprobs
from megatron_topd.topd.sampler import ContinuationSampler
from tests.integration.conftest import ServerLog, flush_cache

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

PROMPTS = [[88, 292, 383, 81, 225, 83], [5, 6, 7], [100] * 20, [EOS_ID, 999, 0, 17]]


def test_greedy_equals_hf_with_logprobs_and_top_k(rollout_target):
    client = rollout_target.client()
    gens = client.generate(PROMPTS, SamplingParams(max_new_tokens=24, temperature=0.0, n=3), top_logprobs=5)
    assert len(gens) == len(PROMPTS) and all(len(row) == 3 for row in gens)
    hf = rollout_target.hf()
    for prompt, row in zip(PROMPTS, gens):
        ref_ids, ref_lps = hf_greedy(hf, prompt, 24)
        for g in row:
            assert g.token_ids == ref_ids
            assert g.finish_reason == ("stop" if ref_ids[-1] == EOS_ID else "length")
            assert torch.allclose(torch.tensor(g.logprobs, dtype=torch.float64), torch.tensor(ref_lps, dtype=torch.float64), atol=1e-4)
            assert g.weight_version == rollout_target.version
        # top-5 at every position: HF's 5 best tokens and their log-probs, best first; the first is the greedy token
        full = hf_token_logprobs(hf, prompt + ref_ids)[len(prompt) - 1 : -1]
        ref_top = full.topk(5, dim=-1)
        tops = row[0].top_logprobs
        assert len(tops) == len(ref_ids) and all(len(pos) == 5 for pos in tops)
        assert [[t for t, _ in pos] for pos in tops] == ref_top.indices.tolist()
        got = torch.tensor([[lp for _, lp in pos] for pos in tops], dtype=torch.float64)
        assert torch.allclose(got, ref_top.values, atol=1e-4)
        assert [pos[0][0] for pos in tops] == ref_ids


def test_sampling_n_shapes_and_logprobs_match_hf(rollout_target):
    client = rollout_target.client()
    n, max_new = 4, 16
    gens = client.generate(PROMPTS[:2], SamplingParams(max_new_tokens=max_new, temperature=1.0, n=n, seed=7))
    hf = rollout_target.hf()
    for prompt, row in zip(PROMPTS[:2], gens):
        assert len(row) == n
        assert len({tuple(g.token_ids) for g in row}) > 1, "n samples at temperature 1 should differ"
        for g in row:
            assert 1 <= len(g.token_ids) <= max_new and len(g.logprobs) == len(g.token_ids)
            assert g.top_logprobs is None
            # the returned log-prob of each sampled token is HF's log-softmax at that position
            full = hf_token_logprobs(hf, prompt + g.token_ids)[len(prompt) - 1 : -1]
            ref = full.gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(g.logprobs, dtype=torch.float64), ref, atol=1e-4)
    # below temperature 1 the returned log-probs are those of the distribution sampled from, softmax(logits / T)
    cool = client.generate(PROMPTS[:1], SamplingParams(max_new_tokens=max_new, temperature=0.7, n=2))[0]
    for g in cool:
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPTS[0] + g.token_ids])).logits[0, len(PROMPTS[0]) - 1 : -1].double()
        ref = torch.log_softmax(logits / 0.7, dim=-1).gather(1, torch.tensor(g.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(g.logprobs, dtype=torch.float64), ref, atol=1e-4)


def test_stop_token_ends_the_response_and_is_kept(rollout_target):
    client = rollout_target.client()
    free = client.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0.0))[0][0]
    stop = free.token_ids[2]  # the third greedy token becomes a stop token
    cut = client.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=(stop,)))[0][0]
    first = free.token_ids.index(stop)
    assert cut.token_ids == free.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert cut.logprobs == pytest.approx(free.logprobs[: first + 1], abs=1e-5)


def test_teacher_scoring_equals_hf(rollout_target):
    client = rollout_target.client()
    seqs = [PROMPTS[0] + [5, 900, 17, 17, 3], list(range(40, 70))]
    starts = [len(PROMPTS[0]), 1]
    scores = client.score(seqs, start=starts, top_logprobs=3)
    hf = rollout_target.hf()
    for seq, start, sc in zip(seqs, starts, scores):
        full = hf_token_logprobs(hf, seq)
        ref = full[start - 1 : -1].gather(1, torch.tensor(seq[start:])[:, None])[:, 0]
        assert sc.start == start and len(sc.token_logprobs) == len(seq) - start
        assert torch.allclose(torch.tensor(sc.token_logprobs, dtype=torch.float64), ref, atol=1e-4)
        ref_top = full[start - 1 : -1].topk(3, dim=-1)
        assert [[t for t, _ in pos] for pos in sc.top_logprobs] == ref_top.indices.tolist()
        got = torch.tensor([[lp for _, lp in pos] for pos in sc.top_logprobs], dtype=torch.float64)
        assert torch.allclose(got, ref_top.values, atol=1e-4)


def test_continuation_windows_follow_the_topd_protocol(rollout_target):
    client = rollout_target.client()
    assert isinstance(client, ContinuationSampler)
    prefixes = [PROMPTS[0] + [5, 6], PROMPTS[2]]
    greedy = client.continue_prefixes(prefixes, max_new_tokens=10, n=2, temperature=0.0, top_p=1.0, seed=None)
    hf = rollout_target.hf()
    for prefix, windows in zip(prefixes, greedy):
        ref, _ = hf_greedy(hf, prefix, 10)
        assert windows == [ref, ref]
    sampled = client.continue_prefixes(prefixes, max_new_tokens=10, n=3, temperature=1.0, top_p=0.9, seed=3)
    assert [len(w) for w in sampled] == [3, 3]
    for windows in sampled:
        for w in windows:
            assert 1 <= len(w) <= 10 and all(0 <= t < 1000 for t in w)
            assert len(w) == 10 or w[-1] == EOS_ID


def test_windows_go_out_as_prefix_families_and_followers_hit_the_radix_cache(rollout_target):
    """The probe's prefixes reach the server in two HTTP requests (not one each): every row's longest prefix, then the
    prefixes it extends, which the server finds in its radix cache; the greedy windows equal one request per prefix
    and HF. (Prefixes this short go in one request by default, FAMILY_MIN_SHARED_TOKENS: the test lowers it.)"""
    client = rollout_target.client(family_min_shared_tokens=0)
    long0 = PROMPTS[0] + [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]
    prefixes = [long0, PROMPTS[1], long0[:9], PROMPTS[3], list(PROMPTS[1]), PROMPTS[2][:7]]
    followers = [2, 4]  # long0[:9] extends into long0; the copy of PROMPTS[1] into PROMPTS[1]
    assert window_prompts_per_request(190, 4) == 48 and window_prompts_per_request(500, 1) == WINDOW_PROMPTS_PER_REQUEST
    server = rollout_target.server
    flush_cache(server)
    log = ServerLog(server)
    families = client.continue_prefixes(prefixes, max_new_tokens=6, n=2, temperature=0.0, top_p=1.0, seed=None)
    assert log.text(2).count(ServerLog.POST) == 2
    # the followers' prefixes (all but the token whose logits start the window) came from the leaders' KV
    assert log.prefill_tokens(sum(map(len, prefixes)))[1] >= sum(len(prefixes[i]) - 1 for i in followers), \
        log.text()[-2000:]
    log = ServerLog(server)
    params = SamplingParams(max_new_tokens=6, n=2, temperature=0.0, stream="window")
    one_each = client.generate(prefixes, params, return_logprobs=False, prompts_per_request=1)
    assert log.text(len(prefixes)).count(ServerLog.POST) == len(prefixes)
    assert families == [[g.token_ids for g in row] for row in one_each]
    hf = rollout_target.hf()
    assert families == [[hf_greedy(hf, p, 6)[0]] * 2 for p in prefixes]
    with pytest.raises(ValueError, match="prompts_per_request=0"):
        client.generate(prefixes, params, prompts_per_request=0)
    with pytest.raises(ValueError, match="exactly one non-empty request"):
        client.generate(prefixes, params, request_plan=lambda checked: [RequestJob([[0, 1]]), RequestJob([[1, 2, 3, 4, 5]])])


def test_prompt_file_to_records_roundtrip_with_weight_version(rollout_target, tmp_path):
    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text('{"prompt": "find the sum of x and y"}\n{"messages": [{"role": "user", "content": "prove it"}]}\n'
                            '{"prompt": "what is 12"}\n')
    dataset = PromptDataset(prompts_file, rollout_target.model_dir, n_samples=2, seed=1)
    batch = dataset.next_batch(3)
    assert all(p.ids[0] == IM_START_ID for p in batch)  # the chat template of the model's tokenizer
    params = SamplingParams(max_new_tokens=6, temperature=1.0, n=dataset.n_samples)
    records = collect_rollouts(rollout_target.client(), batch, params)
    assert [(r.prompt_index, r.sample_index) for r in records] == [(p.index, s) for p in batch for s in (0, 1)]
    assert all(r.prompt_ids == p.ids for p in batch for r in records if r.prompt_index == p.index)
    path = tmp_path / "step_0.jsonl"
    assert write_records(path, records, vocab_size=1000) == 6
    back = read_records(path, vocab_size=1000)
    assert back == records
    assert {r.weight_version for r in back} == {rollout_target.version}
