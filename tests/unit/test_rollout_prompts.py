"""Prompt datasets: chat template from the tokenizer, deterministic order per seed, exact resume."""
from __future__ import annotations

import json

import pytest

from megatron_topd.rollout.prompts import PromptDataset, PromptOverflowError
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
    with pytest.raises(PromptOverflowError, match=r"1 of 1 prompts .* longer than the 3 tokens"):
        PromptDataset(write_jsonl(tmp_path / "l.jsonl", [{"prompt": "a b c d e f g"}]), tokenizer, max_prompt_tokens=3)
    with pytest.raises(ValueError, match=r"row 1: needs a non-empty 'prompt'"):  # found when the dataset is made
        PromptDataset(tmp_path / "p.jsonl", tokenizer, max_prompt_tokens=100)


def _long_at_500(tmp_path):
    """600 short prompts, and at rows 500 and 580 prompts far over the room."""
    rows = [{"prompt": f"what is {i} plus {i + 1}"} for i in range(600)]
    rows[500] = rows[580] = {"prompt": " ".join(f"w{i}" for i in range(200))}
    return write_jsonl(tmp_path / "p.jsonl", rows)


def test_an_overlong_prompt_at_row_500_is_reported_when_the_dataset_is_made(tmp_path, tokenizer):
    path = _long_at_500(tmp_path)
    with pytest.raises(PromptOverflowError) as err:
        PromptDataset(path, tokenizer, chat_template=False, max_prompt_tokens=40)
    message = str(err.value)
    assert "2 of 600 prompts" in message and "row 500 (" in message and "row 580 (" in message
    assert "40 tokens" in message and "train.prompt_overflow=skip" in message and "train.max_seq_length" in message


def test_skip_drops_and_counts_them_and_no_draw_or_resume_meets_them(tmp_path, tokenizer):
    path = _long_at_500(tmp_path)
    ds = PromptDataset(path, tokenizer, chat_template=False, max_prompt_tokens=40, overflow="skip", seed=1)
    assert ds.skipped == [500, 580] and len(ds.eligible) == 598
    drawn = [p.index for p in ds.next_batch(598)]  # one whole epoch
    assert sorted(drawn) == [i for i in range(600) if i not in (500, 580)]
    state = ds.state_dict()
    after = [p.index for p in ds.next_batch(700)]  # into epochs 1 and 2
    assert 500 not in after and 580 not in after and all(len(p.ids) <= 40 for p in ds.next_batch(50))
    resumed = PromptDataset(path, tokenizer, chat_template=False, max_prompt_tokens=40, overflow="skip", seed=1)
    resumed.load_state_dict(state)
    assert [p.index for p in resumed.next_batch(700)] == after
    other_room = PromptDataset(path, tokenizer, chat_template=False, max_prompt_tokens=10_000, seed=1)
    with pytest.raises(ValueError, match="eligible prompts"):
        other_room.load_state_dict(state)


def test_lengths_are_cached_beside_the_file_and_keyed_by_its_content(tmp_path, tokenizer):
    path = _long_at_500(tmp_path)
    ds = PromptDataset(path, tokenizer, chat_template=False, max_prompt_tokens=40, overflow="skip")
    (cache,) = tmp_path.glob("p.jsonl.lengths-*.json")
    assert json.loads(cache.read_text()) == [len(ds.tokenize(i).ids) if i not in (500, 580) else
                                             len(ds._ids(i)) for i in range(600)]
    cache.write_text(json.dumps([1] * 600))  # a cache hit is believed: all prompts fit now
    assert PromptDataset(path, tokenizer, chat_template=False, max_prompt_tokens=40).skipped == []
    write_jsonl(path, [{"prompt": "a"}] * 3)  # new content: a new key, measured again
    short = PromptDataset(path, tokenizer, chat_template=False, max_prompt_tokens=40)
    assert short.prompt_lengths() == [len(tokenizer("a")["input_ids"])] * 3
    assert len(list(tmp_path.glob("p.jsonl.lengths-*.json"))) == 2


def test_draws_make_one_permutation_per_epoch(tmp_path, tokenizer):
    ds = PromptDataset(_long_at_500(tmp_path), tokenizer, chat_template=False)
    ds.next_batch(599)
    assert ds.permutations_made == 1  # 599 draws of epoch 0, one permutation (was: one per draw)
    ds.next_batch(2)
    assert ds.permutations_made == 2  # the last of epoch 0, the first of epoch 1
