"""Prompt datasets: chat template from the tokenizer, deterministic order per seed, exact resume."""
from __future__ import annotations

import json

import pytest

from megatron_topd.rollout.prompts import PromptDataset
from megatron_topd.testing.tiny_hf import IM_END_ID, IM_START_ID, build_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(build_tokenizer(tmp_path_factory.mktemp("tok"))))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_template_and_plain_text(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "find the sum of x and y"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "prove it"}]},
    ])
    ds = PromptDataset(path, tokenizer, shuffle=False)
    p0 = ds.tokenize(0)
    assert p0.ids[0] == IM_START_ID and p0.ids.count(IM_START_ID) == 2 and p0.ids.count(IM_END_ID) == 1
    assert tokenizer.decode(p0.ids).endswith("<|im_start|>assistant\n")
    assert ds.tokenize(1).ids.count(IM_START_ID) == 3
    plain = PromptDataset(path, tokenizer, chat_template=False)
    assert IM_START_ID not in plain.tokenize(0).ids
    assert tokenizer.decode(plain.tokenize(0).ids) == "find the sum of x and y"


def test_order_is_deterministic_and_resumable(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": f"what is {i}"} for i in range(7)])
    a = PromptDataset(path, tokenizer, seed=3)
    seen = [p.index for p in a.next_batch(5)]
    state = a.state_dict()
    rest = [p.index for p in a.next_batch(9)]  # wraps into epoch 1
    assert sorted(seen + rest[:2]) == list(range(7))  # epoch 0 is a permutation
    assert sorted(rest[2:]) == list(range(7))  # so is epoch 1
    assert rest[2:] != seen + rest[:2]  # a new order per epoch
    b = PromptDataset(path, tokenizer, seed=3)
    b.load_state_dict(state)
    assert [p.index for p in b.next_batch(9)] == rest
    c = PromptDataset(path, tokenizer, seed=4)
    assert [p.index for p in c.next_batch(7)] != seen + rest[:2]
    with pytest.raises(ValueError, match="resume with the same dataset file and seed"):
        c.load_state_dict(state)


def test_bad_rows_are_named(tmp_path, tokenizer):
    ds = PromptDataset(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"text": "no prompt field"}]), tokenizer)
    with pytest.raises(ValueError, match=r"p\.jsonl row 1: needs a non-empty 'prompt' string or a 'messages' list"):
        ds.tokenize(1)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: not JSON"):
        PromptDataset(tmp_path / "bad.jsonl", tokenizer)
    long = PromptDataset(write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a b c d e f g"}]), tokenizer, max_prompt_tokens=3)
    with pytest.raises(ValueError, match=r"tokens > max_prompt_tokens=3"):
        long.tokenize(0)
