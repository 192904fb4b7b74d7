"""What every step of a sampling algorithm (PPO, GRPO, RLOO) shares: draw and score a batch of rollouts, the
log-probs of its tokens under the policy and the reference, `ppo_epochs` of minibatch updates around the
algorithm's own loss, and the metrics every algorithm logs alike.

A step reads top to bottom in its own module (`ppo.ppo_step`, `grpo.grpo_step`, `rloo.rloo_step`) and calls these
phases in order, as TRL's trainers share `RepeatSampler` and `_generate_and_score_completions` (TRL 1.16) and
OpenRLHF's trainers its `experience_maker`. Every phase runs in micro-batches that halve on out-of-memory errors
(`edgerlhf.oom`).

Sampling and log-probs agree: rollouts are drawn with temperature, top-k and top-p, and the ratio of every
algorithm uses the probability of a token under exactly that distribution; both go through one definition,
`edgerlhf.generation.Sampling`. Every KL to the reference is taken between the whole temperature-scaled
distributions instead (`generation.TokenStats`): the sampler's support would hide a collapse.

Beside what the step trains on (the proxy), the loop scores the same rollouts with what it does not train on
(`independent_metrics`): the validation reward model and, on the known-answer task, the gold. A proxy that climbs
while these do not is reward hacking (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from edgerlhf import gold
from edgerlhf.align.losses import masked_mean
from edgerlhf.align.policy import PolicyModels
from edgerlhf.contract import algorithm_metric
from edgerlhf.config import independent_gold as config_independent_gold
from edgerlhf.generation import (Rollouts, Sampling, concat_rollouts, generate, policy_stats, sampler_logprobs,
                                 whole_distributions)
from edgerlhf.oom import MicroBatch, chunks, planner_hint
from edgerlhf.reward import spearman


@dataclass
class StepMicroBatches:
    """The micro-batches a step of PPO, GRPO or RLOO cuts its work into, each halved on its own out-of-memory
    errors (`edgerlhf.oom`): rows per `generate` call, and rollouts per forward/backward pass."""

    rollouts: MicroBatch
    passes: MicroBatch

    @classmethod
    def of(cls, cfg, ctx=None, device=None, config=None) -> StepMicroBatches:
        algorithm = config.algorithm if config is not None else "ppo"

        def hint() -> str:
            return planner_hint(config, "ppo") if config is not None else ""
        return cls(MicroBatch(cfg.batch_size, f"{algorithm} rollout generation", ctx, device, planner_hint=hint),
                   MicroBatch(cfg.mini_batch_size, algorithm, ctx, device, planner_hint=hint))


def rollout_args(rollouts: Rollouts, rows) -> tuple[torch.Tensor, ...]:
    """What `PolicyModels.forward` takes for some rows of a rollout batch: query ids and mask, response ids and mask."""
    return (rollouts.query_ids[rows], rollouts.query_mask[rows], rollouts.response_ids[rows],
            rollouts.response_mask[rows])


def sample_and_score(models: PolicyModels, batch_prompts: list[str], cfg, sampling: Sampling,
                     micro: StepMicroBatches, step: int) -> tuple[Rollouts, torch.Tensor, dict[str, torch.Tensor]]:
    """A step's rollouts, one response per entry of `batch_prompts` drawn by the policy (`micro.rollouts` rows
    per `generate` call), their scores (B,) and, with stated rewards, each component's ({} otherwise);
    `rollouts.capped` says which ran into the cap."""
    rollouts = micro.rollouts.run(step, lambda size: concat_rollouts(
        [generate(models.model, models.tokenizer, batch_prompts[rows], cfg.response_length, sampling)
         for rows in chunks(len(batch_prompts), size)], models.tokenizer.pad_token_id))
    scores, parts = models.score_parts(rollouts.prompts, rollouts.responses)
    return rollouts, scores.to(models.device), parts


@dataclass
class RolloutStats:
    """The sampled tokens seen by the policy that drew them and by the reference, each (B, T), no gradients."""

    logprobs: torch.Tensor
    """Under the sampler's distribution (top-k/top-p support): the importance ratio's old log-probs, and the policy
    side of PPO's and RLOO's k1 penalty."""
    full_logprobs: torch.Tensor
    """Under the policy's whole temperature-scaled distribution: the policy side of GRPO's k3."""
    ref_logprobs: torch.Tensor
    """Under the reference's whole temperature-scaled distribution: the reference side of GRPO's k3."""
    ref_sampler_logprobs: torch.Tensor
    """Under the reference's own sampler (`generation.sampler_logprobs`): the reference side of the k1 penalties."""
    kl: torch.Tensor
    """The exact KL(policy || reference) of the two whole next-token distributions at each position."""
    entropy: torch.Tensor
    """Of the sampler's distribution."""
    values: torch.Tensor | None
    """The critic's, None without a value head."""


def rollout_logprobs(models: PolicyModels, rollouts: Rollouts, cfg, sampling: Sampling, micro: StepMicroBatches,
                     step: int) -> RolloutStats:
    """`RolloutStats` of a batch of rollouts, in passes of at most `mini_batch_size` rollouts (fewer after
    out-of-memory errors)."""
    def attempt(size: int):
        out = []
        with torch.no_grad():
            for rows in chunks(len(rollouts.prompts), min(size, cfg.mini_batch_size)):
                tokens = rollouts.response_ids[rows]  # (M, T)
                logits, values = models.forward(*rollout_args(rollouts, rows), sampling)  # (M, T, V), (M, T)
                ref_logits = models.reference_logits(*rollout_args(rollouts, rows), sampling)  # (M, T, V)
                own = policy_stats(logits, tokens, sampling, whole=False)
                full, ref_full, kl = whole_distributions(logits, ref_logits, tokens)
                out.append((own.logprobs, full, ref_full, sampler_logprobs(ref_logits, tokens, sampling), kl,
                            own.entropy, values))
                del logits, ref_logits
        return RolloutStats(*(None if parts[0] is None else torch.cat(parts) for parts in zip(*out)))

    return micro.passes.run(step, attempt)


def sequence_kl(stats: RolloutStats, mask: torch.Tensor) -> torch.Tensor:
    """The exact KL(policy || reference) of each response (B,): its positions' `stats.kl`, summed."""
    return (stats.kl * mask).sum(1)


def length_slope(scores: torch.Tensor, lengths: torch.Tensor) -> float:
    """The least-squares slope (B,) -> float of `scores` on `lengths` over a batch: score per token of length; 0
    where every length is the same."""
    x = lengths.to(torch.float64) - lengths.to(torch.float64).mean()
    spread = (x * x).sum()
    return 0.0 if spread == 0 else ((x * scores.to(torch.float64)).sum() / spread).item()


def training_scores(scores: torch.Tensor, rollouts: Rollouts, cfg) -> torch.Tensor:
    """The scores (B,) a step learns from: the reward model's, less their linear trend on length with
    `cfg.length_control` (`length_slope`, about the batch's mean length), minus `cfg.missing_eos_penalty` for an
    answer cut at the cap, which the reward model scored as if it had ended (the missing-EOS penalty of TRL's PPO
    and RLOO recipes)."""
    if cfg.length_control:
        lengths = rollouts.response_mask.sum(1).to(scores.dtype)  # (B,)
        scores = scores - length_slope(scores, lengths) * (lengths - lengths.mean())
    return scores - cfg.missing_eos_penalty * rollouts.capped.to(scores.dtype)


def minibatch_updates(params: list[nn.Parameter], optimizer, cfg, micro: StepMicroBatches, step: int,
                      row_weights: torch.Tensor,
                      piece_loss: Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]
                      ) -> dict[str, float]:
    """`ppo_epochs` passes over the rollout batch in shuffled minibatches of `mini_batch_size` rollouts, with an
    optimizer step (after gradient clipping) every `grad_accum` minibatches; returns each statistic's mean over
    the minibatches.

    `piece_loss(rows)` is the algorithm: its loss on some rollouts of a minibatch and its statistics, each a
    mean over the units that loss averages, tokens or sequences (`row_weights` (B,) counts them per rollout).
    A minibatch runs in pieces of `micro.passes` rollouts, halved on out-of-memory errors; each piece is
    weighted by its share of the minibatch's units, so the gradients and the statistics are the whole
    minibatch's, and a failed attempt's gradients are rolled back before it is retried.
    """
    def update(mb: torch.Tensor, size: int) -> dict[str, float]:
        saved = [None if p.grad is None else p.grad.clone() for p in params]
        mb_stats: dict[str, float] = {}
        units = row_weights[mb].sum().clamp(min=1)
        try:
            for rows in chunks(len(mb), size):
                piece = mb[rows]
                share = row_weights[piece].sum() / units
                loss, stats = piece_loss(piece)
                (loss * share / cfg.grad_accum).backward()
                for key, value in stats.items():
                    mb_stats[key] = mb_stats.get(key, 0.0) + (value * share).item()
                del loss
        except Exception:
            for p, grad in zip(params, saved):
                p.grad = grad
            raise
        return mb_stats

    history: dict[str, list[float]] = {}
    n_minibatches = cfg.batch_size // cfg.mini_batch_size
    for _epoch in range(cfg.ppo_epochs):
        order = torch.randperm(cfg.batch_size, device=row_weights.device)
        for k in range(n_minibatches):
            mb = order[k * cfg.mini_batch_size:(k + 1) * cfg.mini_batch_size]
            mb_stats = micro.passes.run(step, lambda size: update(mb, size))
            if (k + 1) % cfg.grad_accum == 0:
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            for key, value in mb_stats.items():
                history.setdefault(key, []).append(value)
    return {key: float(np.mean(values)) for key, values in history.items()}


def step_metrics(algorithm: str, scores: torch.Tensor, rollouts: Rollouts, stats: RolloutStats,
                 own: dict[str, float], t0: float, t_gen: float,
                 parts: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """A step's metrics under the algorithm's namespace (`contract.algorithm_metric`): those every sampling
    algorithm logs alike (the scores (B,) before any penalty, the exact KL(policy || reference) per response,
    entropy, length, the share of answers cut at the cap, speed, each stated reward's mean and std), then the
    algorithm's `own`."""
    elapsed = time.perf_counter() - t0
    b_mask = rollouts.response_mask.float()  # (B, T)
    common = {
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl": sequence_kl(stats, b_mask).mean().item(),
        "entropy": masked_mean(stats.entropy, b_mask).item(),
        "response_length": b_mask.sum(1).mean().item(),
        "length_slope": length_slope(scores, b_mask.sum(1)),
        "cap_hit_rate": rollouts.capped.float().mean().item(),
        "tokens_per_s": b_mask.sum().item() / elapsed,
        "generation_s": t_gen,
        "step_s": elapsed,
    }
    for name, values in (parts or {}).items():
        common[f"rewards/{name}_mean"] = values.mean().item()
        common[f"rewards/{name}_std"] = values.std().item() if len(values) > 1 else 0.0
    return {algorithm_metric(algorithm, key): value for key, value in {**common, **own}.items()}


def independent_gold(config) -> str | None:
    """The gold scorer that judges the rollouts beside the proxy, or None (`config.independent_gold`: the rule lives
    with the configuration, which checks `ppo.keep_best: gold` against it)."""
    return config_independent_gold(config)


def independent_metrics(algorithm: str, models: PolicyModels, rollouts: Rollouts, scores: torch.Tensor,
                        gold_scorer: str | None = None) -> dict[str, float]:
    """What the policy is not trained on, of the rollouts whose scores (B,) (the proxy, before any penalty) the step
    learned from: the validation reward model's scores (`validation_reward_mean`, `_std`) when the models have one,
    the gold's (`gold_mean`, `_std`) when `gold_scorer` is given, and how the proxy ranks the rollouts against each
    (Spearman's rank correlation, `proxy_validation_spearman`, `proxy_gold_spearman`; left out of a step where a side
    is constant). Under the algorithm's namespace."""
    proxy = scores.detach().float().cpu()
    signals: dict[str, torch.Tensor] = {}
    if models.validation_model is not None:
        signals["validation"] = models.validation_score(rollouts.prompts, rollouts.responses).float().cpu()  # (B,)
    if gold_scorer is not None:
        signals["gold"] = torch.tensor(gold.score_batch(rollouts.prompts, rollouts.responses, gold_scorer))  # (B,)
    out: dict[str, float] = {}
    for name, values in signals.items():
        mean_key = "validation_reward" if name == "validation" else name
        out[f"{mean_key}_mean"] = values.mean().item()
        out[f"{mean_key}_std"] = values.std().item() if len(values) > 1 else 0.0
        rho = spearman(proxy, values) if len(values) > 1 else float("nan")
        if np.isfinite(rho):
            out[f"proxy_{name}_spearman"] = rho
    return {algorithm_metric(algorithm, key): value for key, value in out.items()}
