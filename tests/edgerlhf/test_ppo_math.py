"""Exact-value checks of PPO's math (edgerlhf.align.losses, the KL controllers of edgerlhf.align.ppo) against numbers worked out by hand."""

import math

import pytest
import torch

from edgerlhf.align.losses import (clipped_policy_loss, clipped_value_loss, compute_gae, kl_estimate, masked_mean,
                                   masked_var, masked_whiten, per_token_rewards, whiten)
from edgerlhf.align.ppo import AdaptiveKLController, FixedKLController


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def close(actual, expected, tol=1e-6):
    assert torch.allclose(torch.as_tensor(actual, dtype=torch.float64), t(expected), atol=tol, rtol=0), actual


def test_gae_undiscounted():
    # gamma=1, lam=0.95, score 1 on the last token:
    # A2 = 1 - 0.3 = 0.7; A1 = (0 + 0.3 - 0.4) + 0.95*0.7 = 0.565; A0 = (0.4 - 0.5) + 0.95*0.565 = 0.43675
    adv, ret = compute_gae(t([[0.0, 0.0, 1.0]]), t([[0.5, 0.4, 0.3]]), t([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.95)
    close(adv, [[0.43675, 0.565, 0.7]])
    close(ret, [[0.93675, 0.965, 1.0]])


def test_gae_masks_padding_after_the_response():
    # The third token is padding: its reward 9 and value 7 must not leak. gamma=0.9, lam=0.5:
    # A1 = 1.0 + 0.9*0 - 0.5 = 0.5; A0 = (0.2 + 0.9*0.5 - 0.1) + 0.45*0.5 = 0.775
    adv, ret = compute_gae(t([[0.2, 1.0, 9.0]]), t([[0.1, 0.5, 7.0]]), t([[1.0, 1.0, 0.0]]), gamma=0.9, lam=0.5)
    close(adv, [[0.775, 0.5, 0.0]])
    close(ret, [[0.875, 1.0, 0.0]])


def test_gae_lambda_zero_is_one_step_td():
    adv, _ = compute_gae(t([[1.0, 2.0]]), t([[0.5, 0.25]]), t([[1.0, 1.0]]), gamma=0.5, lam=0.0)
    close(adv, [[1.0 + 0.5 * 0.25 - 0.5, 2.0 - 0.25]])


def test_masked_mean_and_var():
    mask = t([1.0, 1.0, 1.0, 0.0])
    close(masked_mean(t([1.0, 2.0, 3.0, 100.0]), mask), 2.0)
    close(masked_var(t([1.0, 2.0, 3.0, 100.0]), mask), 1.0)  # (1 + 0 + 1) / (3 - 1)
    close(masked_var(t([1.0, 2.0, 3.0, 100.0]), mask, unbiased=False), 2.0 / 3.0)
    close(masked_mean(t([[1.0, 3.0], [2.0, 8.0]]), t([[1.0, 1.0], [1.0, 0.0]]), dim=1), [2.0, 2.0])


def test_whitening():
    # mean 2.5, unbiased var 5/3
    s = math.sqrt(5.0 / 3.0)
    close(whiten(t([1.0, 2.0, 3.0, 4.0])), [-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s])
    close(masked_whiten(t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0])), [-1.0, 0.0, 1.0, 0.0])
    # shift_mean=False keeps the mean: (x - 2) / 1 + 2
    close(masked_whiten(t([1.0, 2.0, 3.0, 100.0]), t([1.0, 1.0, 1.0, 0.0]), shift_mean=False), [1.0, 2.0, 3.0, 0.0])


def test_kl_estimators():
    logp, ref = t([-1.0, -2.0]), t([-1.5, -1.0])
    close(kl_estimate(logp, ref), [0.5, -1.0])
    close(kl_estimate(logp, ref, "k3"), [math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1])
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k9")


def test_per_token_rewards_put_the_score_on_the_last_response_token():
    rewards, kl = per_token_rewards(t([2.0, -1.0]), t([[-1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]]),
                                    t([[-1.5, -1.0, -3.0], [-1.0, -2.0, -0.5]]), t([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]),
                                    kl_coef=0.1)
    close(kl, [[0.5, -1.0, 0.0], [0.0, 1.0, -0.5]])
    close(rewards, [[-0.05, 0.1 + 2.0, 0.0], [0.0, -0.1, 0.05 - 1.0]])


def test_clipped_policy_loss():
    # ratios 1.5, 0.5, 1.1 with advantages 1, 1, -2 and clip 0.2:
    # token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; token 3: max(2.2, 2.2) = 2.2
    ratios = [1.5, 0.5, 1.1]
    logp = t([[math.log(r) for r in ratios]])
    loss, clip_frac, approx_kl = clipped_policy_loss(logp, t([[0.0, 0.0, 0.0]]), t([[1.0, 1.0, -2.0]]),
                                                     t([[1.0, 1.0, 1.0]]), cliprange=0.2)
    close(loss, (-1.2 - 0.5 + 2.2) / 3)
    close(clip_frac, 1.0 / 3.0)
    close(approx_kl, 0.5 * sum(math.log(r) ** 2 for r in ratios) / 3)


def test_clipped_policy_loss_ignores_masked_tokens_and_has_ppo_gradient():
    logp = t([[0.0, 5.0]]).requires_grad_()
    loss, clip_frac, _ = clipped_policy_loss(logp, t([[0.0, 0.0]]), t([[2.0, 100.0]]), t([[1.0, 0.0]]), 0.2)
    close(loss, -2.0)
    close(clip_frac, 0.0)
    loss.backward()
    close(logp.grad, [[-2.0, 0.0]])  # d(-A * exp(logp - old))/dlogp at ratio 1


def test_clipped_value_loss():
    # token 1: clip(1.0, 0.5 +- 0.2) = 0.7: max((1-2)^2, (0.7-2)^2) = 1.69 (clipped); token 2: 0
    loss, clip_frac = clipped_value_loss(t([[1.0, 0.0]]), t([[0.5, 0.1]]), t([[2.0, 0.0]]), t([[1.0, 1.0]]), 0.2)
    close(loss, 0.5 * (1.69 + 0.0) / 2)
    close(clip_frac, 0.5)


def test_fixed_kl_controller_does_not_move():
    ctl = FixedKLController(0.1)
    ctl.update(100.0, 32)
    assert ctl.value == 0.1


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(9.0, 32)  # error clipped to +0.2: 0.1 * (1 + 0.2 * 32 / 10000)
    assert ctl.value == pytest.approx(0.100064, abs=1e-12)
    ctl.update(5.4, 100)  # error -0.1: * (1 - 0.1 * 100 / 10000)
    assert ctl.value == pytest.approx(0.100064 * 0.999, abs=1e-12)
    ctl.update(0.0, 10000)  # error clipped to -0.2
    assert ctl.value == pytest.approx(0.100064 * 0.999 * 0.8, abs=1e-12)
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value


def test_leave_one_out_baseline():
    from edgerlhf.align.losses import leave_one_out

    # Groups (1, 2, 6) and (10, 10, 10): 1 - (2 + 6) / 2 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5; the second group is flat
    close(leave_one_out(t([1.0, 2.0, 6.0, 10.0, 10.0, 10.0]), 3), [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    close(leave_one_out(t([1.0, 5.0]), 1), [1.0, 5.0])
