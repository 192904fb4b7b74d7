"""Stage 4 — the alignment stage: PPO, GRPO or RLOO against the reward model (DPO: `edgerlhf.dpo`).

`run(config, ctx)` is the stage for every algorithm that samples from the policy (`config.algorithm`):
prompts, the models, checkpoints and resume, metrics under the algorithm's namespace (`ppo/...`,
`grpo/...`, `rloo/...`), samples and probes; each step is the algorithm's own function:
`ppo_step` here, `grpo.grpo_step` (group-normalised advantages, k3 KL in the loss, no value head) and
`rloo.rloo_step` (leave-one-out baseline, KL in the reward, no value head). `algorithm = "dpo"` hands the
stage to `edgerlhf.dpo.run`, which trains offline on the preference pairs.

PPO follows the RLHF recipe of Ziegler et al. 2019 ("Fine-Tuning Language Models from Human Preferences") as
implemented by TRL's old `PPOTrainer` and "The N Implementation Details of RLHF with PPO" (Huang et al.
2023), laid out like CleanRL's `ppo.py`: small pure functions for the math at the top, then the models,
the phases every sampling algorithm shares (sample and score, log-probs of the rollouts, minibatch
updates), then `ppo_step` — the whole algorithm in one function that reads top to bottom: generate,
score (optionally against a leave-one-out baseline over several samples per prompt), per-token KL
penalty with the score on the last token, GAE, whitening, `ppo_epochs` of clipped
policy + value loss (- entropy bonus) over shuffled minibatches with gradient accumulation.

Sampling and log-probs agree: rollouts are drawn with temperature, top-k and top-p, and the ratio of
every algorithm uses the probability of a token under exactly that distribution; both go through one
definition, `edgerlhf.generation.Sampling`. The reference is scored on the same support, so the KL
estimate is 0 for an unchanged policy and cannot go negative in expectation (see `generation.policy_stats`).

Memory design — one copy of the base network, whichever algorithm:
- `sft/merged` is loaded once; the policy is a trainable LoRA adapter named `policy` on it (peft);
- the reference policy is the same model under `with model.disable_adapter():`;
- PPO's value head is a small linear head on the policy's last hidden states (shared trunk, as TRL's
  `AutoModelForCausalLMWithValueHead`); GRPO and RLOO have none;
- a bf16 reward model is the reward LoRA loaded as a second, frozen adapter named `reward` on the same
  model plus its score head; scoring switches adapters with peft's `set_adapter`.
- An int8/int4 reward model cannot share bf16 weights: by default it is loaded with
  `models.load_reward_model` and adds one quantized copy of the network (about 1/2 or 1/4 of its bf16
  size). With `ppo.quantized_policy` the one network is instead loaded in int8/int4 and everything
  shares it, QLoRA-style (Dettmers et al. 2023): the policy LoRA trains on the quantized base and the
  reference is that quantized base.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from edgerlhf import gold, memory
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import PPO_ADAPTER, TEST_PREFS, TRAIN_PREFS, algorithm_metric, reward_dir
from edgerlhf.errors import MissingPrerequisite
from edgerlhf.generation import (Rollouts, Sampling, concat_rollouts, forward_response, generate, policy_stats,
                                 sample_probes)
from edgerlhf.models import checkpointed_layers, compute_dtype, dtype_name, resolve_device
from edgerlhf.oom import MicroBatch, chunks, planner_hint
from edgerlhf.reports import PPOReport

# --- PPO math: pure functions on (B, T) tensors, `mask` is 1 on response tokens -------------------


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
    if cfg.adaptive_kl and config.algorithm == "ppo":
        return AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon)
    return FixedKLController(cfg.init_kl_coef)


# --- the models: one copy of the base network -----------------------------------------------------

POLICY = "policy"
"""Name of the trainable LoRA adapter (the policy)."""
REWARD = "reward"
"""Name of the frozen reward LoRA adapter, when the bf16 reward model shares the network."""
VALUE_HEAD_FILE = "value_head.pt"
CHECKPOINT_FILE = "state.pt"


class ValueHead(nn.Module):
    """V(s_t): a linear map of the policy's last hidden state (B, T, H) -> (B, T), computed in fp32."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        # Small weights: the first value estimates are ~0, so early value losses do not swamp the policy.
        nn.init.normal_(self.summary.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1)


@dataclass
class PPOModels:
    """Everything the alignment stage holds in memory. `model` is the one network; the rest are views or small
    heads."""

    model: Any
    """peft model: sft/merged + the trainable `policy` LoRA (+ the frozen `reward` LoRA when shared)."""
    value_head: ValueHead | None
    """PPO's critic; None for GRPO and RLOO, whose baselines come from the other samples of a prompt."""
    reward_model: Any
    """`edgerlhf.models.RewardModel`; for bf16 it wraps `model` itself (no copy); None when built without one."""
    tokenizer: Any
    device: torch.device
    reward_shared: bool
    """True when the reward model is the `reward` adapter on `model` (bf16); False: a separate quantized copy."""
    reward_function: Callable[[str, str], float] | None = None
    """`ppo.reward_function`: scores the rollouts in place of a reward model (then None)."""
    checkpointing: bool = False
    """`ppo.gradient_checkpointing`: the passes with gradients recompute each layer in the backward."""

    def policy_parameters(self) -> list[nn.Parameter]:
        lora = [p for n, p in self.model.named_parameters() if "lora_" in n and f".{POLICY}." in n]
        return lora + (list(self.value_head.parameters()) if self.value_head is not None else [])

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.model, self.value_head, self.reward_model) if m is not None]

    def forward(self, query_ids, query_mask, response_ids, response_mask, sampling: Sampling | None = None):
        """Policy logits (B, T, V), scaled by `sampling`, and values (B, T) at the response tokens, in one pass
        (values None without a value head)."""
        with checkpointed_layers(self.model, self.checkpointing and torch.is_grad_enabled()):
            return forward_response(self.model, query_ids, query_mask, response_ids, response_mask, sampling,
                                    self.value_head)

    @torch.no_grad()
    def reference_logits(self, query_ids, query_mask, response_ids, response_mask,
                         sampling: Sampling | None = None) -> torch.Tensor:
        """Logits (B, T, V) of the reference policy: the same network with the LoRA adapters off."""
        with self.model.disable_adapter():
            return forward_response(self.model, query_ids, query_mask, response_ids, response_mask, sampling)[0]

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """Reward-model scores (N,) of (prompt, response) texts (or the reward function's)."""
        if self.reward_function is not None:
            return torch.tensor([float(self.reward_function(p, r)) for p, r in zip(prompts, responses, strict=True)])
        if self.reward_model is None:
            raise RuntimeError("these models were built without a reward model (build_models(reward=False))")
        if not self.reward_shared:
            return self.reward_model.score(prompts, responses)
        with using_adapter(self.model, REWARD):
            return self.reward_model.score(prompts, responses)


@contextmanager
def using_adapter(model, name: str):
    """Run a block with adapter `name` active (frozen), then give control back to the policy adapter."""
    trainable = any(p.requires_grad for n, p in model.named_parameters() if f".{POLICY}." in n)
    model.set_adapter(name, inference_mode=True)  # peft freezes every adapter but the active one
    try:
        yield
    finally:
        model.set_adapter(POLICY, inference_mode=not trainable)  # the policy LoRA trainable again, if it was


def add_policy_adapter(model, config, adapter_name: str = POLICY):
    """Wrap a causal LM in peft with a fresh trainable LoRA adapter (B = 0, so policy == reference at start)."""
    from peft import get_peft_model

    from edgerlhf.models import lora_config

    lora = lora_config(model, config.ppo.lora_r, config.ppo.lora_alpha, config.sft.target_modules)
    return get_peft_model(model, lora, adapter_name=adapter_name)


def build_models(config, run_dir: str | Path, device: torch.device,
                 adapter_dir: str | Path | None = None, reward: bool = True,
                 value_head: bool | None = None) -> PPOModels:
    """Load sft/merged once and hang the policy, reference, (PPO's) value head and (bf16) reward model on it.

    With `adapter_dir` (a saved `ppo/adapter`) the policy is that trained adapter, frozen (evaluation);
    without it, a fresh trainable LoRA (training). `reward=False` loads no reward model (`reward_model` is
    None): a DPO run evaluated without one. `value_head` (default: only when `config.algorithm` is PPO)
    adds PPO's critic, loaded from `adapter_dir` when it holds one.
    """
    from peft import PeftModel

    from edgerlhf import models

    run_dir = Path(run_dir)
    precision = config.ppo.reward_precision
    # QLoRA-style sharing: with `quantized_policy`, the one network is loaded in the reward's int8/int4
    # precision, and policy, reference and reward all run on it.
    shared = precision == "bf16" or config.ppo.quantized_policy
    base, tokenizer = models.load_policy(run_dir, "sft", device, precision=precision if shared else "bf16")
    # Dropout stays off during PPO updates (eval mode throughout), so the log-probs of the update pass
    # match those of the rollout pass and the first ratio is exactly 1 (Huang et al. 2023, detail #16).
    if adapter_dir is None:
        model = add_policy_adapter(base, config).eval()
    else:
        model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=POLICY).eval()
    rm_dir = run_dir / reward_dir(precision)
    function = gold.reward_function(config.ppo.reward_function) if config.ppo.reward_function else None
    if not reward or function is not None:
        reward_model = None
    elif shared:
        if not (rm_dir / models.SCORE_HEAD_FILE).exists():
            raise MissingPrerequisite(rm_dir, "reward", f"holds no reward model (reward.precisions must include "
                                      f"{precision!r})")
        model.load_adapter(str(rm_dir / models.REWARD_ADAPTER_DIR), adapter_name=REWARD, is_trainable=False)
        meta_file = rm_dir / models.REWARD_META_FILE
        meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
        head = models.load_score_head(rm_dir / models.SCORE_HEAD_FILE, device).requires_grad_(False)
        reward_model = models.RewardModel(model, head, tokenizer, meta.get("max_length", 384), precision,
                                          device, meta.get("pooling", "last")).eval()
    else:
        # A quantized network cannot share the policy's bf16 weights: this adds one int8/int4 copy.
        reward_model = models.load_reward_model(run_dir, precision, device).requires_grad_(False)
    model.set_adapter(POLICY, inference_mode=adapter_dir is not None)
    critic = None
    if value_head or (value_head is None and config.algorithm == "ppo"):
        critic = ValueHead(model.config.hidden_size).to(device)
        if adapter_dir is not None and (Path(adapter_dir) / VALUE_HEAD_FILE).exists():
            critic.load_state_dict(torch.load(Path(adapter_dir) / VALUE_HEAD_FILE, map_location=device))
    checkpointing = adapter_dir is None and config.ppo.gradient_checkpointing  # only a training policy needs it
    if checkpointing:
        models.enable_activation_checkpointing(model)
    return PPOModels(model, critic, reward_model, tokenizer, device, shared and reward_model is not None, function,
                     checkpointing)


def reward_source(models: PPOModels, cfg) -> str:
    """What scores the rollouts, for the log: the reward function, or the reward model and how it is held."""
    if models.reward_function is not None:
        return f"the function {cfg.reward_function}"
    return (f"reward model {cfg.reward_precision} "
            f"({'shared adapter' if models.reward_shared else 'separate quantized copy'})")


def base_weight_storages(objects: list[nn.Module]) -> dict[int, int]:
    """Unique storages (data_ptr -> elements) of the non-adapter, non-head weights reachable from `objects`.

    Everything PPO holds goes in; a design with one copy of the network gives exactly the base model's
    parameter count, a second policy/reference/reward copy doubles it.
    """
    storages: dict[int, int] = {}
    for obj in objects:
        for name, tensor in list(obj.named_parameters()) + list(obj.named_buffers()):
            if "lora_" in name or name.startswith(("summary.", "head.")) or ".head." in name:
                continue
            if tensor.numel() == 0 or not tensor.is_floating_point() and tensor.dtype not in (torch.int8, torch.uint8):
                continue
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return storages


def sequence_kl(models, rollouts: Rollouts, cfg, batch_size: int) -> torch.Tensor:
    """KL(policy || reference) of each sampled response: sum over its tokens of log pi - log pi_ref (B,),
    with the same estimator as the PPO penalty (`policy_stats`)."""
    sampling = Sampling.of(cfg)
    out = []
    for i in range(0, len(rollouts.prompts), batch_size):
        s = slice(i, i + batch_size)
        args = (rollouts.query_ids[s], rollouts.query_mask[s], rollouts.response_ids[s], rollouts.response_mask[s])
        with torch.no_grad():
            logits, _ = models.forward(*args, sampling)
            ref_logits = models.reference_logits(*args, sampling)
            logp, ref_logp, _ = policy_stats(logits, ref_logits, rollouts.response_ids[s], sampling)
        out.append(((logp - ref_logp) * rollouts.response_mask[s]).sum(1).cpu())
    return torch.cat(out)


# --- checkpoints ---------------------------------------------------------------------------------


def _signature(config, run_dir: Path) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the algorithm, the adapter's shape and the models it was
    trained against (a re-run sft or reward stage makes an old checkpoint meaningless, and a GRPO adapter
    with no value head is no PPO checkpoint)."""
    inputs = {}
    for name in ("sft/merged", f"reward/{config.ppo.reward_precision}"):
        for file in sorted((run_dir / name).rglob("*.safetensors")) + sorted((run_dir / name).rglob("*.pt")):
            stat = file.stat()
            inputs[str(file.relative_to(run_dir))] = [stat.st_size, stat.st_mtime_ns]
    return {"algorithm": config.algorithm, "lora_r": config.ppo.lora_r, "lora_alpha": config.ppo.lora_alpha,
            "target_modules": list(config.sft.target_modules), "reward_precision": config.ppo.reward_precision,
            "inputs": inputs}


def save_checkpoint(path: Path, step: int, models: PPOModels, optimizer, kl_ctl, config, run_dir: Path) -> None:
    """Everything a resumed run needs, in one file written atomically (a crash never leaves half a file)."""
    from peft import get_peft_model_state_dict

    path.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "adapter": {k: v.cpu() for k, v in get_peft_model_state_dict(models.model, adapter_name=POLICY).items()},
        "value_head": models.value_head.state_dict() if models.value_head is not None else None,
        "optimizer": optimizer.state_dict(),
        "kl_ctl": kl_ctl.state_dict(),
        "signature": _signature(config, run_dir),
        # Sampling is reseeded from (seed, step) at each step; the generators are kept for completeness.
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
    }
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT_FILE)


def load_checkpoint(path: Path, models: PPOModels, optimizer, kl_ctl, config, run_dir: Path) -> int | None:
    """Restore a checkpoint written by `save_checkpoint`; returns its step, or None if there is none."""
    from peft import set_peft_model_state_dict

    file = path / CHECKPOINT_FILE
    if not file.exists():
        return None
    state = torch.load(file, map_location="cpu", weights_only=False)
    if state.get("signature") != _signature(config, run_dir):
        return None  # another algorithm, adapter shape or sft/reward models: the old checkpoint does not apply
    set_peft_model_state_dict(models.model, state["adapter"], adapter_name=POLICY)
    if models.value_head is not None:
        models.value_head.load_state_dict(state["value_head"])
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    return int(state["step"])


def save_adapter(path: Path, models: PPOModels) -> None:
    """The final policy: a standard peft adapter directory (loadable with `PeftModel.from_pretrained` on
    sft/merged) plus PPO's value head, when there is one."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(models.model, adapter_name=POLICY)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"))
    peft_config = models.model.peft_config[POLICY]
    peft_config.inference_mode = True
    peft_config.save_pretrained(str(path))
    peft_config.inference_mode = False
    if models.value_head is not None:
        torch.save(models.value_head.state_dict(), path / VALUE_HEAD_FILE)
    else:
        (path / VALUE_HEAD_FILE).unlink(missing_ok=True)  # an earlier PPO run's critic is not this policy's


def _seed_step(seed: int, step: int) -> None:
    """Reseed every generator from (seed, step): a resumed run samples exactly what an uninterrupted one would."""
    s = (seed * 1_000_003 + step) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _prompts(path: Path) -> list[str]:
    from edgerlhf.data import read_prefs

    return [row["prompt"] for row in read_prefs(path)]


def _probe(ctx, models: PPOModels, prompts: list[str], step: int, config) -> None:
    """Sample the fixed held-out probe prompts (same seed each time) and log them for this checkpoint, scored
    as the SFT stage scores its probes (`gold.probe_score`), so the Probes page compares like with like."""
    if not prompts:
        return
    from edgerlhf.gold import probe_score

    rollouts = sample_probes(models.model, models.tokenizer, prompts, config)
    for prompt, response in zip(prompts, rollouts.responses):
        ctx.log_sample(prompt, response, probe_score(prompt, response, config.data), step, kind="probe",
                       checkpoint=f"ppo/step-{step}")


# --- one step: the phases PPO, GRPO and RLOO share, then PPO's step ------------------------------


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
    """What `PPOModels.forward` takes for some rows of a rollout batch: query ids and mask, response ids and mask."""
    return (rollouts.query_ids[rows], rollouts.query_mask[rows], rollouts.response_ids[rows],
            rollouts.response_mask[rows])


def sample_and_score(models: PPOModels, batch_prompts: list[str], cfg, sampling: Sampling,
                     micro: StepMicroBatches, step: int) -> tuple[Rollouts, torch.Tensor]:
    """A step's rollouts, one response per entry of `batch_prompts` drawn by the policy (`micro.rollouts` rows
    per `generate` call), and their reward-model scores (B,)."""
    rollouts = micro.rollouts.run(step, lambda size: concat_rollouts(
        [generate(models.model, models.tokenizer, batch_prompts[rows], cfg.response_length, sampling)
         for rows in chunks(len(batch_prompts), size)], models.tokenizer.pad_token_id))
    return rollouts, models.score(rollouts.prompts, rollouts.responses).to(models.device)


def rollout_logprobs(models: PPOModels, rollouts: Rollouts, cfg, sampling: Sampling, micro: StepMicroBatches,
                     step: int) -> list[torch.Tensor | None]:
    """`[logprobs, ref_logprobs, entropy, values]` of the sampled tokens, each (B, T), without gradients: the
    log-probs under the policy that drew them and under the reference, the policy's entropy, and the values
    (None without a value head). Passes of at most `mini_batch_size` rollouts, fewer after out-of-memory errors."""
    def attempt(size: int):
        out = []
        with torch.no_grad():
            for rows in chunks(len(rollouts.prompts), min(size, cfg.mini_batch_size)):
                logits, values = models.forward(*rollout_args(rollouts, rows), sampling)  # (M, T, V), (M, T)
                ref_logits = models.reference_logits(*rollout_args(rollouts, rows), sampling)  # (M, T, V)
                logp, ref_logp, ent = policy_stats(logits, ref_logits, rollouts.response_ids[rows], sampling)
                out.append((logp, ref_logp, ent, values))
                del logits, ref_logits
        return [None if parts[0] is None else torch.cat(parts) for parts in zip(*out)]

    return micro.passes.run(step, attempt)


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


def step_metrics(algorithm: str, scores: torch.Tensor, b_seq_kl: torch.Tensor, b_entropy: torch.Tensor,
                 b_mask: torch.Tensor, own: dict[str, float], t0: float, t_gen: float) -> dict[str, float]:
    """A step's metrics under the algorithm's namespace (`contract.algorithm_metric`): those every sampling
    algorithm logs alike (scores (B,), KL(policy || reference) per response `b_seq_kl` (B,) as the sum of
    its tokens' log-ratios at sampling time, entropy, length, speed), then the algorithm's `own`."""
    elapsed = time.perf_counter() - t0
    common = {
        "reward_mean": scores.mean().item(),
        "reward_std": scores.std().item() if len(scores) > 1 else 0.0,
        "kl": b_seq_kl.mean().item(),
        "entropy": masked_mean(b_entropy, b_mask).item(),
        "response_length": b_mask.sum(1).mean().item(),
        "tokens_per_s": b_mask.sum().item() / elapsed,
        "generation_s": t_gen,
        "step_s": elapsed,
    }
    return {algorithm_metric(algorithm, key): value for key, value in {**common, **own}.items()}


def ppo_step(models: PPOModels, optimizer, kl_ctl, batch_prompts: list[str], cfg,
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
    rollouts, scores = sample_and_score(models, batch_prompts, cfg, sampling, micro, step)  # scores (B,)
    t_gen = time.perf_counter() - t0

    # 2. Log-probs of policy and reference, entropy and values of the sampled tokens (no grad).
    b_logprobs, b_ref_logprobs, b_entropy, b_values = rollout_logprobs(models, rollouts, cfg, sampling, micro,
                                                                       step)  # (B, T) each
    b_mask = rollouts.response_mask.float()  # (B, T)

    # 3. Rewards: KL penalty on every token, the score on the last; then GAE and whitening.
    b_scores = leave_one_out(scores, cfg.samples_per_prompt)  # (B,)
    b_scores = whiten(b_scores) if cfg.whiten_rewards else b_scores  # (B,)
    b_rewards, b_kl = per_token_rewards(b_scores, b_logprobs, b_ref_logprobs, b_mask, kl_ctl.value)  # (B, T)
    b_advantages, b_returns = compute_gae(b_rewards, b_values, b_mask, cfg.gamma, cfg.lam)  # (B, T)
    b_advantages = masked_whiten(b_advantages, b_mask)  # (B, T)

    # 4. PPO epochs over shuffled minibatches; the loss of a piece of one, as means over its tokens.
    def piece_loss(piece: torch.Tensor):
        mb_mask = b_mask[piece]  # (m, T)
        logits, mb_values = models.forward(*rollout_args(rollouts, piece), sampling)  # (m, T, V), (m, T)
        mb_logprobs, _, mb_entropy = policy_stats(logits, None, rollouts.response_ids[piece], sampling)
        pg_loss, clip_frac, approx_kl = clipped_policy_loss(mb_logprobs, b_logprobs[piece], b_advantages[piece],
                                                            mb_mask, cfg.cliprange)
        v_loss, vf_clip_frac = clipped_value_loss(mb_values, b_values[piece], b_returns[piece], mb_mask,
                                                  cfg.cliprange_value)
        mb_entropy = masked_mean(mb_entropy, mb_mask)
        loss = pg_loss + cfg.vf_coef * v_loss - cfg.ent_coef * mb_entropy
        return loss, {"policy_loss": pg_loss, "value_loss": v_loss, "clip_frac": clip_frac,
                      "vf_clip_frac": vf_clip_frac, "approx_kl": approx_kl}

    stats = minibatch_updates(models.policy_parameters(), optimizer, cfg, micro, step, b_mask.sum(1), piece_loss)

    # 5. The KL controller moves towards its target with this batch's KL per response.
    b_seq_kl = b_kl.sum(1)  # (B,)
    kl_coef = kl_ctl.value
    kl_ctl.update(b_seq_kl.mean().item(), cfg.batch_size)

    metrics = step_metrics("ppo", scores, b_seq_kl, b_entropy, b_mask, {
        "kl_coef": kl_coef, "non_score_reward": -kl_coef * b_seq_kl.mean().item(), **stats,
        "returns_mean": masked_mean(b_returns, b_mask).item()}, t0, t_gen)
    return metrics, rollouts, scores


# --- the stage -----------------------------------------------------------------------------------


def learning_rate_at(cfg, step: int) -> float:
    """The learning rate of iteration `step` (from 1): `ppo.learning_rate`, after rising linearly over the first
    `ppo.lr_warmup_steps`. A function of the step alone, so a resumed run continues the schedule."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * step / cfg.lr_warmup_steps
    return cfg.learning_rate


def step_function(algorithm: str) -> Callable[..., tuple[dict, Rollouts, torch.Tensor]]:
    """The step of a sampling algorithm, called alike for all: `(models, optimizer, kl_ctl, batch_prompts, cfg,
    micro, step) -> (metrics, rollouts, scores)`. GRPO and RLOO keep their KL coefficient fixed at
    `ppo.init_kl_coef` (as TRL's `beta`) and take no controller."""
    if algorithm == "ppo":
        return ppo_step
    from edgerlhf import grpo, rloo

    steps = {"grpo": grpo.grpo_step, "rloo": rloo.rloo_step}
    if algorithm not in steps:
        raise ValueError(f"the sampling stage runs ppo, grpo or rloo, not {algorithm!r}")
    return lambda models, optimizer, kl_ctl, *args: steps[algorithm](models, optimizer, *args)


def run(config: PipelineConfig, ctx: RunContext) -> PPOReport:
    """The alignment stage with `config.algorithm` against the reward model (PPO, GRPO or RLOO on the SFT
    policy; DPO is `edgerlhf.dpo.run`); returns the stage report."""
    if config.algorithm == "dpo":
        from edgerlhf import dpo

        return dpo.run(config, ctx)
    algorithm = config.algorithm
    train_step = step_function(algorithm)
    cfg = config.ppo
    device = resolve_device(config.device)
    run_dir = Path(ctx.run_dir)
    out_dir = ctx.stage_dir("ppo")
    torch.manual_seed(config.seed)
    memory.reset_peak(device)

    train_prompts = _prompts(run_dir / TRAIN_PREFS)
    test_file = run_dir / TEST_PREFS
    probe_prompts = _prompts(test_file)[: cfg.n_probe_prompts] if test_file.exists() else []

    # What the stage holds, measured around building it: one copy of the network (plus one quantized copy for
    # an int8/int4 reward model), the adapters and (PPO only) the value head.
    before = memory.tensor_bytes(device)
    models = build_models(config, run_dir, device)
    held_bytes = memory.tensor_bytes(device) - before
    network_bytes = sum(base_weight_storages([models.model]).values())
    params = models.policy_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    kl_ctl = kl_controller(config)

    ckpt_dir = out_dir / "checkpoint"
    start = load_checkpoint(ckpt_dir, models, optimizer, kl_ctl, config, run_dir) or 0
    if start:
        ctx.log(f"{algorithm}: resuming from {ckpt_dir} at step {start}")
    else:
        if (ckpt_dir / CHECKPOINT_FILE).exists():
            ctx.log(f"{algorithm}: {ckpt_dir} was trained with another algorithm, adapter or sft/reward models; "
                    "starting afresh", "warning")
        _probe(ctx, models, probe_prompts, 0, config)
    ctx.log(f"{algorithm}: {sum(p.numel() for p in params):,} trainable parameters, rewards from "
            f"{reward_source(models, cfg)}")

    history: dict[str, list[float]] = {}
    micro = StepMicroBatches.of(cfg, ctx, device, config)
    t_start = time.perf_counter()
    for step in range(start + 1, cfg.steps + 1):
        ctx.check_cancelled()
        _seed_step(config.seed, step)
        n_prompts = cfg.batch_size // cfg.samples_per_prompt
        chosen = random.choices(train_prompts, k=n_prompts) if len(train_prompts) < n_prompts \
            else random.sample(train_prompts, n_prompts)
        batch_prompts = [p for p in chosen for _ in range(cfg.samples_per_prompt)]  # each prompt k times in a row
        lr = learning_rate_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        metrics, rollouts, scores = train_step(models, optimizer, kl_ctl, batch_prompts, cfg, micro, step)
        metrics[algorithm_metric(algorithm, "learning_rate")] = lr
        metrics.update(memory.snapshot(device))
        ctx.log_metrics(metrics, step)
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        ctx.progress(step, cfg.steps)

        if step % cfg.sample_every == 0 or step == 1:
            for i in sorted({0, cfg.samples_per_prompt % cfg.batch_size}):  # two different prompts when there are
                ctx.log_sample(rollouts.prompts[i], rollouts.responses[i], scores[i].item(), step)
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            save_checkpoint(ckpt_dir, step, models, optimizer, kl_ctl, config, run_dir)
            _probe(ctx, models, probe_prompts, step, config)

    # The final policy, plus a last checkpoint so a finished stage re-run does not train again.
    save_adapter(run_dir / PPO_ADAPTER, models)
    save_checkpoint(ckpt_dir, cfg.steps, models, optimizer, kl_ctl, config, run_dir)
    if start < cfg.steps:
        _probe(ctx, models, probe_prompts, cfg.steps, config)
    ctx.artifact("adapter", run_dir / PPO_ADAPTER)
    ctx.artifact("checkpoint", ckpt_dir)

    namespace = algorithm_metric(algorithm, "")

    def last(key: str, n: int = 5) -> float | None:
        values = history.get(key, [])[-n:]
        return float(np.mean(values)) if values else None

    return PPOReport(
        algorithm=algorithm,
        steps=cfg.steps,
        resumed_from_step=start,
        reward_precision=None if models.reward_function else cfg.reward_precision,
        reward_model=("python function" if models.reward_function else
                      "shared adapter" if models.reward_shared else "separate quantized copy"),
        compute_dtype=dtype_name(compute_dtype(device)),
        device=str(device),
        trainable_parameters=sum(p.numel() for p in params),
        network_bytes=int(network_bytes),
        held_bytes=int(held_bytes),
        network_copies=held_bytes / network_bytes,
        first={k: v[0] for k, v in history.items() if k.startswith(namespace)},
        final={k: last(k) for k in history if k.startswith(namespace)},
        kl_coef_final=kl_ctl.value,
        wall_s=time.perf_counter() - t_start,
        peak_rss_mb=memory.peak_rss_mb(),
        memory=memory.snapshot(device),
    )
