"""The truncated importance weight of the OPD term, staleness, and the new train.* fields' validation."""
import math

import pytest
import torch

from megatron_topd.config import TrainConfig, load_config
from megatron_topd.rollout.async_rollouts import staleness
from megatron_topd.train.objective import ObjectiveScales, tis_ratio


def test_tis_ratio_is_the_truncated_probability_ratio_without_gradient():
    trainer = torch.tensor([[-1.0, -2.0, -0.5, -3.0, -1.0]], requires_grad=True)
    rollout = torch.tensor([[-1.0, -1.0, -2.0, float("nan"), -1.5]])
    mask = torch.tensor([[True, True, True, True, False]])
    w = tis_ratio(trainer, rollout, mask, cap=2.0)
    assert not w.requires_grad
    expected = [1.0, math.exp(-1.0), 2.0, 1.0, 1.0]  # equal, down-weighted, capped (e^1.5 > 2), no log-prob, masked
    assert w[0].tolist() == pytest.approx(expected, rel=1e-6)
    assert tis_ratio(trainer, rollout, mask, cap=1.0)[0, 2].item() == 1.0


def test_objective_scales_default_to_no_correction():
    assert ObjectiveScales(dp_size=1, global_tokens=1, global_windows=0, lambda_traj=0.0,
                           variant="opd").rollout_is_cap is None


def test_staleness_counts_from_the_oldest_version():
    assert staleness(0, ["default", "default"]) == 0.0
    assert staleness(1, ["default"]) == 1.0
    assert staleness(5, ["4", "3"]) == 2.0
    assert staleness(4, ["4"]) == 0.0


def test_train_fields_validate_and_load_from_overrides():
    TrainConfig().validate()
    assert TrainConfig().async_rollouts is False and TrainConfig().rollout_is_correction is False
    with pytest.raises(ValueError, match="rollout_is_cap=0.5 must be a finite number >= 1"):
        TrainConfig(rollout_is_cap=0.5).validate()
    with pytest.raises(ValueError, match="async_rollouts='yes' must be true or false"):
        TrainConfig(async_rollouts="yes").validate()
    cfg = load_config(None, ["train.async_rollouts=true", "train.rollout_is_correction=true", "train.rollout_is_cap=3"])
    assert cfg.train.async_rollouts is True and cfg.train.rollout_is_cap == 3
