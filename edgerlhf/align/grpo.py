"""GRPO — Group Relative Policy Optimization (Shao et al. 2024, "DeepSeekMath"), one step of the alignment stage.

The stage (`edgerlhf.align.run`) calls `grpo_step` when `algorithm = "grpo"`; the models, the rollouts,
the log-prob passes and the minibatch loop are the ones PPO uses (`align.policy`, `align.rollout`). What is GRPO's own:

- G = `ppo.samples_per_prompt` responses of each prompt, scored by the reward model; each response's
  advantage is its score against its group, (r - mean_group) / (std_group + eps), the same for every
  one of its tokens. The group is the baseline: no value head, no GAE.
- the loss per token is PPO's clipped surrogate plus beta * KL(policy || reference) with Schulman's k3
  estimator, which is >= 0 and whose gradient pulls the policy back to the reference (DeepSeekMath's
  choice; the KL sits in the loss, not in the reward). The surrogate's ratio uses the sampler's log-probs
  (top-k/top-p support); k3 uses the whole temperature-scaled distributions of both, so it is 0 for an
  unchanged policy and keeps a gradient where one token holds more than `top_p` (`generation.TokenStats`).

Choices, against TRL 1.16's `GRPOTrainer` (`trl/trainer/grpo_trainer.py`):
- advantages: TRL's default `scale_rewards="group"`: the group's unbiased std (`nanstd`) and eps = 1e-4.
- loss aggregation: token-level, a mean over every response token of a minibatch (TRL's `bnpo`, which is
  its default `dapo` when `grad_accum` = 1, as in every preset here). Not the paper's per-sequence mean
  (TRL's `grpo`): dividing by each response's length favours short correct answers and long wrong ones
  (Liu et al. 2025, "Dr. GRPO"), and a run that drifts to longer or shorter answers is exactly what this
  project's known-answer checks measure. It is also how PPO's loss aggregates, so the two compare.
- beta = `ppo.init_kl_coef`, kept fixed (TRL's `beta`; its default 0.0 drops the reference, DeepSeekMath
  used 0.04); the adaptive controller is PPO's only. With beta = 0 the reference pass is still run for
  the logged KL.
- `ppo_epochs` is TRL's `num_iterations` (mu) and `ppo.cliprange` its symmetric `epsilon`; the ratio is
  per token (TRL's default `importance_sampling_level="token"`). `ppo.ent_coef` adds TRL's entropy bonus.
- PPO fields GRPO does not read: the value head's (`vf_coef`, `cliprange_value`), `gamma`, `lam`,
  `whiten_rewards` (the group normalises), `adaptive_kl`, `target_kl`, `kl_horizon`.
"""

from __future__ import annotations

import time

import torch

from edgerlhf.align.losses import clipped_policy_loss, kl_estimate, masked_mean
from edgerlhf.align.policy import PolicyModels
from edgerlhf.align.rollout import (StepMicroBatches, minibatch_updates, rollout_args, rollout_logprobs,
                                    sample_and_score, step_metrics, training_scores)
from edgerlhf.generation import Rollouts, Sampling, policy_stats

# --- GRPO math: pure functions; `mask` (B, T) is 1 on response tokens -----------------------------


def group_advantages(scores: torch.Tensor, group: int, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean of its group) / (std of its group + eps) for scores (B,) in consecutive groups of `group`.

    The std is the unbiased one (as TRL's `nanstd`); a group whose responses all scored the same gets
    advantages 0: it has nothing to teach.
    """
    grouped = scores.view(-1, group)  # (n_prompts, G)
    mean = grouped.mean(1, keepdim=True)  # (n_prompts, 1)
    std = grouped.std(1, keepdim=True)  # (n_prompts, 1)
    return ((grouped - mean) / (std + eps)).reshape(-1)  # (B,)


def grpo_loss(logprobs: torch.Tensor, full_logprobs: torch.Tensor, old_logprobs: torch.Tensor,
              ref_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float,
              beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's loss, a mean over the response tokens: clipped surrogate + beta * k3 KL to the reference.

    `logprobs` (B, T) (the sampler's distribution, for the ratio) and `full_logprobs` (the whole distribution,
    for the KL) carry the gradient; `old_logprobs` are the sampler's when the rollouts were drawn,
    `ref_logprobs` the reference's whole distribution's; `advantages` (B,) hold one value per response.
    Returns `(loss, stats)` with `policy_loss`, `k3_kl` (mean per token), `clip_frac` and `approx_kl`.
    """
    token_advantages = advantages[:, None].expand_as(logprobs)  # (B, T)
    pg_loss, clip_frac, approx_kl = clipped_policy_loss(logprobs, old_logprobs, token_advantages, mask, cliprange)
    kl = masked_mean(kl_estimate(full_logprobs, ref_logprobs, "k3"), mask)
    loss = pg_loss + beta * kl
    return loss, {"policy_loss": pg_loss, "k3_kl": kl, "clip_frac": clip_frac, "approx_kl": approx_kl}


# --- the step -------------------------------------------------------------------------------------


def grpo_step(models: PolicyModels, optimizer, kl_ctl, batch_prompts: list[str], cfg,
              micro: StepMicroBatches | None = None, step: int = 0) -> tuple[dict, Rollouts, torch.Tensor]:
    """One GRPO iteration on a batch of prompts, each `cfg.samples_per_prompt` times in a row: rollouts, group
    advantages, `ppo_epochs` of clipped updates with the k3 KL in the loss.

    Returns the step's metrics (`grpo/...`), the rollouts and their scores. Each phase runs in `micro`'s
    micro-batches and, out of memory, again in halves (`edgerlhf.oom`).
    """
    t0 = time.perf_counter()
    sampling = Sampling.of(cfg)
    micro = micro or StepMicroBatches.of(cfg)
    beta = kl_ctl.value  # fixed at `ppo.init_kl_coef` (`ppo.kl_controller`)

    # 1. Rollouts: G responses to each prompt from the policy, scored by the reward model.
    rollouts, scores, parts = sample_and_score(models, batch_prompts, cfg, sampling, micro, step)  # scores (B,)
    t_gen = time.perf_counter() - t0

    # 2. Log-probs of the sampled tokens under the policy that drew them and under the reference (no grad).
    b = rollout_logprobs(models, rollouts, cfg, sampling, micro, step)  # (B, T) each
    b_mask = rollouts.response_mask.float()  # (B, T)

    # 3. Advantages: each score (less the missing-EOS penalty of a capped answer) against the other responses to
    #    its prompt, on every token of the response.
    b_advantages = group_advantages(training_scores(scores, rollouts, cfg), cfg.samples_per_prompt)  # (B,)

    # 4. `ppo_epochs` over shuffled minibatches: loss = clipped surrogate + beta * k3 - ent_coef * entropy,
    #    each a mean over the piece's response tokens.
    def piece_loss(piece: torch.Tensor):
        mb_mask = b_mask[piece]  # (m, T)
        logits, _ = models.forward(*rollout_args(rollouts, piece), sampling)  # (m, T, V)
        mb = policy_stats(logits, rollouts.response_ids[piece], sampling)  # (m, T) each
        loss, stats = grpo_loss(mb.logprobs, mb.full_logprobs, b.logprobs[piece], b.ref_logprobs[piece],
                                b_advantages[piece], mb_mask, cfg.cliprange, beta)
        loss = loss - cfg.ent_coef * masked_mean(mb.entropy, mb_mask)
        return loss, stats

    stats = minibatch_updates(models.policy_parameters(), optimizer, cfg, micro, step, b_mask.sum(1), piece_loss)

    metrics = step_metrics("grpo", scores, rollouts, b, {
        "kl_coef": beta, **stats, "advantage_abs_mean": b_advantages.abs().mean().item(),
        **models.reward_diagnostics()}, t0, t_gen, parts)
    return metrics, rollouts, scores
