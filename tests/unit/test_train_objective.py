"""The training pass's microbatch loss (train/objective.py) sums to topd_loss on the whole batch, gradients included,
with token-budget microbatches of different shapes and the guidance KL at weighted positions only."""
import pytest
import torch

from megatron_topd.losses import vocab_parallel_kl
from megatron_topd.topd import topd_loss
from megatron_topd.train import batches as mb
from megatron_topd.train.objective import ObjectiveScales, make_loss_fn, total_loss

V = 37


def test_microbatch_objective_equals_topd_loss_on_the_full_batch():
    g = torch.Generator().manual_seed(0)
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    responses = [[11, 12, 13, 14], [15] * 7, [16, 17], [18, 19, 20, 21, 22]]
    rows = mb.RolloutRows(prompts, responses)
    tokens, mask = rows.padded(pad_id=0)
    B, S = tokens.shape
    weights = torch.where(torch.rand(B, S, generator=g) < 0.3, 0.0, 1.0)
    s_logits = torch.randn(B, S, V, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(B, S, V, generator=g, dtype=torch.float64)
    N, L = 3, 12
    g_lengths = torch.tensor([12, 9, 6])
    gs_logits = torch.randn(N, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    gt_logits = torch.randn(N, L, V, generator=g, dtype=torch.float64)
    gw = torch.zeros(N, L, dtype=torch.float64)
    for i, n in enumerate(g_lengths.tolist()):
        gw[i, n - 4 : n - 1] = torch.rand(3, generator=g, dtype=torch.float64) + 0.1
    gw = gw / gw.sum(1, keepdim=True)

    rollout = mb.rollout_microbatches(rows, max_tokens=16, pad_id=0, token_weights=weights)
    guidance = mb.guidance_microbatches(torch.zeros(N, L, dtype=torch.long), g_lengths, gw, max_tokens=16, pad_id=0)
    assert len({b["tokens"].shape for b in rollout + guidance}) > 1  # microbatches of several shapes
    assert all(b["tokens"].numel() <= 16 for b in rollout + guidance)

    def slice_rows(full, b, width):  # the microbatch's rows, padded (or cut) to its width
        x = full[b["row_index"]][:, :width]
        return torch.nn.functional.pad(x, (0, 0, 0, width - x.shape[1]))

    student_mbs, teacher_mbs = [], []
    for b in rollout:
        w = b["tokens"].shape[1]
        student_mbs.append(slice_rows(s_logits, b, w))
        teacher_mbs.append(slice_rows(t_logits, b, w))
    order = sorted(range(N), key=lambda i: (-int(g_lengths[i]), i))  # pack_rows: longest first
    start = 0
    for b in guidance:
        n, w = b["tokens"].shape
        idx = order[start : start + n]
        start += n
        student_mbs.append(torch.nn.functional.pad(gs_logits[idx][:, :w], (0, 0, 0, max(0, w - L))))
        flat_t = torch.nn.functional.pad(gt_logits[idx][:, :w], (0, 0, 0, max(0, w - L))).reshape(-1, V)
        teacher_mbs.append(flat_t.index_select(0, b["loss_index"]))  # what ColocatedTeacher keeps
    scales = ObjectiveScales(dp_size=1, global_tokens=int(mask.sum()), global_windows=N, lambda_traj=0.7,
                             variant="topd")
    loss_fn = make_loss_fn(teacher_mbs, scales, num_in_call=len(student_mbs), vocab_size=V, chunk_size=None)
    outs = [loss_fn(s, b) for s, b in zip(student_mbs, rollout + guidance)]
    total = sum(o[0] for o in outs) / len(outs)  # the schedule's division by the microbatches of the call
    sums = {k: float(sum(o[1][k] for o in outs)) for k in outs[0][1]}

    kl = vocab_parallel_kl(s_logits[:, :-1], t_logits[:, :-1])
    l_t = torch.nn.functional.pad(kl, (1, 0))
    traj = vocab_parallel_kl(gs_logits, gt_logits, direction="forward")
    ref, metrics = topd_loss(l_t, weights.double(), mask, variant="topd", lambda_traj=0.7, traj_kl=traj,
                             traj_weights=gw)
    torch.testing.assert_close(total.float(), ref, rtol=1e-6, atol=0)
    assert total_loss(sums, scales)[0] == pytest.approx(float(ref.detach()), rel=1e-6)
    assert sums["tokens"] == int(mask.sum()) and abs(sums["windows"] - N) < 1e-9
    grads = torch.autograd.grad(total, [s_logits, gs_logits])
    ref_grads = torch.autograd.grad(ref, [s_logits, gs_logits])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert metrics["traj_loss"] > 0 and metrics["opd_loss"] > 0


def test_pack_rows_bounds_tokens_and_padding():
    g = torch.Generator().manual_seed(1)
    lengths = torch.exp(torch.empty(512).uniform_(torch.log(torch.tensor(16.0)), torch.log(torch.tensor(2048.0)),
                                                 generator=g)).long().tolist()
    groups = mb.pack_rows(lengths, max_tokens=4096, multiple=8)
    assert sorted(i for grp in groups for i in grp) == list(range(512))
    padded = sum(len(grp) * mb.round_up(max(lengths[i] for i in grp)) for grp in groups)
    assert all(len(grp) * mb.round_up(max(lengths[i] for i in grp)) <= 4096 for grp in groups)
    assert 1 - sum(lengths) / padded <= 0.10


def test_pack_rows_rejects_a_row_over_the_budget():
    with pytest.raises(ValueError, match="train.max_tokens_per_microbatch=64"):
        mb.pack_rows([10, 70], max_tokens=64)
