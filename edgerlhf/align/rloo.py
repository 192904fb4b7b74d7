"""RLOO — REINFORCE Leave-One-Out (Ahmadian et al. 2024, "Back to Basics"; Kool et al. 2019), one step of the
alignment stage.

The stage (`edgerlhf.align.run`) calls `rloo_step` when `algorithm = "rloo"`; the models, the rollouts,
the log-prob passes and the minibatch loop are the ones PPO uses (`align.policy`, `align.rollout`). What is RLOO's own:

- k = `ppo.samples_per_prompt` responses of each prompt. A response is one action: its reward is the
  reward model's score minus beta * KL(policy || reference) of the whole response (the sum of its
  tokens' log-ratios, k1, as the paper and TRL: the KL is in the reward, not the loss; between the policy's
  sampler and the reference's own, as PPO's penalty: 0 for an unchanged policy, and it sees a collapse),
  less `ppo.missing_eos_penalty` for an answer cut at the cap, and its
  advantage is that reward minus the mean reward of the other k - 1 responses to the prompt, an
  unbiased baseline without a value head.
- the loss is PPO's clipped surrogate on the sequence's ratio, exp(sum of the response's log-prob
  changes), as a mean over responses.

Choices, against TRL 1.16's `RLOOTrainer` (`trl/trainer/rloo_trainer.py`), which it follows:
- beta = `ppo.init_kl_coef`, fixed (TRL's `beta`, default 0.05); the KL is that of the rollout policy
  (no gradient through it), as TRL's `old_per_token_logps - ref_per_token_logps`.
- `ppo.whiten_rewards` is TRL's `normalize_advantages`: the advantages are whitened over the batch.
- sequence-level ratio and per-sequence mean, clipped with the symmetric `ppo.cliprange` (TRL's
  `epsilon`); `ppo_epochs` is TRL's `num_iterations`. No entropy bonus (TRL has none for RLOO).
- PPO fields RLOO does not read: the value head's (`vf_coef`, `cliprange_value`), `gamma`, `lam`,
  `ent_coef`, `adaptive_kl`, `target_kl`, `kl_horizon`.
"""

from __future__ import annotations

import time

import torch

from edgerlhf.align.losses import leave_one_out, whiten
from edgerlhf.align.policy import PolicyModels
from edgerlhf.align.rollout import (StepMicroBatches, minibatch_updates, rollout_args, rollout_logprobs,
                                    sample_and_score, step_metrics, training_scores)
from edgerlhf.generation import Rollouts, Sampling, policy_stats

# --- RLOO math: pure functions on per-response (B,) tensors ---------------------------------------


def rloo_rewards(scores: torch.Tensor, seq_kl: torch.Tensor, beta: float) -> torch.Tensor:
    """Reward of each response (B,): its score minus beta times its KL to the reference (summed over tokens)."""
    return scores - beta * seq_kl


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Each reward minus the mean reward of the other k - 1 responses to its prompt (consecutive groups of k)."""
    return leave_one_out(rewards, k)


def rloo_loss(seq_logprobs: torch.Tensor, old_seq_logprobs: torch.Tensor, advantages: torch.Tensor,
              cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate on each response's ratio exp(log pi(y|x) - log pi_old(y|x)), a mean over responses.

    All arguments are (B,): the log-probability of each whole response under the policy being trained
    (with gradient) and under the one that sampled it, and its advantage. Returns `(loss, stats)` with
    `policy_loss`, `clip_frac` (responses where the clipped term is the larger) and `approx_kl`.
    """
    log_ratio = seq_logprobs - old_seq_logprobs  # (B,)
    ratio = torch.exp(log_ratio)
    losses = -advantages * ratio
    losses_clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = torch.maximum(losses, losses_clipped).mean()
    clip_frac = (losses_clipped > losses).float().mean()
    approx_kl = 0.5 * (log_ratio ** 2).mean()
    return loss, {"policy_loss": loss, "clip_frac": clip_frac, "approx_kl": approx_kl}


# --- the step -------------------------------------------------------------------------------------


def rloo_step(models: PolicyModels, optimizer, kl_ctl, batch_prompts: list[str], cfg,
              micro: StepMicroBatches | None = None, step: int = 0) -> tuple[dict, Rollouts, torch.Tensor]:
    """One RLOO iteration on a batch of prompts, each `cfg.samples_per_prompt` times in a row: rollouts, rewards
    with the KL penalty, leave-one-out advantages, `ppo_epochs` of clipped sequence-level updates.

    Returns the step's metrics (`rloo/...`), the rollouts and their scores. Each phase runs in `micro`'s
    micro-batches and, out of memory, again in halves (`edgerlhf.oom`).
    """
    t0 = time.perf_counter()
    sampling = Sampling.of(cfg)
    micro = micro or StepMicroBatches.of(cfg)
    beta = kl_ctl.value  # fixed at `ppo.init_kl_coef` (`ppo.kl_controller`)

    # 1. Rollouts: k responses to each prompt from the policy, scored by the reward model.
    rollouts, scores, parts = sample_and_score(models, batch_prompts, cfg, sampling, micro, step)  # scores (B,)
    t_gen = time.perf_counter() - t0

    # 2. Log-probs of the sampled tokens under the policy that drew them and under the reference (no grad).
    b = rollout_logprobs(models, rollouts, cfg, sampling, micro, step)  # (B, T) each
    b_mask = rollouts.response_mask.float()  # (B, T)
    b_old_seq_logprobs = (b.logprobs * b_mask).sum(1)  # (B,) the sampler's: the ratio's
    b_penalty_kl = ((b.logprobs - b.ref_sampler_logprobs) * b_mask).sum(1)  # (B,) k1, summed over the response

    # 3. Rewards with the KL penalty (and the missing-EOS one), advantages against the other responses to the prompt.
    b_rewards = rloo_rewards(training_scores(scores, rollouts, cfg), b_penalty_kl, beta)  # (B,)
    b_advantages = rloo_advantages(b_rewards, cfg.samples_per_prompt)  # (B,)
    b_advantages = whiten(b_advantages) if cfg.whiten_rewards else b_advantages  # (B,)

    # 4. `ppo_epochs` over shuffled minibatches: the clipped surrogate of whole responses, a mean over responses.
    def piece_loss(piece: torch.Tensor):
        logits, _ = models.forward(*rollout_args(rollouts, piece), sampling)  # (m, T, V)
        mb_logprobs = policy_stats(logits, rollouts.response_ids[piece], sampling, whole=False).logprobs  # (m, T)
        mb_seq_logprobs = (mb_logprobs * b_mask[piece]).sum(1)  # (m,)
        return rloo_loss(mb_seq_logprobs, b_old_seq_logprobs[piece], b_advantages[piece], cfg.cliprange)

    stats = minibatch_updates(models.policy_parameters(), optimizer, cfg, micro, step, torch.ones_like(scores),
                              piece_loss)

    metrics = step_metrics("rloo", scores, rollouts, b, {
        "kl_coef": beta, "non_score_reward": (-beta * b_penalty_kl).mean().item(), **stats,
        "rlhf_reward_mean": b_rewards.mean().item(), **models.reward_diagnostics()}, t0, t_gen, parts)
    return metrics, rollouts, scores
