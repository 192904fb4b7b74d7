"""Benchmarks: peak memory and speed of every stage, our one-copy alignment algorithms against TRL's trainers and a
naive PPO, and the floor.

    edgerlhf bench                                    # distilgpt2 architecture, random weights, distilgpt2-8gb preset
    edgerlhf bench --preset qwen2.5-0.5b-8gb          # Qwen2.5-0.5B's exact architecture, random weights
    edgerlhf bench --model PATH --out bench.json      # any local causal LM directory
    edgerlhf bench --set ppo.batch_size=8 --set ppo.ppo_epochs=1 --stages generation,ppo,ppo_naive
    edgerlhf bench --stages grpo,trl_grpo,rloo,trl_rloo,dpo,trl_dpo,kto,trl_kto --threads 1   # ours against TRL's

Runs offline. Without `--model` the model is the exact architecture of the preset's model (for the
default preset distilgpt2: 6 layers, 12 heads, 768 wide, GPT-2 vocabulary; see
`edgerlhf.architectures.PUBLISHED_SHAPES`) with random weights and the GPT-2 tokenizer, so the figures
are that model's without a download.
A synthetic run directory stands in for the earlier stages (sft/merged = that model; reward/<precision>
= a random reward LoRA + score head; prompts and preference pairs from the local HH-RLHF sample), and every
stage is measured in a fresh subprocess, so one stage's peak never hides in another's:

- `generation`: `ppo.batch_size` prompts, `ppo.response_length` new tokens, the PPO sampler;
- `sft`: one LoRA SFT optimizer step (`sft.batch_size` x `sft.max_length` tokens, causal-LM loss);
- `reward_bf16/int8/int4`: one Bradley-Terry reward step (`reward.batch_size` pairs of `reward.max_length`
  tokens) on the base loaded in that precision, LoRA + score head;
- `ppo`, `grpo`, `rloo`: one step of our alignment stage with that algorithm (`edgerlhf.align.STEPS`:
  a rollout batch of `ppo.batch_size` responses, `ppo.samples_per_prompt` to a prompt, scored, then
  `ppo_epochs` of minibatch updates) on one network: policy LoRA, reference = adapters off, the reward LoRA
  as a second adapter (and PPO's value head);
- `ppo_naive`: the same `ppo_step` with separate policy, reference, value and reward networks, as PPO
  trainers traditionally hold them (TRL's old PPOTrainer, OpenRLHF, DeepSpeed-Chat);
- `trl_grpo`, `trl_rloo`: TRL's `GRPOTrainer` / `RLOOTrainer` with the same model, LoRA, rollout batch, group
  size, response length, minibatch, epochs, beta and clip range, our reward model as its reward function; one
  step = one rollout batch (`batch_size / mini_batch_size / grad_accum * ppo_epochs` trainer steps);
- `dpo`: one optimizer step of our DPO stage's trainer (`edgerlhf.align.dpo.build_trainer`: `dpo.batch_size` pairs
  x `dpo.grad_accum`); `trl_dpo`: TRL's `DPOTrainer` as it is (its own LM head, no KL metric) on the same
  tokenized pairs and settings;
- `kto`: one optimizer step of our KTO stage's trainer (`edgerlhf.align.kto.build_trainer`: `kto.batch_size`
  labelled answers, the pairs split, x `kto.grad_accum`); `trl_kto`: TRL's `KTOTrainer` as it is (its own LM head)
  on the same tokenized answers, KL partners and settings.

The stages of a group algorithm (GRPO, RLOO) run with `algorithm` set to it, so `ppo.samples_per_prompt`
resolves to its default group of 4 where the preset's PPO samples one response per prompt. `compare` gives
ours / TRL for each algorithm (peak memory, step time) and naive / ours for PPO.

Peak memory is the CUDA peak allocated on a GPU, the peak resident set (`VmHWM`) of the stage's process
on the CPU (which includes the Python + torch runtime, reported as `rss_baseline_mb`). The floor
next to each peak is the memory the configuration cannot do without (see `floor`). Benchmarks print
figures; they assert nothing about speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgerlhf.contract import (CONFIG_FILE, PRECISIONS, SFT_MERGED, TEST_PREFS, TRAIN_PREFS, algorithm_metric,
                               algorithm_traits, merge_overrides, reward_dir)

MB = 1024 * 1024
STAGES = ("generation", "sft", "reward_bf16", "reward_int8", "reward_int4", "ppo", "ppo_naive", "grpo", "trl_grpo",
          "rloo", "trl_rloo", "dpo", "trl_dpo", "kto", "trl_kto")
"""Every benchmark, in the order they run: each of our algorithms next to TRL's trainer for it, so a run cut short
(out of time) still compares whole pairs and the two of a pair meet the same load on a shared machine."""
ALIGNMENT_STAGES = {
    "ppo": ("ours", "ppo"), "ppo_naive": ("ours-naive", "ppo"), "grpo": ("ours", "grpo"), "rloo": ("ours", "rloo"),
    "dpo": ("ours", "dpo"), "trl_grpo": ("TRL", "grpo"), "trl_rloo": ("TRL", "rloo"), "trl_dpo": ("TRL", "dpo"),
    "kto": ("ours", "kto"), "trl_kto": ("TRL", "kto"),
}
"""The alignment stages: whose trainer (ours or TRL's) and which algorithm each runs."""
TINY = {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 256}
"""A toy model for the smoke test (`--tiny`)."""


# --- the synthetic run directory -----------------------------------------------------------------


def bench_config(preset: str, model: str | None, overrides: dict[str, Any], tiny: bool = False):
    """The preset with the benchmark's model: `model` (a local directory), or the preset's own model rebuilt
    from its published shape with random weights (`edgerlhf.architectures.PUBLISHED_SHAPES`) and the GPT-2
    tokenizer, or (`tiny`) a toy GPT-2."""
    from edgerlhf.architectures import PUBLISHED_SHAPES, published_shape
    from edgerlhf.config import PRESETS, TINY_TOKENIZER_DIR, ConfigError, load_config

    base: dict[str, Any] = {"device": "auto"}
    if model:
        base["model"] = {"name_or_path": model, "random_init": False}
    elif tiny:
        base["model"] = {"name_or_path": "tiny-gpt2", "random_init": True, "tokenizer": TINY_TOKENIZER_DIR, **TINY}
    else:
        name = PRESETS.get(preset, {}).get("model", {}).get("name_or_path", "")
        if name not in PUBLISHED_SHAPES:
            raise ConfigError("model", f"preset {preset!r} loads {name!r}, whose shape is not in "
                                       f"edgerlhf.architectures.PUBLISHED_SHAPES: pass --model DIR")
        base["model"] = {"name_or_path": name, "tokenizer": TINY_TOKENIZER_DIR, **published_shape(name)}
    return load_config(preset, merge_overrides(base, overrides))


def prepare_run_dir(config, work: Path) -> Path:
    """Write what the data, sft and reward stages would leave: sft/merged, reward/<p>/, data/train_prefs.jsonl and
    data/test_prefs.jsonl."""
    import torch
    from peft import get_peft_model

    from edgerlhf.config import HH_PREFS_SAMPLE
    from edgerlhf.dialogue import normalize_prompt
    from edgerlhf.models import (REWARD_ADAPTER_DIR, REWARD_META_FILE, SCORE_HEAD_FILE, load_base_model,
                                 load_tokenizer, lora_config)

    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
    torch.manual_seed(config.seed)
    model = load_base_model(config.model, "cpu", tokenizer=tokenizer, seed=config.seed).float()
    model.save_pretrained(work / SFT_MERGED)
    tokenizer.save_pretrained(work / SFT_MERGED)
    hidden = model.config.hidden_size
    for precision in PRECISIONS:
        rm_dir = work / reward_dir(precision)
        lora = get_peft_model(copy.deepcopy(model), lora_config(model, config.reward.lora_r, config.reward.lora_alpha,
                                                                config.sft.target_modules))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02)
        lora.save_pretrained(rm_dir / REWARD_ADAPTER_DIR)
        torch.save({"weight": torch.randn(1, hidden) / math.sqrt(hidden), "bias": torch.zeros(1)},
                   rm_dir / SCORE_HEAD_FILE)
        meta = {"precision": precision, "max_length": config.reward.max_length, "hidden_size": hidden}
        (rm_dir / REWARD_META_FILE).write_text(json.dumps(meta))
        del lora
    pairs = []
    if os.path.exists(HH_PREFS_SAMPLE):
        with open(HH_PREFS_SAMPLE, encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                prompt = normalize_prompt(row["prompt"])
                if len(tokenizer(prompt, verbose=False)["input_ids"]) <= config.data.max_prompt_tokens:
                    pairs.append({"prompt": prompt, "chosen": row["chosen"], "rejected": row["rejected"]})
    if not pairs:  # no local sample: fixed synthetic pairs
        pairs = [{"prompt": f"\n\nHuman: Tell me something about the number {i}.\n\nAssistant:",
                  "chosen": f"{i} is {'even' if i % 2 == 0 else 'odd'}.", "rejected": "I do not know."}
                 for i in range(256)]
    # The pairs feed DPO, and KTO split into labelled answers; the sampling stages read only their prompts. The
    # offline trainers also build an evaluation set, never run by the bench: a few of the same pairs.
    (work / TRAIN_PREFS).parent.mkdir(parents=True, exist_ok=True)
    (work / TRAIN_PREFS).write_text("".join(json.dumps(r) + "\n" for r in pairs))
    (work / TEST_PREFS).write_text("".join(json.dumps(r) + "\n" for r in pairs[:16]))
    (work / CONFIG_FILE).write_text(config.to_json())
    return work


# --- measuring ---------------------------------------------------------------------------------


class Meter:
    """Peak memory of this process (`edgerlhf.memory.peak_mb`: CUDA peak allocated, or peak RSS on the CPU)
    from its creation on, above a baseline of what was held then, and step times."""

    def __init__(self, device):
        from edgerlhf import memory

        self.device = device
        self.cuda = device.type == "cuda"
        memory.reset_peak(device)
        self.baseline_mb = memory.current_mb(device)
        self.times: list[float] = []

    def sync(self):
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)

    def peak_mb(self) -> float:
        from edgerlhf import memory

        return memory.peak_mb(self.device)

    def time(self, fn, steps: int, warmup: int):
        """Run `fn()` warmup + steps times; keep the timed steps. Returns the last result."""
        out = None
        for i in range(warmup + steps):
            self.sync()
            t0 = time.perf_counter()
            out = fn()
            self.sync()
            if i >= warmup:
                self.times.append(time.perf_counter() - t0)
        return out

    def result(self, tokens_per_step: float, **extra) -> dict[str, Any]:
        step_s = sum(self.times) / len(self.times)
        peak = self.peak_mb()
        return {"peak_mb": peak, ("cuda_baseline_mb" if self.cuda else "rss_baseline_mb"): self.baseline_mb,
                "peak_above_baseline_mb": peak - self.baseline_mb,
                "step_s": step_s, "step_times_s": self.times, "tokens_per_step": tokens_per_step,
                "tokens_per_s": tokens_per_step / step_s, **extra}


def _weights_bytes(*modules) -> int:
    seen: dict[int, int] = {}
    for module in modules:
        for t in list(module.parameters()) + list(module.buffers()):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def floor(weights: int, trainable: int, model_cfg, device, *, train_tokens: int = 0, logit_tokens: int = 0,
          kv_tokens: int = 0, kv_rows: int = 0) -> dict[str, int]:
    """The memory a configuration cannot do without, in bytes (an estimate, stated term by term).

    weights: the bytes of every weight held (one copy of the network + adapters + heads, as loaded);
    optimizer: fp32 gradient + two AdamW moments per trainable parameter (12 bytes);
    activations: the larger of the training pass and the generation pass, which never overlap:
      training, with per-layer recomputation (activation checkpointing, the least a backward pass can keep):
        every layer's input (n_layer * tokens * H) + one layer's working set while it is recomputed
        (~14 H per token: qkv 3H, attention out H, MLP 4H + GELU 4H, two LayerNorms 2H)
        + fp32 logits and their gradient for the tokens that are scored (2 * 4 * V bytes each);
      generation: the KV cache (2 * n_layer * H per token in the batch) + one step of fp32 logits per row.
    """
    from edgerlhf.models import compute_dtype

    b = 2 if compute_dtype(device) in (_torch().bfloat16, _torch().float16) else 4
    H, L, V = model_cfg.hidden_size, model_cfg.num_hidden_layers, model_cfg.vocab_size
    train = (L * train_tokens * H + 14 * train_tokens * H) * b + 2 * 4 * V * logit_tokens if train_tokens else 0
    generation = 2 * L * H * kv_tokens * b + 4 * V * kv_rows if kv_tokens else 0
    out = {"weights": int(weights), "optimizer": int(12 * trainable), "activations": int(max(train, generation))}
    out["total"] = sum(out.values())
    return out


def _torch():
    import torch

    return torch


def _prompts(run_dir: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in (run_dir / TRAIN_PREFS).read_text().splitlines() if line]
    return [rows[i % len(rows)]["prompt"] for i in range(n)]


def _batch_prompts(run_dir: Path, cfg) -> list[str]:
    """A rollout batch as the alignment stage draws it: `batch_size / samples_per_prompt` prompts, each
    `samples_per_prompt` times in a row."""
    k = cfg.samples_per_prompt
    return [p for p in _prompts(run_dir, cfg.batch_size // k) for _ in range(k)]


def stage_config(config, stage: str):
    """The configuration `stage` runs: the bench's with `algorithm` set to the stage's, so that
    `ppo.samples_per_prompt` resolves for it (a group algorithm gets its default group of 4 where the preset's
    PPO samples one response per prompt; a group size set with `--set` is kept)."""
    from edgerlhf.config import PipelineConfig

    if stage not in ALIGNMENT_STAGES:
        return config
    data = config.to_dict()
    data["algorithm"] = ALIGNMENT_STAGES[stage][1]
    if data["ppo"]["samples_per_prompt"] < algorithm_traits(data["algorithm"]).min_samples_per_prompt:
        data["ppo"]["samples_per_prompt"] = None
    return PipelineConfig.from_dict(data)


# --- the stages (each runs in its own process) -------------------------------------------------------


def bench_generation(config, run_dir: Path, device, steps: int, warmup: int) -> dict[str, Any]:
    from edgerlhf import models
    from edgerlhf.generation import Sampling, generate

    meter = Meter(device)
    cfg = config.ppo
    model, tokenizer = models.load_policy(run_dir, "sft", device)
    prompts = _prompts(run_dir, cfg.batch_size)
    lengths = []

    def step():
        rollouts = generate(model, tokenizer, prompts, cfg.response_length, Sampling.of(cfg))
        lengths.append(int(rollouts.response_mask.sum()))
        return rollouts

    rollouts = meter.time(step, steps, warmup)
    kv_tokens = rollouts.query_ids.numel() + rollouts.response_ids.numel()
    return meter.result(sum(lengths[warmup:]) / steps, batch_size=cfg.batch_size, response_length=cfg.response_length,
                        prompt_tokens=int(rollouts.query_ids.shape[1]),
                        floor=floor(_weights_bytes(model), 0, model.config, device, kv_tokens=kv_tokens,
                                    kv_rows=cfg.batch_size))


def _lora(model, r: int, alpha: int, target_modules, adapter_name: str = "default"):
    from peft import get_peft_model

    from edgerlhf.models import lora_config

    return get_peft_model(model, lora_config(model, r, alpha, target_modules), adapter_name=adapter_name)


def _random_batch(n: int, length: int, vocab: int, device):
    torch = _torch()
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (n, length), generator=g).to(device)


def bench_sft(config, run_dir: Path, device, steps: int, warmup: int) -> dict[str, Any]:
    from edgerlhf import models

    torch = _torch()
    meter = Meter(device)
    cfg = config.sft
    base = models.load_causal_lm(run_dir / SFT_MERGED, device, cfg.precision)  # QLoRA with sft.precision int8/int4
    model = _lora(base, cfg.lora_r, cfg.lora_alpha, cfg.target_modules).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    ids = _random_batch(cfg.batch_size, cfg.max_length, model.config.vocab_size, device)

    def step():
        for _ in range(cfg.grad_accum):
            loss = model(input_ids=ids, labels=ids).loss
            (loss / cfg.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    meter.time(step, steps, warmup)
    tokens = cfg.batch_size * cfg.max_length * cfg.grad_accum
    trainable = sum(p.numel() for p in params)
    return meter.result(tokens, batch_size=cfg.batch_size, max_length=cfg.max_length, lora_r=cfg.lora_r,
                        precision=cfg.precision, trainable_parameters=trainable,
                        floor=floor(_weights_bytes(model), trainable, model.config, device,
                                    train_tokens=cfg.batch_size * cfg.max_length,
                                    logit_tokens=cfg.batch_size * cfg.max_length))


def bench_reward(config, run_dir: Path, device, steps: int, warmup: int, precision: str) -> dict[str, Any]:
    from edgerlhf import models

    torch = _torch()
    meter = Meter(device)
    cfg = config.reward
    base = models.load_causal_lm(run_dir / SFT_MERGED, device, precision)
    model = _lora(base, cfg.lora_r, cfg.lora_alpha, config.sft.target_modules).train()
    head = torch.nn.Linear(model.config.hidden_size, 1).to(device)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    chosen = _random_batch(cfg.batch_size, cfg.max_length, model.config.vocab_size, device)
    rejected = chosen.flip(0)

    def reward(ids):
        hidden = model.get_base_model().base_model(input_ids=ids).last_hidden_state  # (B, T, H)
        return head(hidden[:, -1].float()).squeeze(-1)  # (B,)

    def step():
        for _ in range(cfg.grad_accum):
            # Bradley-Terry: -log sigmoid(r_chosen - r_rejected), chosen and rejected in one batch as TRL does.
            r = reward(torch.cat([chosen, rejected]))
            loss = -torch.nn.functional.logsigmoid(r[: len(chosen)] - r[len(chosen):]).mean()
            (loss / cfg.grad_accum).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    meter.time(step, steps, warmup)
    tokens = 2 * cfg.batch_size * cfg.max_length * cfg.grad_accum
    trainable = sum(p.numel() for p in params)
    return meter.result(tokens, precision=precision, batch_size=cfg.batch_size, max_length=cfg.max_length,
                        weights_mb=_weights_bytes(model) / MB, trainable_parameters=trainable,
                        compute_dtype=models.dtype_name(models.compute_dtype(device)),
                        floor=floor(_weights_bytes(model, head), trainable, model.config, device,
                                    train_tokens=2 * cfg.batch_size * cfg.max_length, logit_tokens=0))


class NaivePPOModels:
    """The traditional PPO layout: separate policy, reference, value and reward networks.

    Same `ppo_step`, same algorithm; only where the networks live differs. The value model is its own
    network with its own trainable LoRA and value head (as TRL's old `PPOTrainer` / OpenRLHF critics are).
    """

    def __init__(self, config, run_dir: Path, device):
        from edgerlhf import models
        from edgerlhf.align import policy

        self.device = device
        base, self.tokenizer = models.load_policy(run_dir, "sft", device)
        self.model = policy.add_policy_adapter(base, config).eval()
        self.reference, _ = models.load_policy(run_dir, "sft", device)
        value_base, _ = models.load_policy(run_dir, "sft", device)
        self.value_model = _lora(value_base, config.ppo.lora_r, config.ppo.lora_alpha, config.sft.target_modules,
                                 adapter_name="value").eval()
        self.value_head = policy.ValueHead(base.config.hidden_size).to(device)
        self.reward_model = models.load_reward_model(run_dir, "bf16", device)
        self.reward_shared = False

    def modules(self):
        return [self.model, self.reference, self.value_model, self.value_head, self.reward_model]

    def policy_parameters(self):
        trainable = [p for m in (self.model, self.value_model) for p in m.parameters() if p.requires_grad]
        return trainable + list(self.value_head.parameters())

    def forward(self, query_ids, query_mask, response_ids, response_mask, sampling=None):
        from edgerlhf.generation import forward_response

        logits, _ = forward_response(self.model, query_ids, query_mask, response_ids, response_mask, sampling)
        _, values = forward_response(self.value_model, query_ids, query_mask, response_ids, response_mask,
                                     sampling, self.value_head)
        return logits, values

    def reference_logits(self, query_ids, query_mask, response_ids, response_mask, sampling=None):
        from edgerlhf.generation import forward_response

        with _torch().no_grad():
            return forward_response(self.reference, query_ids, query_mask, response_ids, response_mask, sampling)[0]

    def score(self, prompts, responses):
        return self.reward_model.score(prompts, responses)

    def score_parts(self, prompts, responses):
        """`score`, and no stated rewards' parts (what the steps read of `PolicyModels`)."""
        return self.score(prompts, responses), {}

    def reward_diagnostics(self):
        """No stated rewards, so no judge to report on (what the steps read of `PolicyModels`)."""
        return {}


def bench_sampling(config, run_dir: Path, device, steps: int, warmup: int, naive: bool = False) -> dict[str, Any]:
    """One step of our alignment stage with `config.algorithm` (PPO, GRPO or RLOO), called as the stage calls it;
    `naive`: PPO's step on `NaivePPOModels`."""
    torch = _torch()
    meter = Meter(device)  # before the imports, as for TRL's trainers: what a stage imports is its own cost
    from edgerlhf.align import STEPS, policy, ppo

    cfg = config.ppo
    algorithm = config.algorithm
    models = NaivePPOModels(config, run_dir, device) if naive else policy.build_models(config, run_dir, device)
    params = models.policy_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5)
    kl_ctl = ppo.kl_controller(config)
    train_step = STEPS[algorithm]
    prompts = _batch_prompts(run_dir, cfg)
    out: dict[str, Any] = {}

    def step():
        torch.manual_seed(0)
        metrics, rollouts, _ = train_step(models, optimizer, kl_ctl, prompts, cfg)
        out.update(metrics=metrics, P=rollouts.query_ids.shape[1], T=rollouts.response_ids.shape[1])
        return metrics

    meter.time(step, steps, warmup)
    trainable = sum(p.numel() for p in params)
    P, T = out["P"], out["T"]
    one_network = sum(policy.base_weight_storages([models.model]).values())
    copies = sum(policy.base_weight_storages(models.modules()).values()) / one_network
    model_cfg = models.model.config
    design = ("naive: separate policy, reference, value and reward networks" if naive else
              "one copy: policy LoRA, reference = adapters off, " +
              ("value head, " if models.value_head is not None else "") + "reward LoRA")
    return meter.result(out["metrics"][algorithm_metric(algorithm, "response_length")] * cfg.batch_size,
                        algorithm=algorithm, design=design, network_copies=round(copies, 3),
                        trainable_parameters=trainable, batch_size=cfg.batch_size,
                        samples_per_prompt=cfg.samples_per_prompt, mini_batch_size=cfg.mini_batch_size,
                        ppo_epochs=cfg.ppo_epochs, response_length=cfg.response_length, prompt_tokens=P,
                        generation_s=out["metrics"][algorithm_metric(algorithm, "generation_s")],
                        floor=floor(_weights_bytes(*models.modules()), trainable, model_cfg, device,
                                    train_tokens=cfg.mini_batch_size * (P + T), logit_tokens=cfg.mini_batch_size * T,
                                    kv_tokens=cfg.batch_size * (P + T), kv_rows=cfg.batch_size))


def step_clock(meter: Meter, every: int = 1):
    """A `TrainerCallback` that marks the time when training begins and after every `every` optimizer steps (one
    bench step: a rollout batch of GRPO or RLOO, one batch of DPO), and keeps the Trainer from evaluating or
    saving a checkpoint (`DefaultFlowCallback` asks for both at the last step): the bench times training only."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kwargs):
            meter.sync()
            self.marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every == 0:
                meter.sync()
                self.marks.append(time.perf_counter())
            control.should_evaluate = control.should_save = False
            return control

        def step_times(self, warmup: int) -> list[float]:
            per_step = [b - a for a, b in zip(self.marks, self.marks[1:])]
            return per_step[warmup:] or per_step

    return StepClock()


def bench_trl_sampling(config, run_dir: Path, device, steps: int, warmup: int) -> dict[str, Any]:
    """TRL's `GRPOTrainer` or `RLOOTrainer` (`config.algorithm`) with the same model, LoRA, rollout batch, group size,
    response length, minibatch, epochs, beta and clip range as ours; its reward function is our reward model
    (`ppo.reward_precision`), loaded as TRL loads a reward model: a network of its own beside the policy."""
    torch = _torch()
    meter = Meter(device)  # before importing TRL, whose import is its own cost (~250 MB of RSS on the CPU)
    import datasets
    import trl
    from transformers import AutoConfig, AutoModelForCausalLM, PrinterCallback

    from edgerlhf import models
    from edgerlhf.align.policy import base_weight_storages

    cfg = config.ppo
    algorithm = config.algorithm
    reward_model = models.load_reward_model(run_dir, cfg.reward_precision, device)

    def reward_func(prompts, completions, **kwargs):
        return reward_model.score(list(prompts), list(completions)).tolist()

    steps_per_rollout = cfg.batch_size // cfg.mini_batch_size // cfg.grad_accum * cfg.ppo_epochs
    clock = step_clock(meter, every=steps_per_rollout)
    # Every rollout batch on the prompts ours samples (`_batch_prompts`), in order: TRL repeats each of them
    # `samples_per_prompt` times, and the step times compare the same work.
    prompts = _prompts(run_dir, cfg.batch_size // cfg.samples_per_prompt) * (steps + warmup)
    dtype = models.compute_dtype(device)
    with torch.device("meta"):  # the architecture without weights, for the LoRA config (TRL loads the model)
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(run_dir / SFT_MERGED))
    with tempfile.TemporaryDirectory() as out_dir:
        common = dict(
            output_dir=out_dir, report_to="none", save_strategy="no", logging_steps=10_000, seed=config.seed,
            per_device_train_batch_size=cfg.mini_batch_size, gradient_accumulation_steps=cfg.grad_accum,
            generation_batch_size=cfg.batch_size, num_generations=cfg.samples_per_prompt,
            num_iterations=cfg.ppo_epochs, max_completion_length=cfg.response_length, temperature=cfg.temperature,
            top_k=cfg.top_k, top_p=cfg.top_p, learning_rate=cfg.learning_rate, beta=cfg.init_kl_coef,
            epsilon=cfg.cliprange, max_grad_norm=cfg.max_grad_norm, max_steps=steps_per_rollout * (steps + warmup),
            **models.activation_checkpointing(False), bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
            use_cpu=device.type == "cpu", model_init_kwargs={"dtype": dtype}, disable_dropout=True,
            dataloader_num_workers=0, disable_tqdm=True, shuffle_dataset=False)
        if algorithm == "grpo":  # our GRPO's loss: token-level mean over a minibatch, group-std advantages
            args, trainer_class = trl.GRPOConfig(**common, loss_type="bnpo", scale_rewards="group",
                                                 entropy_coef=cfg.ent_coef), trl.GRPOTrainer
        elif algorithm == "rloo":
            args, trainer_class = trl.RLOOConfig(**common, normalize_advantages=cfg.whiten_rewards), trl.RLOOTrainer
        else:
            raise ValueError(f"TRL's sampling trainers here are GRPO and RLOO, not {algorithm!r}")
        trainer = trainer_class(
            model=str(run_dir / SFT_MERGED), reward_funcs=reward_func, args=args,
            train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=models.load_tokenizer(run_dir / SFT_MERGED, padding_side="left"),
            peft_config=models.lora_config(skeleton, cfg.lora_r, cfg.lora_alpha, config.sft.target_modules),
            callbacks=[clock])
        trainer.remove_callback(PrinterCallback)  # the figures go to the report, not to stdout
        trainer.train()
    meter.times = clock.step_times(warmup)
    # The mean completion length over the run's rollouts (TRL logs it once, at the end of training).
    lengths = [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
    one_network = sum(base_weight_storages([trainer.model]).values())
    copies = sum(base_weight_storages([trainer.model, reward_model]).values()) / one_network
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return meter.result(cfg.batch_size * (lengths[-1] if lengths else cfg.response_length), algorithm=algorithm,
                        trainer=f"trl.{trainer_class.__name__}", design="policy LoRA, reference = adapter off "
                        "(TRL with peft), reward model a separate network", network_copies=round(copies, 3),
                        trainable_parameters=trainable, batch_size=cfg.batch_size,
                        samples_per_prompt=cfg.samples_per_prompt, mini_batch_size=cfg.mini_batch_size,
                        ppo_epochs=cfg.ppo_epochs, response_length=cfg.response_length,
                        steps_per_rollout_batch=steps_per_rollout, beta=cfg.init_kl_coef)


def _plain_trl_dpo_trainer():
    """TRL's `DPOTrainer` as it is (its own LM head, no KL metric, no out-of-memory splitting), taking the pairs
    already tokenized as our stage tokenizes them (`dpo.preference_dataset`), so both train on the same tokens."""
    from trl import DPOTrainer

    class PlainDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PlainDPOTrainer


def bench_dpo(config, run_dir: Path, device, steps: int, warmup: int, trl: bool = False) -> dict[str, Any]:
    """Optimizer steps of our DPO stage's trainer, built as the stage builds it (`align.dpo.build_trainer`: TRL's
    DPOTrainer, a LoRA policy whose reference is the adapter off, our answer-only LM head off the GPU, the
    chosen-answer KL metric), or with `trl` TRL's own DPOTrainer with the same settings on the same pairs.
    A step is `dpo.batch_size` pairs x `dpo.grad_accum`."""
    meter = Meter(device)
    from edgerlhf import models
    from edgerlhf.align import dpo
    from edgerlhf.context import RunContext

    cfg = config.dpo
    cfg.max_steps = steps + warmup
    clock = step_clock(meter)
    ctx = RunContext(run_dir)
    model = models.load_causal_lm(run_dir / SFT_MERGED, device)
    tokenizer = models.load_tokenizer(run_dir / SFT_MERGED)
    trainer = dpo.build_trainer(config, ctx, model, tokenizer, device, callbacks=[clock],
                                trainer_class=_plain_trl_dpo_trainer() if trl else None)
    trainer.train()
    meter.times = clock.step_times(warmup)
    pairs = trainer.train_dataset
    answer_tokens = sum(len(c) + len(r) for c, r in zip(pairs["chosen_ids"], pairs["rejected_ids"])) / len(pairs)
    pair_tokens = 2 * sum(len(p) for p in pairs["prompt_ids"]) / len(pairs) + answer_tokens
    pairs_per_step = cfg.batch_size * cfg.grad_accum
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    cpu_head = " + our answer-only LM head" if device.type not in ("cuda", "xpu") else ""  # as dpo.py installs it
    return meter.result(pairs_per_step * pair_tokens, algorithm="dpo",
                        trainer="trl.DPOTrainer" if trl else
                        f"edgerlhf.align.dpo (trl.DPOTrainer{cpu_head}, KL metric)",
                        design="policy LoRA, reference = adapter off", trainable_parameters=trainable,
                        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_length=cfg.max_length,
                        mean_pair_tokens=pair_tokens, beta=cfg.beta,
                        note="tokens_per_step: pairs per step x the mean tokens of a pair (prompt twice, both answers)",
                        floor=floor(_weights_bytes(trainer.model), trainable, trainer.model.config, device,
                                    train_tokens=int(cfg.batch_size * pair_tokens),
                                    logit_tokens=int(cfg.batch_size * answer_tokens)))


def _plain_trl_kto_trainer():
    """TRL's `KTOTrainer` as it is (its own LM head, no out-of-memory splitting), taking the answers already tokenized
    as our stage tokenizes them, with their KL partners (`kto.unpaired_dataset`), so both train on the same tokens."""
    from trl import KTOTrainer

    class PlainKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    return PlainKTOTrainer


def bench_kto(config, run_dir: Path, device, steps: int, warmup: int, trl: bool = False) -> dict[str, Any]:
    """Optimizer steps of our KTO stage's trainer, built as the stage builds it (`align.kto.build_trainer`: TRL's
    KTOTrainer, a LoRA policy whose reference is the adapter off, our answer-only LM head off the GPU), or with `trl`
    TRL's own KTOTrainer with the same settings on the same answers. A step is `kto.batch_size` answers x
    `kto.grad_accum`, each answer also scored after another prompt (its KL sequence)."""
    meter = Meter(device)
    from edgerlhf import models
    from edgerlhf.align import kto
    from edgerlhf.context import RunContext

    cfg = config.kto
    cfg.max_steps = steps + warmup
    clock = step_clock(meter)
    ctx = RunContext(run_dir)
    model = models.load_causal_lm(run_dir / SFT_MERGED, device)
    tokenizer = models.load_tokenizer(run_dir / SFT_MERGED)
    trainer = kto.build_trainer(config, ctx, model, tokenizer, device, callbacks=[clock],
                                trainer_class=_plain_trl_kto_trainer() if trl else None)
    trainer.train()
    meter.times = clock.step_times(warmup)
    data = trainer.train_dataset
    answer_tokens = sum(len(c) for c in data["completion_ids"]) / len(data)
    example_tokens = sum(len(p) for p in data["prompt_ids"]) / len(data) + answer_tokens
    answers_per_step = cfg.batch_size * cfg.grad_accum
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    cpu_head = " + our answer-only LM head" if device.type not in ("cuda", "xpu") else ""  # as kto.py installs it
    return meter.result(answers_per_step * example_tokens, algorithm="kto",
                        trainer="trl.KTOTrainer" if trl else f"edgerlhf.align.kto (trl.KTOTrainer{cpu_head})",
                        design="policy LoRA, reference = adapter off", trainable_parameters=trainable,
                        batch_size=cfg.batch_size, grad_accum=cfg.grad_accum, max_length=cfg.max_length,
                        mean_example_tokens=example_tokens, beta=cfg.beta,
                        note="tokens_per_step: answers per step x the mean tokens of an answer with its prompt (its KL "
                             "sequence, as long again, not counted)",
                        floor=floor(_weights_bytes(trainer.model), trainable, trainer.model.config, device,
                                    train_tokens=int(cfg.batch_size * example_tokens),
                                    logit_tokens=int(cfg.batch_size * answer_tokens)))


def worker(stage: str, config_file: Path, run_dir: Path, steps: int, warmup: int, result: Path,
           threads: int | None = None) -> None:
    """Entry point of one stage's subprocess: measure, write the result as JSON."""
    torch = _torch()
    if threads:
        torch.set_num_threads(threads)
    from edgerlhf.config import PipelineConfig
    from edgerlhf.models import resolve_device

    config = stage_config(PipelineConfig.from_dict(json.loads(config_file.read_text())), stage)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if stage == "generation":
        out = bench_generation(config, run_dir, device, steps, warmup)
    elif stage == "sft":
        out = bench_sft(config, run_dir, device, steps, warmup)
    elif stage.startswith("reward_"):
        out = bench_reward(config, run_dir, device, steps, warmup, stage.removeprefix("reward_"))
    elif stage in ("ppo", "ppo_naive", "grpo", "rloo"):
        out = bench_sampling(config, run_dir, device, steps, warmup, naive=stage == "ppo_naive")
    elif stage in ("trl_grpo", "trl_rloo"):
        out = bench_trl_sampling(config, run_dir, device, steps, warmup)
    elif stage in ("dpo", "trl_dpo"):
        out = bench_dpo(config, run_dir, device, steps, warmup, trl=stage == "trl_dpo")
    elif stage in ("kto", "trl_kto"):
        out = bench_kto(config, run_dir, device, steps, warmup, trl=stage == "trl_kto")
    else:
        raise ValueError(f"unknown benchmark stage {stage!r}; choose from {list(STAGES)}")
    out["device"] = str(device)
    out["torch_threads"] = torch.get_num_threads()
    result.write_text(json.dumps(out))


# --- the driver ------------------------------------------------------------------------------------


def run_stage_process(stage: str, config_file: Path, run_dir: Path, steps: int, warmup: int,
                      timeout: float | None, threads: int | None = None) -> dict[str, Any]:
    """Measure one stage in a fresh Python process; a failure is recorded, not raised."""
    result = run_dir / f"result-{stage}.json"
    result.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "edgerlhf.lab.bench", "--worker", stage, "--config-file", str(config_file),
           "--run-dir", str(run_dir), "--steps", str(steps), "--warmup", str(warmup), "--result", str(result)]
    if threads:
        cmd += ["--threads", str(threads)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout}s"}
    if proc.returncode != 0 or not result.exists():
        return {"error": (proc.stderr or proc.stdout or f"exit status {proc.returncode}").strip()[-2000:]}
    out = json.loads(result.read_text())
    out["process_s"] = time.perf_counter() - t0
    return out


def _ratios(numerator: dict, denominator: dict, prefix: str) -> dict[str, float]:
    """`{prefix}_peak_ratio`, `..._peak_ratio_above_baseline` (on the CPU, without the runtime both processes
    carry) and `..._step_time_ratio` of two stage results, where both were measured."""
    if "peak_mb" not in numerator or "peak_mb" not in denominator:
        return {}
    base = "rss_baseline_mb"
    out = {f"{prefix}_peak_ratio": numerator["peak_mb"] / denominator["peak_mb"]}
    if base in numerator and base in denominator:
        out[f"{prefix}_peak_ratio_above_baseline"] = ((numerator["peak_mb"] - numerator[base])
                                                      / max(denominator["peak_mb"] - denominator[base], 1e-9))
    out[f"{prefix}_step_time_ratio"] = numerator["step_s"] / denominator["step_s"]
    return out


def compare(results: dict[str, dict]) -> dict[str, Any]:
    """The side-by-side ratios: naive / ours for PPO; ours / TRL for GRPO, RLOO, DPO and KTO (peak memory, step time:
    below 1, ours is the smaller or the faster); our PPO / TRL's RLOO (step time)."""
    out = _ratios(results.get("ppo_naive", {}), results.get("ppo", {}), "naive_vs_ours")
    for algorithm in [name for who, name in ALIGNMENT_STAGES.values() if who == "TRL"]:
        out.update(_ratios(results.get(algorithm, {}), results.get(f"trl_{algorithm}", {}),
                           f"{algorithm}_ours_vs_trl"))
    ours, trl_rloo = results.get("ppo", {}), results.get("trl_rloo", {})
    if "step_s" in ours and "step_s" in trl_rloo:
        out["ppo_vs_trl_rloo_step_time_ratio"] = ours["step_s"] / trl_rloo["step_s"]
    return out


def table(report: dict[str, Any]) -> str:
    """The report as text: one row per stage (whose trainer, which algorithm), then the comparisons."""
    rows = [f"{'stage':<12} {'trainer':<12} {'algorithm':<9} {'peak MB':>9} {'floor MB':>9} {'step s':>9} "
            f"{'tokens/s':>10}  note"]
    for stage, r in report["stages"].items():
        trainer, algorithm = ALIGNMENT_STAGES.get(stage, ("ours", "-"))
        head = f"{stage:<12} {trainer:<12} {algorithm:<9}"
        if "error" in r:
            rows.append(f"{head} {'error':>9}  {str(r['error']).splitlines()[-1][:80]}")
            continue
        fl = r.get("floor", {}).get("total")
        note = r.get("trainer", r.get("design", r.get("precision", "")))
        floor_mb = f"{fl / MB:>9.0f}" if fl else f"{'-':>9}"
        rows.append(f"{head} {r['peak_mb']:>9.0f} {floor_mb} {r['step_s']:>9.3f} {r['tokens_per_s']:>10.1f}  {note}")
    for key, value in report["comparisons"].items():
        rows.append(f"{key}: {value:.2f}")
    return "\n".join(rows)


def run_stage_here(stage: str, config_file: Path, run_dir: Path, steps: int, warmup: int,
                   threads: int | None = None) -> dict[str, Any]:
    """Measure one stage in this process (`--in-process`: quick, but the peaks of earlier stages carry over)."""
    result = run_dir / f"result-{stage}.json"
    t0 = time.perf_counter()
    try:
        worker(stage, config_file, run_dir, steps, warmup, result, threads)
    except Exception as exc:  # recorded like a failed subprocess
        return {"error": f"{type(exc).__name__}: {exc}"}
    out = json.loads(result.read_text())
    out["process_s"] = time.perf_counter() - t0
    return out


def run_benchmarks(config, stages: list[str], work: Path, steps: int, warmup: int, timeout: float | None = None,
                   in_process: bool = False, threads: int | None = None) -> dict[str, Any]:
    from edgerlhf.memory import gpu_info
    from edgerlhf.models import resolve_device

    run_dir = prepare_run_dir(config, work)
    config_file = work / "bench_config.json"
    config_file.write_text(config.to_json())
    results = {}
    for stage in stages:
        print(f"[bench] {stage} ...", file=sys.stderr, flush=True)
        if in_process:
            results[stage] = run_stage_here(stage, config_file, run_dir, steps, warmup, threads)
        else:
            results[stage] = run_stage_process(stage, config_file, run_dir, steps, warmup, timeout, threads)
    device = resolve_device(config.device)
    return {
        "device": str(device),
        "gpus": gpu_info(),
        "cpu_count": os.cpu_count(),
        "torch_threads": threads or _torch().get_num_threads(),
        "model": config.model.name_or_path if not config.model.random_init else
        f"{config.model.name_or_path} shape, random weights ({config.model.architecture}, "
        f"n_layer={config.model.n_layer} n_head={config.model.n_head} n_embd={config.model.n_embd})",
        "preset": config.preset,
        "steps": steps,
        "warmup": warmup,
        "memory_measure": ("CUDA peak allocated" if device.type == "cuda" else "peak RSS of the stage's process")
        + (" (all stages in one process: peaks carry over)" if in_process else ""),
        "config": config.to_dict(),
        "stages": results,
        "comparisons": compare(results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgerlhf bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="local model directory (default: the preset's model's architecture, "
                                        "random weights)")
    parser.add_argument("--preset", default="distilgpt2-8gb", help="configuration preset (default: distilgpt2-8gb)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set ppo.batch_size=8 (repeatable)")
    parser.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per stage")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--device", help="auto, cpu, cuda (default: the preset's, auto)")
    parser.add_argument("--out", default="bench.json", help="where to write the JSON report")
    parser.add_argument("--work-dir", help="where to build the synthetic run directory (default: a temp dir)")
    parser.add_argument("--timeout", type=float, help="seconds allowed per stage")
    parser.add_argument("--threads", type=int,
                        help="torch threads per stage (default: torch's; 1 gives steadier figures on a busy CPU)")
    parser.add_argument("--tiny", action="store_true", help="a toy model instead of distilgpt2 (smoke test)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every stage in this process (quick smoke runs; memory peaks then mix)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--config-file", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker, Path(args.config_file), Path(args.run_dir), args.steps, args.warmup, Path(args.result),
               args.threads)
        return 0

    from edgerlhf.config import ConfigError
    from edgerlhf.config import parse_overrides

    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
    try:
        overrides = parse_overrides(args.sets)
        if args.device:
            overrides["device"] = args.device
        config = bench_config(args.preset, args.model, overrides, tiny=args.tiny)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="edgerlhf-bench-") as tmp:
        work = Path(args.work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        report = run_benchmarks(config, stages, work, args.steps, args.warmup, args.timeout, args.in_process,
                                args.threads)
    report["command"] = "edgerlhf bench " + " ".join(argv if argv is not None else sys.argv[1:])
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"[bench] wrote {args.out}", file=sys.stderr)
    return 1 if any("error" in r for r in report["stages"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
