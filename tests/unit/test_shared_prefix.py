"""Shared-prefix guidance rows (issue 14): every guidance loss position, trained inside its rollout row, sees exactly
the context (tokens at their positions) that it sees in the window's own row, with the same weight and the same
remote-teacher scores; RoPE follows per-token positions; windows that outgrow the budget stay rows of their own.
The model-level equality (values and gradients against float64, TP/PP/DP) is in
tests/distributed/test_distill_step.py."""
from dataclasses import replace

import pytest
import torch

from megatron_topd.config import TrainConfig
from megatron_topd.models.shared_prefix import attention_mask, enable_token_positions, token_positions
from megatron_topd.topd.windows import build_guidance, build_requests
from megatron_topd.train.batches import guidance_microbatches, rollout_microbatches, windows_per_row
from megatron_topd.train.handoffs import GuidanceRows, RolloutRows

K_TOP = 3


def _payload(seed: int = 0):
    """7 rollouts, 1-3 candidates each, 1-2 teacher windows per candidate (some cut short), a fake remote teacher's
    top-k whose ids encode (window, position)."""
    g = torch.Generator().manual_seed(seed)
    rows = RolloutRows(prompts=[torch.randint(1, 50, (int(p),), generator=g).tolist() for p in (3, 5, 2, 4, 6, 3, 2)],
                       responses=[torch.randint(1, 50, (int(r),), generator=g).tolist()
                                  for r in (30, 12, 41, 7, 25, 3, 60)])
    tokens, _ = rows.padded(0)
    candidates = []
    for p, r in zip(rows.prompts, rows.responses):
        n = min(len(r), int(torch.randint(1, 4, (1,), generator=g)))
        candidates.append(sorted((len(p) + torch.randperm(len(r), generator=g)[:n]).tolist()))
    requests = build_requests(tokens, candidates)
    windows = [[torch.randint(1, 50, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
                for _ in range(2)] for _ in range(len(requests))]
    divergent = [c % 4 != 1 for c in range(len(requests))]
    gb = build_guidance(requests, windows, divergent, weighting="geometric", gamma=0.8)
    teacher = [{"topk_ids": torch.tensor([[1000 * w + i] * K_TOP for i in range(int(gb.window_len[w]))],
                                         dtype=torch.int32),
                "topk_logprobs": torch.full((int(gb.window_len[w]), K_TOP), -float(w))} for w in range(gb.num_windows)]
    payload = GuidanceRows(tokens=gb.tokens, lengths=gb.lengths, window_start=gb.window_start,
                           logit_weights=gb.logit_weights, teacher=teacher,
                           row=torch.tensor([requests.owners[c][0] for c in gb.candidate.tolist()]))
    return rows, payload


def _contexts_rows_layout(payload, budget):
    """(context, weight, top-k id) per guidance loss position, windows as rows of their own."""
    out = []
    for mb in guidance_microbatches(payload.tokens, payload.lengths, payload.logit_weights, budget, 0,
                                    teacher=payload.teacher, window_start=payload.window_start):
        width = mb["tokens"].shape[1]
        for n, flat in enumerate(mb["loss_index"].tolist()):
            j, c = divmod(flat, width)
            context = tuple(enumerate(mb["tokens"][j, : c + 1].tolist()))
            out.append((context, float(mb["loss_weights"][n]), int(mb["teacher_topk_ids"][n, 0])))
    return sorted(out)


def _contexts_shared_prefix(batches):
    """The same, read off the shared-prefix microbatches through their attention mask and RoPE positions."""
    out = []
    for mb in batches:
        if "loss_index" not in mb:
            continue
        width = mb["tokens"].shape[1]
        masked = attention_mask(mb["attention_segment"], mb["attention_visible"])
        for n, flat in enumerate(mb["loss_index"].tolist()):
            j, c = divmod(flat, width)
            seen = torch.nonzero(~masked[j, 0, c]).flatten().tolist()
            context = tuple(sorted((int(mb["position_ids"][j, k]), int(mb["tokens"][j, k])) for k in seen))
            assert context[-1][0] == int(mb["position_ids"][j, c])  # the query's own position is the newest
            out.append((context, float(mb["loss_weights"][n]), int(mb["guidance_topk_ids"][n, 0])))
    return sorted(out)


def test_every_guidance_position_sees_its_own_rows_context_weight_and_scores():
    rows, payload = _payload()
    budget = 512
    per_row, rest = windows_per_row(payload, rows, budget)
    assert rest == [] and sum(map(len, per_row)) == payload.tokens.shape[0] > 10
    assert max(map(len, per_row)) >= 4  # several windows share a row
    batches = rollout_microbatches(rows, budget, 0, guidance=payload, windows=per_row)
    want = _contexts_rows_layout(payload, budget)
    assert _contexts_shared_prefix(batches) == want
    assert sum(float(mb.get("num_windows", 0)) for mb in batches) == payload.tokens.shape[0]
    # the rollout part is untouched: the response mask and token ids of the rollouts read as before
    plain = {int(i): mb for mb in rollout_microbatches(rows, budget, 0) for i in mb["row_index"]}
    for mb in batches:
        for j, i in enumerate(mb["row_index"].tolist()):
            n = rows.lengths()[i]
            assert torch.equal(mb["tokens"][j, :n], plain[i]["tokens"][list(plain[i]["row_index"]).index(i), :n])
            assert int(mb["response_mask"][j].sum()) == len(rows.responses[i])
            assert not mb["response_mask"][j, n:].any() and float(mb["token_weights"][j, n:].abs().sum()) == 0.0


def test_windows_that_outgrow_the_budget_stay_rows_and_a_wrong_prefix_is_refused():
    rows, payload = _payload(seed=1)
    lengths = rows.lengths()
    budget = 64  # the 62-token row has room for 2 tokens of windows: most of its 6 stay rows
    per_row, rest = windows_per_row(payload, rows, budget)
    assert rest, "some windows must be left over at this budget"
    for i, ws in enumerate(per_row):
        grown = lengths[i] + sum(int(payload.lengths[w] - payload.window_start[w]) for w in ws)
        assert -(-grown // 8) * 8 <= budget
    assert sorted(rest + [w for ws in per_row for w in ws]) == list(range(payload.tokens.shape[0]))
    bad = replace(payload, row=(payload.row + 1) % len(rows))
    with pytest.raises(ValueError, match="its prefix is not the first .* tokens of rollout row"):
        windows_per_row(bad, rows, 512)


def test_rope_follows_per_token_positions_and_is_unchanged_without_them():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_topd.parallel import cpu_compat

    cpu_compat.apply()
    model = torch.nn.Module()
    model.rotary_pos_emb = RotaryEmbedding(kv_channels=16, rotary_percent=1.0, rotary_base=10000)
    default = model.rotary_pos_emb(40)  # [40, 1, 1, 16], Megatron's own angles for 0..39
    enable_token_positions(model)
    assert torch.equal(model.rotary_pos_emb(40), default)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 2, 3], [7, 8, 30, 31, 32, 39]])
    with token_positions(positions):
        emb = model.rotary_pos_emb(6)
        with pytest.raises(ValueError, match="do not fit a rotary call for 9 positions"):
            model.rotary_pos_emb(9)
    assert emb.shape == (6, 3, 1, 16)
    for b in range(3):
        assert torch.equal(emb[:, b], default[positions[b], 0])
    assert torch.equal(model.rotary_pos_emb(40), default)  # the context closed


def test_guidance_layout_is_validated_and_resolves_to_shared_prefix_without_transformer_engine():
    from megatron_topd.config import Config
    from megatron_topd.train.setup import guidance_layout

    with pytest.raises(ValueError, match="train.guidance_layout='packed': use one of auto, shared_prefix, rows"):
        TrainConfig(guidance_layout="packed").validate()
    cfg = Config()
    assert guidance_layout(cfg) == "shared_prefix"  # no TE here
    cfg.train.guidance_layout = "rows"
    assert guidance_layout(cfg) == "rows"
