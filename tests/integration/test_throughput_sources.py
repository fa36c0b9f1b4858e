"""Rollout sources against a real SGLang server: the sync source samples exactly transformers' greedy decoding of the
dataset's prompts in order (a fixed reference, not a copy of older loop code), and the async source (prefetching
step k+1 during step k) samples the same batches when the weights do not change in between - the only difference
async makes is which weights sample.
Everything downstream of the batch is untouched code in sync mode (the TIS branch is off), so identical batches
mean identical losses. The server itself is not bitwise reproducible: its log-probs move by ~1e-6 with how it batches
concurrent requests, and seeded sampling needs SGLang's deterministic mode (on CPU through our shims, a separate server:
tests/integration/test_rollout_determinism.py), hence greedy decoding and a 1e-4 tolerance on log-probs only."""
import json

import pytest

from megatron_topd.parallel.spawn import run_on_ranks

pytestmark = [pytest.mark.sglang, pytest.mark.slow]

def _close(a, b, tol=1e-4):
    """Log-probs: the server's float32 forward depends on how it batched the concurrent requests (seen: 1.4e-6)."""
    return len(a) == len(b) and all(len(x) == len(y) and all(abs(u - v) <= tol for u, v in zip(x, y))
                                    for x, y in zip(a, b))


def _three_ways(url, model_dir, prompts, out):
    from pathlib import Path

    from megatron_topd.config import Config
    from megatron_topd.rollout import SGLangClient
    from megatron_topd.rollout.async_rollouts import AsyncRollouts, SyncRollouts
    from megatron_topd.rollout.prompts import PromptDataset

    cfg = Config()
    cfg.train.prompts_per_step, cfg.rollout.n_samples, cfg.rollout.max_new_tokens = 3, 2, 12
    # Greedy: the server's sampling is reproducible only with deterministic inference (rollout/config.py, `seed`),
    # which SGLang does not offer with the CPU attention backend; greedy decoding is exactly reproducible here.
    cfg.rollout.temperature = 0.0
    client = SGLangClient([url], vocab_size=1000, context_length=512)

    def dataset():
        return PromptDataset(prompts, model_dir, n_samples=2, seed=5, chat_template=False)

    results = {}
    sync = SyncRollouts(cfg, dataset(), client, Path(out) / "sync", 1000, True)
    results["sync"] = [sync.next(step) for step in range(3)]
    asyn = AsyncRollouts(cfg, dataset(), client, Path(out) / "async", 1000, True, last_step=3)
    batches = []
    for step in range(3):
        batches.append(asyn.next(step))
        results.setdefault("prefetching_after", []).append(asyn._thread is not None)
    asyn.settle()
    results["async"] = batches
    return {k: [_as_lists(b) if not isinstance(b, bool) else b for b in v] for k, v in results.items()}


def _as_lists(batch) -> dict:
    prompts, responses, logprobs = batch.rows(range(len(batch)))
    return {"prompt_ids": prompts, "response_ids": responses, "response_logprobs": logprobs,
            "finish_reasons": batch.finish_reasons, "weight_versions": batch.weight_versions,
            "dataset_state": batch.dataset_state, "servers": batch.servers}


def _reference(rollout_target, prompts_path) -> list[dict]:
    """Per step: the dataset's next 3 prompts (seed 5) and transformers' greedy 12 tokens for each, twice (n=2)."""
    from megatron_topd.rollout.prompts import PromptDataset
    from megatron_topd.testing.tiny_hf import EOS_ID, hf_greedy

    hf = rollout_target.hf()
    ds = PromptDataset(prompts_path, rollout_target.model_dir, n_samples=2, seed=5, chat_template=False)
    steps = []
    for _ in range(3):
        prompts = ds.next_batch(3)
        greedy = [hf_greedy(hf, p.ids, 12) for p in prompts]
        steps.append({"prompt_ids": [p.ids for p in prompts for _ in range(2)],
                      "response_ids": [ids for ids, _ in greedy for _ in range(2)],
                      "response_logprobs": [lps for _, lps in greedy for _ in range(2)],
                      "finish_reasons": [("stop" if ids[-1] == EOS_ID else "length") for ids, _ in greedy
                                         for _ in range(2)],
                      "dataset_state": ds.state_dict()})
    return steps


def test_sync_source_is_hf_greedy_and_async_samples_the_same_without_weight_changes(rollout_target, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"what is {a} plus {a + 3}"}) + "\n" for a in range(7)))
    (result,) = run_on_ranks(_three_ways, 1, rollout_target.url, str(rollout_target.model_dir), str(prompts),
                             str(tmp_path), timeout=600)
    want, sync, asyn = _reference(rollout_target, prompts), result["sync"], result["async"]
    assert len(sync) == len(asyn) == 3
    for step in range(3):
        for f in ("prompt_ids", "response_ids", "finish_reasons", "dataset_state"):
            assert sync[step][f] == want[step][f], (step, f)
            assert asyn[step][f] == want[step][f], (step, f)
        assert _close(sync[step]["response_logprobs"], want[step]["response_logprobs"])
        assert _close(asyn[step]["response_logprobs"], want[step]["response_logprobs"])
        assert sync[step]["weight_versions"] == asyn[step]["weight_versions"] == [rollout_target.version] * 6
        # every sample names the server that generated it (the probe routes its windows there)
        assert sync[step]["servers"] == asyn[step]["servers"] == [rollout_target.url.rstrip("/")] * 6
    assert want[0]["prompt_ids"] != want[1]["prompt_ids"]  # the prompts advance: no batch repeats
    assert result["prefetching_after"] == [True, True, False]  # no prefetch past the last step
    for step in range(3):  # the same records on disk (log-probs within the server's noise)
        got, other = ([json.loads(x) for x in (tmp_path / who / "rollouts" / f"step_{step:08d}.jsonl").read_text()
                       .splitlines()] for who in ("sync", "async"))
        strip = lambda recs: [{k: v for k, v in r.items() if "logprob" not in k} for r in recs]  # noqa: E731
        assert strip(got) == strip(other) and len(got) == 6
        assert [r["response_ids"] for r in got] == want[step]["response_ids"]
