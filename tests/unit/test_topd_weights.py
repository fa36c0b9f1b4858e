"""Suppression weights: fraction and threshold rules, the tie rule at the cut-off, per-token weights, config checks."""
import pytest
import torch

from megatron_topd.topd import TopdConfig, divergence_weights, token_weights


def test_bottom_fraction_gets_w_low_and_the_rest_is_divergent():
    d = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0], dtype=torch.float64)
    w, div = divergence_weights(d, low_fraction=0.3, w_low=0.25)
    low = {1, 5, 3}  # the three smallest: 0.1, 0.2, 0.3
    assert div.tolist() == [i not in low for i in range(10)]
    assert w.tolist() == [0.25 if i in low else 1.0 for i in range(10)]
    assert w.dtype == torch.float32


def test_ties_at_the_cut_off_are_treated_alike():
    # 6 of 10 windows identical (distance 0): q=0.3 asks for 3, all 6 tied at the cut-off are low
    d = [0.0, 0.4, 0.0, 0.0, 0.7, 0.0, 0.0, 0.9, 0.0, 0.5]
    _, div = divergence_weights(d, low_fraction=0.3)
    assert (~div).sum() == 6
    assert div.tolist() == [x > 0 for x in d]
    # ties in the middle: cut-off 0.2 is shared by three candidates, and every one of them is low
    d = [0.1, 0.2, 0.5, 0.2, 0.2, 0.6, 0.7, 0.8, 0.9, 1.0]
    _, div = divergence_weights(d, low_fraction=0.2)
    assert (~div).tolist() == [True, True, False, True, True, False, False, False, False, False]
    # reversing the order does not change who is low: no index-order tie breaking
    _, div_rev = divergence_weights(d[::-1], low_fraction=0.2)
    assert div_rev.tolist() == div.tolist()[::-1]
    # distances equal up to float32-cosine rounding count as tied
    _, div = divergence_weights([0.3, 0.3 + 2e-7, 0.9, 0.8], low_fraction=0.25)
    assert div.tolist() == [False, False, True, True]


def test_threshold_rule_and_zero_fraction():
    d = [0.05, 0.2, 0.1, 0.3]
    w, div = divergence_weights(d, threshold=0.1, w_low=0.0)
    assert div.tolist() == [False, True, True, True]  # strictly below the threshold is low
    assert w.tolist() == [0.0, 1.0, 1.0, 1.0]
    w, div = divergence_weights(d, low_fraction=0.0)
    assert div.all() and (w == 1).all()
    w, div = divergence_weights([], low_fraction=0.3)
    assert w.shape == (0,) and div.shape == (0,)
    # floor(0.3 * 3) = 0: with fewer than 1/q candidates nothing is suppressed
    _, div = divergence_weights([0.1, 0.2, 0.3], low_fraction=0.3)
    assert div.all()


def test_divergence_weights_reject_bad_input():
    with pytest.raises(ValueError, match="finite and non-negative"):
        divergence_weights([0.1, float("nan")])
    with pytest.raises(ValueError, match="finite and non-negative"):
        divergence_weights([0.1, -0.2])
    with pytest.raises(ValueError, match="one distance per candidate"):
        divergence_weights(torch.zeros(2, 2))
    with pytest.raises(ValueError, match="low_fraction=1.0"):
        divergence_weights([0.1], low_fraction=1.0)
    with pytest.raises(ValueError, match="w_low=-1"):
        divergence_weights([0.1], w_low=-1)


def test_token_weights_place_candidate_weights_at_their_positions():
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 1:4] = True
    w = token_weights(mask, [[4, 2], [3]], torch.tensor([0.0, 0.5, 0.25]))
    expected = torch.ones(2, 6)
    expected[0, 4], expected[0, 2], expected[1, 3] = 0.0, 0.5, 0.25
    assert torch.equal(w, expected)
    with pytest.raises(ValueError, match="not a response token"):
        token_weights(mask, [[1], []], torch.tensor([0.0]))
    with pytest.raises(ValueError, match="for 3 candidates"):
        token_weights(mask, [[4, 2], [3]], torch.tensor([0.0]))


def test_config_defaults_follow_the_design_and_validation_names_the_field():
    cfg = TopdConfig().validate()
    assert (cfg.top_k, cfg.min_gap, cfg.window) == (3, 8, 50)
    assert (cfg.low_fraction, cfg.w_low, cfg.lambda_traj) == (0.3, 0.0, 1.0)
    assert (cfg.variant, cfg.position_weighting, cfg.embedding_source) == ("topd", "uniform", "auto")
    assert cfg.sampling_temperature == 1.0
    assert TopdConfig(probe_greedy=True).sampling_temperature == 0.0
    cases = [
        (dict(variant="ppo"), "topd.variant='ppo'.*opd, opd_suppress, topd"),
        (dict(top_k=0), "topd.top_k=0: use an integer >= 1"),
        (dict(min_gap=0), "topd.min_gap=0"),
        (dict(window=0), "topd.window=0"),
        (dict(low_fraction=1.0), r"topd.low_fraction=1.0: use a number in \[0.0, 1.0\)"),
        (dict(threshold=-0.1), "topd.threshold=-0.1"),
        (dict(w_low=float("nan")), "topd.w_low=nan"),
        (dict(lambda_traj=-1.0), "topd.lambda_traj=-1.0"),
        (dict(gamma=0.0), "topd.gamma=0.0"),
        (dict(position_weighting="linear"), "topd.position_weighting='linear'"),
        (dict(embedding_source="both"), "topd.embedding_source='both'"),
        (dict(probe_temperature=0.0), "topd.probe_temperature=0.0"),
        (dict(probe_greedy=True, samples_per_side=2), "samples_per_side=1 or probe_greedy=false"),
        (dict(candidate_mode="fraction", candidate_fraction=0.0), "topd.candidate_fraction=0.0"),
        (dict(top_k=2.5), "topd.top_k=2.5"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            TopdConfig(**kwargs).validate()
