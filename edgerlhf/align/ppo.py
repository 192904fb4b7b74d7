"""PPO — one step of the alignment stage with `algorithm = "ppo"`, and the KL controller.

PPO follows the RLHF recipe of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") as
implemented by TRL's old `PPOTrainer` and "The N Implementation Details of RLHF with PPO" (Huang et al.
2023), laid out like CleanRL's `ppo.py`: `ppo_step` is the whole algorithm in one function that reads top
to bottom: generate, score (optionally against a leave-one-out baseline over several samples per prompt),
per-token KL penalty with the score on the last token, GAE, whitening, `ppo_epochs` of clipped
policy + value loss (- entropy bonus) over shuffled minibatches with gradient accumulation. The phases it
shares with GRPO and RLOO are `edgerlhf.align.rollout`'s; its maths is `edgerlhf.align.losses`'.

The ratio uses the probability a token was drawn with (the sampler's top-k/top-p distribution). The per-token KL
penalty is k1 on the sampled token between the two samplers, the policy's and the reference's own
(`generation.sampler_logprobs`): exactly 0 for an unchanged policy, and it sees a policy collapsed onto one token
(where a reference renormalised on the policy's support would read 0). Against the policy's whole distribution
instead, k1 turned into a bonus for flattening (-42 nats per answer after 30 steps of a known-answer run, whose
answers then ran to the cap): the sampler never draws the tail where that policy exceeds the reference. The KL the
controller steers by and the logs show is the exact one of the two whole distributions at each position.
An answer cut at `response_length` loses `missing_eos_penalty` from its score (`rollout.training_scores`).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from edgerlhf.align.losses import (clipped_policy_loss, clipped_value_loss, compute_gae, leave_one_out, masked_mean,
                                   masked_whiten, per_token_rewards, whiten)
from edgerlhf.align.policy import PolicyModels
from edgerlhf.align.rollout import (StepMicroBatches, minibatch_updates, rollout_args, rollout_logprobs,
                                    sample_and_score, sequence_kl, step_metrics, training_scores)
from edgerlhf.contract import algorithm_traits
from edgerlhf.generation import Rollouts, Sampling, policy_stats

# --- the KL coefficient ---------------------------------------------------------------------------


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Adaptive KL coefficient of Ziegler et al. 2019 (TRL's old `AdaptiveKLController`).

    e = clip(KL / target - 1, -0.2, 0.2);  beta <- beta * (1 + e * n_steps / horizon),
    where KL is the mean KL per response of the last batch and n_steps the samples in it.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        super().__init__(init_kl_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = float(np.clip(current_kl / self.target - 1.0, -0.2, 0.2))
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def kl_controller(config) -> FixedKLController:
    """The KL coefficient of the alignment stage: PPO's adaptive controller when `ppo.adaptive_kl`, else (and
    always for GRPO and RLOO, whose beta is fixed as TRL's) `ppo.init_kl_coef` held constant."""
    cfg = config.ppo
    if cfg.adaptive_kl and algorithm_traits(config.algorithm).adaptive_kl:
        return AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.init_kl_coef)


# --- the step -------------------------------------------------------------------------------------


def ppo_step(models: PolicyModels, optimizer, kl_ctl, batch_prompts: list[str], cfg,
             micro: StepMicroBatches | None = None, step: int = 0) -> tuple[dict, Rollouts, torch.Tensor]:
    """One PPO iteration on a batch of prompts: rollouts, rewards, advantages, `ppo_epochs` of updates.

    Returns the step's metrics (`ppo/...`), the rollouts and their scores. Each phase runs in `micro`'s
    micro-batches and, out of memory, again in halves (the minibatch's gradients and statistics stay those
    of the whole minibatch).
    """
    t0 = time.perf_counter()
    sampling = Sampling.of(cfg)
    micro = micro or StepMicroBatches.of(cfg)

    # 1. Rollouts: generate with the policy, score with the reward model.
    rollouts, scores, parts = sample_and_score(models, batch_prompts, cfg, sampling, micro, step)  # scores (B,)
    t_gen = time.perf_counter() - t0

    # 2. Log-probs of policy and reference, KL, entropy and values of the sampled tokens (no grad).
    b = rollout_logprobs(models, rollouts, cfg, sampling, micro, step)  # (B, T) each
    b_logprobs, b_values = b.logprobs, b.values  # the sampler's log-probs: the ratio's
    b_mask = rollouts.response_mask.float()  # (B, T)

    # 3. Rewards: KL penalty on every token (the policy's sampler against the reference's), the score on the last, less
    #    the missing-EOS penalty of a capped answer; then GAE and whitening.
    b_scores = leave_one_out(training_scores(scores, rollouts, cfg), cfg.samples_per_prompt)  # (B,)
    b_scores = whiten(b_scores) if cfg.whiten_rewards else b_scores  # (B,)
    b_rewards, b_penalty_kl = per_token_rewards(b_scores, b_logprobs, b.ref_sampler_logprobs, b_mask,
                                                kl_ctl.value)  # (B, T)
    b_advantages, b_returns = compute_gae(b_rewards, b_values, b_mask, cfg.gamma, cfg.lam)  # (B, T)
    b_advantages = masked_whiten(b_advantages, b_mask)  # (B, T)

    # 4. PPO epochs over shuffled minibatches; the loss of a piece of one, as means over its tokens.
    def piece_loss(piece: torch.Tensor):
        mb_mask = b_mask[piece]  # (m, T)
        logits, mb_values = models.forward(*rollout_args(rollouts, piece), sampling)  # (m, T, V), (m, T)
        mb = policy_stats(logits, rollouts.response_ids[piece], sampling, whole=False)
        pg_loss, clip_frac, approx_kl = clipped_policy_loss(mb.logprobs, b_logprobs[piece], b_advantages[piece],
                                                            mb_mask, cfg.cliprange)
        v_loss, vf_clip_frac = clipped_value_loss(mb_values, b_values[piece], b_returns[piece], mb_mask,
                                                  cfg.cliprange_value)
        mb_entropy = masked_mean(mb.entropy, mb_mask)
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * mb_entropy
        return loss, {"policy_loss": pg_loss, "value_loss": v_loss, "clip_frac": clip_frac,
                      "vf_clip_frac": vf_clip_frac, "approx_kl": approx_kl}

    stats = minibatch_updates(models.policy_parameters(), optimizer, cfg, micro, step, b_mask.sum(1), piece_loss)

    # 5. The KL controller moves towards its target with this batch's exact KL per response.
    kl_coef = kl_ctl.value
    kl_ctl.update(sequence_kl(b, b_mask).mean().item(), cfg.batch_size)

    metrics = step_metrics("ppo", scores, rollouts, b, {
        "kl_coef": kl_coef, "non_score_reward": -kl_coef * b_penalty_kl.sum(1).mean().item(), **stats,
        "returns_mean": masked_mean(b_returns, b_mask).item(), **models.reward_diagnostics()},
        t0, t_gen, parts)
    return metrics, rollouts, scores
