"""The training pass's microbatch loss (train/objective.py) sums to topd_loss on the whole batch, gradients included."""
import torch

from megatron_topd.losses import vocab_parallel_kl
from megatron_topd.topd import topd_loss
from megatron_topd.train import batches as mb
from megatron_topd.train.objective import ObjectiveScales, make_loss_fn

V = 37


def test_microbatch_objective_equals_topd_loss_on_the_full_batch():
    g = torch.Generator().manual_seed(0)
    B, S, N, L = 4, 12, 3, 12
    prompts = [[1, 2, 3], [4, 5], [6, 7, 8, 9], [10]]
    responses = [[11, 12, 13, 14], [15] * 7, [16, 17], [18, 19, 20, 21, 22]]
    tokens, mask = mb.rollout_tensors(prompts, responses, S, pad_id=0)
    weights = torch.where(torch.rand(B, S, generator=g) < 0.3, 0.0, 1.0)
    s_logits = torch.randn(B, S, V, generator=g, dtype=torch.float64, requires_grad=True)
    t_logits = torch.randn(B, S, V, generator=g, dtype=torch.float64)
    gs_logits = torch.randn(N, L, V, generator=g, dtype=torch.float64, requires_grad=True)
    gt_logits = torch.randn(N, L, V, generator=g, dtype=torch.float64)
    gw = torch.rand(N, L, generator=g, dtype=torch.float64) * (torch.rand(N, L, generator=g) < 0.5)
    gw[:, 0] += 0.1
    gw = gw / gw.sum(1, keepdim=True)

    rollout = mb.split_microbatches({"tokens": tokens, "response_mask": mask, "token_weights": weights}, 2, "rollout")
    guidance = mb.split_microbatches({"tokens": torch.zeros(N, L, dtype=torch.long), "logit_weights": gw}, 2, "guidance")
    assert len(guidance) == 2 and guidance[1]["logit_weights"][1].sum() == 0  # padded row is all-masked
    batches = rollout + guidance
    student_mbs = [s_logits[0:2], s_logits[2:4], gs_logits[0:2], torch.cat([gs_logits[2:3], gs_logits[2:3] * 0])]
    teacher_mbs = [t_logits[0:2], t_logits[2:4], gt_logits[0:2], torch.cat([gt_logits[2:3], gt_logits[2:3] * 0])]
    scales = ObjectiveScales(num_microbatches=len(batches), dp_size=1, global_tokens=int(mask.sum()),
                             global_windows=N, lambda_traj=0.7, variant="topd")
    loss_fn = make_loss_fn(teacher_mbs, scales, vocab_size=V, chunk_size=None)
    total = sum(loss_fn(s, b)[0] for s, b in zip(student_mbs, batches)) / len(batches)  # the schedule's mean

    # Reference: token-aligned l_t on the full batch, then topd_loss.
    kl = vocab_parallel_kl(s_logits[:, :-1], t_logits[:, :-1])
    l_t = torch.nn.functional.pad(kl, (1, 0))
    traj = vocab_parallel_kl(gs_logits, gt_logits, direction="forward")
    ref, metrics = topd_loss(l_t, weights.double(), mask, variant="topd", lambda_traj=0.7, traj_kl=traj,
                             traj_weights=gw)
    assert ref.dtype == torch.float32  # topd_loss accumulates in float32
    torch.testing.assert_close(total.float(), ref, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(total, [s_logits, gs_logits])
    ref_grads = torch.autograd.grad(ref, [s_logits, gs_logits])
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert metrics["traj_loss"] > 0 and metrics["opd_loss"] > 0
