"""The one network of the alignment stage: sft/merged loaded once, with the policy, the reference, PPO's value
head and a bf16 reward model all on it (`build_models` -> `PolicyModels`).

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
- With `reward.validation` (training only), the validation reward model is one more frozen adapter, `validation`,
  on the one network, with its own score head: the independent second opinion on the rollouts
  (`PolicyModels.validation_score`). It always rides on the one network, never on an int8/int4 reward copy: the
  reward stage trains it in that network's precision (`contract.network_precision`: bf16, or the reward model's with
  `ppo.quantized_policy`), so it scores on the base it was trained on and costs no copy whichever reward precision
  the proxy uses.
- With `reward.ensemble` = k >= 2 (training only), the ensemble's extra members are k - 1 more frozen adapters,
  `ensemble_<i>`, on the one network (trained in its precision, as the validation model is), each with its score head;
  the reward model's score becomes a conservative score of the k members' (member 0 is the reward model itself):
  their mean minus lambda times their standard deviation, or their minimum (`conservative_score`, `ppo.ensemble_score`;
  Coste et al. 2023, Eisenstein et al. 2023), and their disagreement is kept for the step's metrics.
The evaluation stage loads the trained policy through the same `build_models`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgerlhf import gold
from edgerlhf.contract import (VALIDATION_REWARD, algorithm_traits, ensemble_reward_dir, network_precision,
                               reward_dir)
from edgerlhf.errors import MissingPrerequisite
from edgerlhf.generation import Rollouts, Sampling, forward_response, kl_per_position
from edgerlhf.models import checkpointed_layers

POLICY = "policy"
"""Name of the trainable LoRA adapter (the policy)."""
REWARD = "reward"
"""Name of the frozen reward LoRA adapter, when the bf16 reward model shares the network."""
VALIDATION = "validation"
"""Name of the frozen validation reward LoRA adapter (`reward.validation`), always on the one network."""
ENSEMBLE = "ensemble_{}"
"""Name of the frozen adapter of ensemble member i >= 1 (`reward.ensemble`), `ENSEMBLE.format(i)`, on the one network."""
VALUE_HEAD_FILE = "value_head.pt"
"""PPO's critic beside the policy adapter in `ppo/adapter/`."""


def is_policy_lora(name: str) -> bool:
    """Whether parameter `name` belongs to the policy adapter: `...q_proj.lora_A.policy.weight`, and an embedding's
    `...embed_tokens.lora_embedding_A.policy`, whose adapter name ends the name."""
    parts = name.split(".")
    return POLICY in parts and any(part.startswith("lora_") for part in parts)


def conservative_score(member_scores: torch.Tensor, how: str = "mean_minus_std", penalty: float = 1.0
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ensemble's score of each rollout from its k members' scores (k, N), and their disagreement (N,): the
    members' standard deviation (population, over the k members). `how`: `mean_minus_std` (mean - penalty * std,
    Coste et al. 2023's uncertainty-weighted score with the std, as Eisenstein et al. 2023) or `min` (worst case)."""
    std = member_scores.std(0, correction=0)  # (N,)
    if how == "min":
        return member_scores.min(0).values, std
    if how == "mean_minus_std":
        return member_scores.mean(0) - penalty * std, std
    raise ValueError(f"unknown ensemble score {how!r}; choose from mean_minus_std, min")


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
class PolicyModels:
    """Everything the alignment stage holds in memory. `model` is the one network; the rest are views or small
    heads."""

    model: Any
    """peft model: sft/merged + the trainable `policy` LoRA (+ the frozen `reward` LoRA when shared, + the frozen
    `validation` LoRA with `reward.validation`)."""
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
    rewards: Any = None
    """`ppo.rewards`' stated components (`edgerlhf.rewards.RewardSet`): the weighted sum scores the rollouts, the
    reward model being one of the components if at all."""
    checkpointing: bool = False
    """`ppo.gradient_checkpointing`: the passes with gradients recompute each layer in the backward."""
    validation_model: Any = None
    """`edgerlhf.models.RewardModel` of the validation reward model (`reward.validation`): the `validation` adapter on
    `model` itself and its score head; None without one."""
    ensemble_models: list[Any] | None = None
    """`edgerlhf.models.RewardModel` of the ensemble's extra members 1..k-1 (`reward.ensemble`): the `ensemble_<i>`
    adapters on `model` itself; None without an ensemble."""
    ensemble_score: str = "mean_minus_std"
    """`ppo.ensemble_score`: how the members' scores make the reward model's."""
    ensemble_penalty: float = 1.0
    """`ppo.ensemble_penalty`: lambda of `mean_minus_std`."""
    last_ensemble_std: torch.Tensor | None = None
    """The members' disagreement (N,) at the last scoring by the reward model (`conservative_score`)."""

    def policy_parameters(self) -> list[nn.Parameter]:
        lora = [p for n, p in self.model.named_parameters() if is_policy_lora(n)]
        return lora + (list(self.value_head.parameters()) if self.value_head is not None else [])

    def modules(self) -> list[nn.Module]:
        return [m for m in (self.model, self.value_head, self.reward_model, self.validation_model,
                            *(self.ensemble_models or [])) if m is not None]

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
        """Scores (N,) of (prompt, response) texts: the reward model's, the reward function's, or the weighted sum
        of the stated rewards."""
        return self.score_parts(prompts, responses)[0]

    def score_parts(self, prompts: list[str], responses: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """`score` and, with stated rewards, each component's own scores {name: (N,)} (else {})."""
        if self.rewards is not None:
            return self.rewards.score(prompts, responses)
        if self.reward_function is not None:
            return torch.tensor([float(self.reward_function(p, r)) for p, r in zip(prompts, responses, strict=True)]), {}
        return self.reward_model_score(prompts, responses), {}

    def reward_diagnostics(self) -> dict[str, float]:
        """Metrics of the last scoring beside the scores: each judge's share of unreadable replies
        (`rewards/<name>_unparsed`); {} without a judge."""
        shares = self.rewards.last_unparsed if self.rewards is not None else {}
        out = {f"rewards/{name}_unparsed": share for name, share in shares.items()}
        if self.last_ensemble_std is not None:  # the reward ensemble's disagreement on the rollouts
            out["ensemble_std_mean"] = self.last_ensemble_std.float().mean().item()
        return out

    def reward_model_score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """The reward model's scores (N,); with an ensemble, the members' conservative score (`conservative_score`)."""
        if self.reward_model is None:
            raise RuntimeError("these models were built without a reward model (build_models(reward=False))")
        if not self.reward_shared:
            main = self.reward_model.score(prompts, responses)
        else:
            with using_adapter(self.model, REWARD):
                main = self.reward_model.score(prompts, responses)
        if not self.ensemble_models:
            return main
        members = [main.float()]
        for i, member in enumerate(self.ensemble_models, start=1):
            with using_adapter(self.model, ENSEMBLE.format(i)):
                members.append(member.score(prompts, responses).float().to(main.device))
        scores, self.last_ensemble_std = conservative_score(torch.stack(members), self.ensemble_score,  # (k, N)
                                                            self.ensemble_penalty)
        return scores

    @torch.no_grad()
    def validation_score(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        """The validation reward model's scores (N,): the `validation` adapter on the one network."""
        if self.validation_model is None:
            raise RuntimeError("these models were built without a validation reward model "
                               "(build_models(validation=False))")
        with using_adapter(self.model, VALIDATION):
            return self.validation_model.score(prompts, responses)


@contextmanager
def using_adapter(model, name: str):
    """Run a block with adapter `name` active (frozen), then give control back to the policy adapter."""
    trainable = any(p.requires_grad for n, p in model.named_parameters() if is_policy_lora(n))
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


def _adapter_reward_model(model, rm_dir: Path, name: str, tokenizer, precision: str, device: torch.device):
    """The reward model saved in `rm_dir` as frozen adapter `name` on the one network `model`, with its score head."""
    from edgerlhf import models

    model.load_adapter(str(rm_dir / models.REWARD_ADAPTER_DIR), adapter_name=name, is_trainable=False)
    meta_file = rm_dir / models.REWARD_META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    head = models.load_score_head(rm_dir / models.SCORE_HEAD_FILE, device).requires_grad_(False)
    return models.RewardModel(model, head, tokenizer, meta.get("max_length", 384), precision, device,
                              meta.get("pooling", "last")).eval()


def build_models(config, run_dir: str | Path, device: torch.device,
                 adapter_dir: str | Path | None = None, reward: bool = True,
                 value_head: bool | None = None, validation: bool = False, ensemble: int = 1) -> PolicyModels:
    """Load sft/merged once and hang the policy, reference, (PPO's) value head and (bf16) reward model on it.

    With `adapter_dir` (a saved `ppo/adapter`) the policy is that trained adapter, frozen (evaluation);
    without it, a fresh trainable LoRA (training). `reward=False` loads no reward model (`reward_model` is
    None): a DPO run evaluated without one. `value_head` (default: only when `config.algorithm` is PPO)
    adds PPO's critic, loaded from `adapter_dir` when it holds one. `validation` adds the validation reward model
    (`reward/validation/`, `reward.validation`) as the frozen adapter `validation`. `ensemble` = k >= 2 adds the
    ensemble's members 1..k-1 (`reward/ensemble/<i>/`, `reward.ensemble`) as frozen adapters `ensemble_<i>`, and the
    reward model's score becomes their conservative score with it (`ppo.ensemble_score`).
    """
    from peft import PeftModel

    from edgerlhf import models

    run_dir = Path(run_dir)
    precision = config.ppo.reward_precision
    # QLoRA-style sharing: with `quantized_policy`, the one network is loaded in the reward's int8/int4
    # precision, and policy, reference and reward all run on it.
    shared = precision == "bf16" or config.ppo.quantized_policy
    network = network_precision(precision, config.ppo.quantized_policy)  # = precision if shared else "bf16"
    base, tokenizer = models.load_policy(run_dir, "sft", device, precision=network)
    # Dropout stays off during PPO updates (eval mode throughout), so the log-probs of the update pass
    # match those of the rollout pass and the first ratio is exactly 1 (Huang et al. 2023, detail #16).
    if adapter_dir is None:
        model = add_policy_adapter(base, config).eval()
    else:
        model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=POLICY).eval()
    rm_dir = run_dir / reward_dir(precision)
    function = gold.reward_function(config.ppo.reward_function) if config.ppo.reward_function else None
    stated = config.ppo.rewards
    if not reward or function is not None or stated is not None and not any(c.kind == "reward_model" for c in stated):
        reward_model = None
    elif shared:
        if not (rm_dir / models.SCORE_HEAD_FILE).exists():
            raise MissingPrerequisite(rm_dir, "reward", f"holds no reward model (reward.precisions must include "
                                      f"{precision!r})")
        reward_model = _adapter_reward_model(model, rm_dir, REWARD, tokenizer, precision, device)
    else:
        # A quantized network cannot share the policy's bf16 weights: this adds one int8/int4 copy.
        reward_model = models.load_reward_model(run_dir, precision, device).requires_grad_(False)
    validation_model = None
    if validation:
        val_dir = run_dir / VALIDATION_REWARD
        if not (val_dir / models.SCORE_HEAD_FILE).exists():
            raise MissingPrerequisite(val_dir, "reward", "holds no validation reward model (reward.validation must be "
                                      "on when the reward stage runs)")
        validation_model = _adapter_reward_model(model, val_dir, VALIDATION, tokenizer, network, device)
    ensemble_models = None
    if ensemble > 1 and reward_model is not None:
        ensemble_models = []
        for i in range(1, ensemble):
            member_dir = run_dir / ensemble_reward_dir(i)
            if not (member_dir / models.SCORE_HEAD_FILE).exists():
                raise MissingPrerequisite(member_dir, "reward", f"holds no reward ensemble member {i} (reward.ensemble "
                                          f"must be at least {ensemble} when the reward stage runs)")
            ensemble_models.append(_adapter_reward_model(model, member_dir, ENSEMBLE.format(i), tokenizer, network,
                                                         device))
    model.set_adapter(POLICY, inference_mode=adapter_dir is not None)
    critic = None
    if value_head or (value_head is None and algorithm_traits(config.algorithm).value_head):
        critic = ValueHead(model.config.hidden_size).to(device)
        if adapter_dir is not None and (Path(adapter_dir) / VALUE_HEAD_FILE).exists():
            critic.load_state_dict(torch.load(Path(adapter_dir) / VALUE_HEAD_FILE, map_location=device,
                                               weights_only=True))
    checkpointing = adapter_dir is None and config.ppo.gradient_checkpointing  # only a training policy needs it
    if checkpointing:
        models.enable_activation_checkpointing(model)
    built = PolicyModels(model, critic, reward_model, tokenizer, device, shared and reward_model is not None, function,
                         checkpointing=checkpointing, validation_model=validation_model,
                         ensemble_models=ensemble_models, ensemble_score=config.ppo.ensemble_score,
                         ensemble_penalty=config.ppo.ensemble_penalty)
    if stated is not None and reward:
        built.rewards = stated_rewards(config, run_dir, built)
    return built


def stated_rewards(config, run_dir: Path, built: PolicyModels):
    """`ppo.rewards` ready to score the run's prompts: their prompt-data rows (the reference answers), the reward
    model if a component is it, and the policy's tokenizer for lengths in tokens."""
    from edgerlhf.data import prompts
    from edgerlhf.rewards import RewardSet, token_counter

    rows = {}
    for split in ("train", "test"):
        for row in prompts(run_dir, split):
            rows.setdefault(row["prompt"], row)
    return RewardSet(config.ppo.rewards, rows, built.reward_model_score if built.reward_model is not None else None,
                     token_counter(built.tokenizer))


def reward_source(models: PolicyModels, cfg) -> str:
    """What scores the rollouts, for the log: the reward function, or the reward model and how it is held."""
    if models.rewards is not None:
        return "the stated rewards " + " + ".join(f"{c.weight:g} x {name}" for name, c in
                                                  zip(models.rewards.names, models.rewards.components))
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
    """KL(policy || reference) of each sampled response (B,): the exact KL of the two whole temperature-scaled
    next-token distributions at each of its positions, summed (`generation.kl_per_position`, what training logs)."""
    sampling = Sampling.of(cfg)
    out = []
    for i in range(0, len(rollouts.prompts), batch_size):
        s = slice(i, i + batch_size)
        args = (rollouts.query_ids[s], rollouts.query_mask[s], rollouts.response_ids[s], rollouts.response_mask[s])
        with torch.no_grad():
            logits, _ = models.forward(*args, sampling)
            ref_logits = models.reference_logits(*args, sampling)
            kl = kl_per_position(logits, ref_logits)  # (b, T)
        out.append((kl * rollouts.response_mask[s]).sum(1).cpu())
    return torch.cat(out)
