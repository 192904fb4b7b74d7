"""Exact-value checks of PPO's math (edgerlhf.ppo) against numbers worked out by hand."""

import math

import pytest
import torch

from edgerlhf.ppo import (
    AdaptiveKLController,
    FixedKLController,
    clipped_policy_loss,
    clipped_value_loss,
    compute_gae,
    entropy_from_logits,
    kl_estimate,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    per_token_rewards,
    whiten,
)


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


def test_entropy_and_logprobs_from_logits():
    close(entropy_from_logits(t([[0.0, 0.0, 0.0, 0.0]])), [math.log(4.0)])
    probs = [0.5, 0.25, 0.25]
    logits = t([[math.log(p) + 3.0 for p in probs]])  # a shift changes nothing
    close(entropy_from_logits(logits), [0.5 * math.log(2) + 0.5 * math.log(4)])
    close(logprobs_from_logits(logits.unsqueeze(0), torch.tensor([[1, 0]])[:, :1]), [[math.log(0.25)]])


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


def test_sampling_support_follows_top_k_then_top_p():
    from edgerlhf.ppo import sampling_support, support_mask

    logits = t([[math.log(p) for p in (0.05, 0.5, 0.15, 0.3)]])

    def mask(**kw):
        return support_mask(sampling_support(logits, **kw), logits.shape).tolist()

    assert mask() == [[True] * 4]
    assert mask(top_k=2) == [[False, True, False, True]]
    # top-p 0.7: ascending probs .05 .15 .3 .5, cumulative .05 .2 .5 1: drop those <= 0.3 -> keep .3 and .5
    assert mask(top_p=0.7) == [[False, True, False, True]]
    assert mask(top_p=0.9) == [[False, True, True, True]]
    # top-k first, then top-p on the renormalised rest: .5/.95 alone already exceeds 0.5
    assert mask(top_k=3, top_p=0.5) == [[False, True, False, False]]
    assert mask(top_k=3, top_p=0.9) == [[False, True, True, True]]
    assert support_mask(sampling_support(t([[0.0, 0.0]]), top_p=0.01), (1, 2)).sum() == 1  # the best one stays


def test_sampling_support_matches_transformers_warpers():
    from transformers import TopKLogitsWarper, TopPLogitsWarper

    from edgerlhf.ppo import sampling_support, support_mask

    torch.manual_seed(0)
    scores = torch.randn(6, 1000) * 3
    for top_k, top_p in ((50, 0.95), (0, 0.9), (20, 1.0), (200, 0.5)):
        warped = scores.clone()
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        warped = TopPLogitsWarper(top_p)(None, warped) if top_p < 1 else warped
        ours = support_mask(sampling_support(scores, top_k, top_p), scores.shape)
        assert torch.equal(ours, torch.isfinite(warped)), (top_k, top_p)


def test_restricted_logprobs_and_entropy():
    from edgerlhf.ppo import restricted_entropy, restricted_logprobs, sampling_support

    logits = t([[[math.log(p) for p in (0.05, 0.5, 0.15, 0.3)]]])  # (B=1, T=1, V=4)
    support = sampling_support(logits, top_k=2)
    close(restricted_logprobs(logits, torch.tensor([[1]]), support), [[math.log(0.5 / 0.8)]])
    # A sampled token outside the support is added to it: {1, 3} + {2}
    close(restricted_logprobs(logits, torch.tensor([[2]]), support), [[math.log(0.15 / 0.95)]])
    p = torch.tensor([0.5, 0.3]) / 0.8
    close(restricted_entropy(logits, support), [[float(-(p * p.log()).sum())]])
    full = sampling_support(logits)
    close(restricted_logprobs(logits, torch.tensor([[3]]), full), [[math.log(0.3)]])
    close(restricted_entropy(logits, full), [[-sum(q * math.log(q) for q in (0.05, 0.5, 0.15, 0.3))]])


def test_kl_estimate_on_a_shared_support_is_zero_for_identical_policies():
    from edgerlhf.ppo import policy_stats

    torch.manual_seed(0)
    logits = torch.randn(2, 5, 50, dtype=torch.float64)
    tokens = torch.randint(0, 50, (2, 5))
    logp, ref_logp, entropy = policy_stats(logits, logits.clone(), tokens, top_k=10, top_p=0.9)
    close(logp - ref_logp, torch.zeros(2, 5))
    assert (entropy <= math.log(10) + 1e-9).all()  # at most 10 tokens in the support


def test_leave_one_out_baseline():
    from edgerlhf.ppo import leave_one_out

    # Groups (1, 2, 6) and (10, 10, 10): 1 - (2 + 6) / 2 = -3, 2 - 3.5 = -1.5, 6 - 1.5 = 4.5; the second group is flat
    close(leave_one_out(t([1.0, 2.0, 6.0, 10.0, 10.0, 10.0]), 3), [-3.0, -1.5, 4.5, 0.0, 0.0, 0.0])
    close(leave_one_out(t([1.0, 5.0]), 1), [1.0, 5.0])
