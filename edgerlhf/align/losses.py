"""The maths every sampling algorithm builds its loss from: pure functions on (B, T) tensors (`mask` is 1 on
response tokens) or on one value per response (B,). No models, no config, nothing sampled here.

Follows TRL's old `PPOTrainer` utilities (`masked_mean`, `masked_whiten`) and "The N Implementation Details
of RLHF with PPO" (Huang et al. 2023); each function names its paper. Each algorithm's own advantages and
loss are in its module (`ppo.py`, `grpo.py`, `rloo.py`), written term by term from these.
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `values` where `mask` is 1 (over everything, or along `dim`)."""
    if dim is None:
        return (values * mask).sum() / mask.sum()
    return (values * mask).sum(dim) / mask.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `values` where `mask` is 1, with Bessel's correction by default (as TRL)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            return torch.zeros_like(variance)
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True,
                  eps: float = 1e-8) -> torch.Tensor:
    """Normalise to unit variance (and zero mean when `shift_mean`) over the masked entries."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def whiten(values: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten a flat batch (e.g. the scalar scores of a rollout batch)."""
    return masked_whiten(values, torch.ones_like(values), shift_mean, eps)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from log-probs of the sampled tokens.

    `k1` = log p - log q (unbiased, can be negative per token; what the penalty uses, as Ziegler et al.);
    `k3` = (q/p - 1) - log(q/p) (unbiased and >= 0, Schulman's "Approximating KL divergence").
    """
    log_ratio = logprobs - ref_logprobs
    if kind == "k1":
        return log_ratio
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {kind!r}")


def leave_one_out(scores: torch.Tensor, group: int) -> torch.Tensor:
    """Scores minus the mean score of the other members of their group (consecutive runs of `group`).

    The baseline of each sample comes from the other samples of the same prompt only, so the policy
    gradient stays unbiased (Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free!").
    """
    if group == 1:
        return scores
    grouped = scores.view(-1, group)  # (n_prompts, group)
    others = (grouped.sum(1, keepdim=True) - grouped) / (group - 1)
    return (grouped - others).reshape(-1)


def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards per response token: -kl_coef * KL on every token, plus the score on the last one.

    Returns `(rewards, kl)`, both (B, T) and zero outside `mask`; rows of `mask` must be a prefix of ones
    (responses are right-padded after their end).
    """
    kl = kl_estimate(logprobs, ref_logprobs) * mask  # (B, T)
    rewards = -kl_coef * kl  # (B, T)
    last = mask.sum(1).long() - 1  # (B,) index of each response's last token
    rewards[torch.arange(len(scores)), last.clamp(min=0)] += scores * (last >= 0)
    return rewards, kl


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
                lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1}, with V = 0 after the
    last response token (the episode ends there). Returns `(advantages, returns)`, returns = A + V.
    """
    values = values * mask  # (B, T)
    rewards = rewards * mask  # (B, T)
    T = rewards.shape[1]
    last_gae = torch.zeros_like(rewards[:, 0])  # (B,)
    advantages_reversed = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t < T - 1 else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last_gae = (delta + gamma * lam * last_gae) * mask[:, t]
        advantages_reversed.append(last_gae)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    returns = (advantages + values) * mask  # (B, T)
    return advantages, returns


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise.

    Returns `(loss, clip_frac, approx_kl)`: loss = mean(max(-A r, -A clip(r, 1-c, 1+c))), clip_frac the
    share of tokens where the clipped term is the larger one, approx_kl = mean(0.5 (log r)^2).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(losses, losses_clipped), mask)
    clip_frac = masked_mean((losses_clipped > losses).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio ** 2, mask)
    return loss, clip_frac, approx_kl


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss: 0.5 * mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2)).

    Returns `(loss, clip_frac)` where clip_frac is the share of tokens where the clipped term is larger.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    losses = (values - returns) ** 2
    losses_clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(losses, losses_clipped), mask)
    clip_frac = masked_mean((losses_clipped > losses).float(), mask)
    return loss, clip_frac
