"""The loop of the sampling algorithms (PPO, GRPO, RLOO): prompts, the models, resume, the step loop, samples
and probes, checkpoints, and the stage report.

`run(config, ctx, train_step)` is called by `edgerlhf.align.run` with the algorithm's step; every step has one
signature, `(models, optimizer, kl_ctl, batch_prompts, cfg, micro, step) -> (metrics, rollouts, scores)`, and
logs under the algorithm's namespace (`ppo/...`, `grpo/...`, `rloo/...`). Laid out as CleanRL's `ppo.py`
main loop: the models and optimizer, then each iteration samples its prompts, runs one step, logs, and every
`ppo.checkpoint_every` steps writes a checkpoint a resumed run continues from exactly (the sampling is reseeded
from (seed, step)). After each step the same rollouts are scored with what the step did not train on
(`rollout.independent_metrics`: the validation reward model with `reward.validation`, the gold on the known-answer
task), logged beside the step's own metrics. With `ppo.keep_best` one of them also picks the policy the stage
writes (`BestPolicy`: the best smoothed value, weighed at each checkpoint) and, with `ppo.early_stop_patience`, when
the stage stops.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgerlhf import memory
from edgerlhf.align.policy import (POLICY, VALUE_HEAD_FILE, PolicyModels, base_weight_storages, build_models,
                                   reward_source)
from edgerlhf.align.ppo import kl_controller
from edgerlhf.align.rollout import StepMicroBatches, independent_gold, independent_metrics
from edgerlhf.config import PipelineConfig, best_signal
from edgerlhf.context import RunContext
from edgerlhf.contract import PPO_ADAPTER, algorithm_metric
from edgerlhf.data import prompts
from edgerlhf.generation import Rollouts, sample_probes
from edgerlhf.gold import probe_score
from edgerlhf.models import compute_dtype, dtype_name, resolve_device
from edgerlhf.reports import PPOReport

logger = logging.getLogger("edgerlhf.align")

CHECKPOINT_FILE = "state.pt"
"""The loop's checkpoint in `ppo/checkpoint/`: adapter, value head, optimizer, KL controller, step."""

Step = Callable[..., tuple[dict, Rollouts, torch.Tensor]]
"""`(models, optimizer, kl_ctl, batch_prompts, cfg, micro, step) -> (metrics, rollouts, scores)`."""

BEST_DIR = "best"
"""`ppo/best/`: the policy `ppo.keep_best` picked so far, as `ppo/adapter` is written (adapter, PPO's value head)."""

BEST_EMA_ALPHA = 0.2
"""Weight of the newest step in the smoothed signal of `ppo.keep_best`: one step's batch mean is noisy, and the best
of noisy values is mostly the luckiest; about the last 9 steps count."""

SIGNAL_METRICS = {"validation": "validation_reward_mean", "gold": "gold_mean"}
"""The per-step metric (`rollout.independent_metrics`, under the algorithm's namespace) of each `ppo.keep_best`."""

# --- the best policy ------------------------------------------------------------------------------


@dataclass
class BestPolicy:
    """The rule of `ppo.keep_best` and `ppo.early_stop_patience`, on numbers alone. Each step's batch mean of the
    signal updates an exponential moving average (bias-corrected as Adam's moments, so the first steps are not
    pulled towards 0); at each weighing (every `ppo.checkpoint_every` steps and the last) the average is compared
    with the best so far: strictly higher is the new best, else one more weighing without improvement, and
    `patience` of those in a row stop the stage. The policy kept for a weighing at step K is the one that sampled
    step K's rollouts (after K - 1 updates): the newest policy the average has measured. Higher is better for both
    signals (a reward model's score, a gold score)."""

    signal: str
    patience: int = 0
    alpha: float = BEST_EMA_ALPHA
    ema: float = 0.0
    weight: float = 0.0
    """1 - (1 - alpha)^n after n steps: what `ema` is divided by."""
    best_value: float | None = None
    best_step: int | None = None
    stale: int = 0
    """Weighings since the best one."""
    weights: dict | None = field(default=None, repr=False)
    """The best policy's adapter (and PPO's value head) as CPU tensors, from `policy_weights`; set by the loop."""

    def observe(self, value: float) -> None:
        if np.isfinite(value):
            self.ema = (1 - self.alpha) * self.ema + self.alpha * float(value)
            self.weight = (1 - self.alpha) * self.weight + self.alpha

    @property
    def smoothed(self) -> float | None:
        return self.ema / self.weight if self.weight else None

    def weigh(self, step: int) -> bool:
        """Compare the smoothed signal with the best so far; True when it is the new best (at `step`)."""
        value = self.smoothed
        if value is None:
            return False
        if self.best_value is None or value > self.best_value:
            self.best_value, self.best_step, self.stale = value, step, 0
            return True
        self.stale += 1
        return False

    @property
    def exhausted(self) -> bool:
        """The patience is spent: the stage stops."""
        return self.patience > 0 and self.stale >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from a checkpoint's state, when it followed the same signal (else start afresh)."""
        if state and state.get("signal") == self.signal:
            for name in ("ema", "weight", "best_value", "best_step", "stale", "weights"):
                setattr(self, name, state[name])


def pick_best(values: list[float], every: int, patience: int = 0,
              alpha: float = BEST_EMA_ALPHA) -> tuple[int | None, float | None, int | None]:
    """`BestPolicy` on a series of per-step batch means (step 1 first), weighed as the loop weighs it: (the best step,
    its smoothed value, the step the stage stops at early or None)."""
    rule = BestPolicy("series", patience, alpha)
    for step, value in enumerate(values, 1):
        rule.observe(value)
        if step % every == 0 or step == len(values):
            rule.weigh(step)
            if rule.exhausted and step < len(values):
                return rule.best_step, rule.best_value, step
    return rule.best_step, rule.best_value, None


def policy_weights(models: PolicyModels) -> dict[str, Any]:
    """A copy of the policy as it is now, on the CPU: its adapter and (PPO) value head; small (LoRA only)."""
    from peft import get_peft_model_state_dict

    state = get_peft_model_state_dict(models.model, adapter_name=POLICY)
    return {"adapter": {k: v.detach().to("cpu", copy=True) for k, v in state.items()},
            "value_head": None if models.value_head is None else
            {k: v.detach().to("cpu", copy=True) for k, v in models.value_head.state_dict().items()}}


# --- checkpoints ----------------------------------------------------------------------------------


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


def save_checkpoint(path: Path, step: int, models: PolicyModels, optimizer, kl_ctl, config, run_dir: Path,
                    best: BestPolicy | None = None) -> None:
    """Everything a resumed run needs, in one file written atomically (a crash never leaves half a file), with
    `ppo.keep_best` the best policy so far and the rule's state too."""
    from peft import get_peft_model_state_dict

    path.mkdir(parents=True, exist_ok=True)
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    state = {
        "step": step,
        "adapter": {k: v.cpu() for k, v in get_peft_model_state_dict(models.model, adapter_name=POLICY).items()},
        "value_head": models.value_head.state_dict() if models.value_head is not None else None,
        "optimizer": optimizer.state_dict(),
        "kl_ctl": kl_ctl.state_dict(),
        "signature": _signature(config, run_dir),
        "best": best.state_dict() if best is not None else None,
        # Sampling is reseeded from (seed, step) at each step; the generators are kept for completeness, as tensors
        # and plain data (numpy's key as a tensor), so the file loads with `weights_only=True`.
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                          float(cached_gaussian))},
    }
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT_FILE)


def load_checkpoint(path: Path, models: PolicyModels, optimizer, kl_ctl, config, run_dir: Path,
                    best: BestPolicy | None = None) -> int | None:
    """Restore a checkpoint written by `save_checkpoint` (and into `best` the rule's state, when it followed the
    same signal); returns its step, or None if there is none it can resume."""
    from peft import set_peft_model_state_dict

    file = path / CHECKPOINT_FILE
    if not file.exists():
        return None
    try:
        # Never a full unpickle: a file in the run directory must not be able to run code in the job process.
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # an old checkpoint (numpy RNG state), or not a checkpoint at all
        logger.warning(
            f"{file} cannot be read with weights_only=True ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
            "it is ignored and the stage is starting afresh")
        return None
    if not isinstance(state, dict) or state.get("signature") != _signature(config, run_dir):
        return None  # another algorithm, adapter shape or sft/reward models: the old checkpoint does not apply
    set_peft_model_state_dict(models.model, state["adapter"], adapter_name=POLICY)
    if models.value_head is not None:
        models.value_head.load_state_dict(state["value_head"])
    optimizer.load_state_dict(state["optimizer"])
    kl_ctl.load_state_dict(state["kl_ctl"])
    if best is not None:
        best.load_state_dict(state.get("best"))
    return int(state["step"])


def save_adapter(path: Path, models: PolicyModels, weights: dict[str, Any] | None = None) -> None:
    """The final policy: a standard peft adapter directory (loadable with `PeftModel.from_pretrained` on
    sft/merged) plus PPO's value head, when there is one; the models' policy as it is now, or `weights`
    (`policy_weights`, of an earlier step)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = weights["adapter"] if weights is not None else get_peft_model_state_dict(models.model, adapter_name=POLICY)
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path / "adapter_model.safetensors"))
    peft_config = models.model.peft_config[POLICY]
    peft_config.inference_mode = True
    peft_config.save_pretrained(str(path))
    peft_config.inference_mode = False
    if models.value_head is not None:
        torch.save(weights["value_head"] if weights is not None else models.value_head.state_dict(),
                   path / VALUE_HEAD_FILE)
    else:
        (path / VALUE_HEAD_FILE).unlink(missing_ok=True)  # an earlier PPO run's critic is not this policy's


def _seed_step(seed: int, step: int) -> None:
    """Reseed every generator from (seed, step): a resumed run samples exactly what an uninterrupted one would."""
    s = (seed * 1_000_003 + step) % (2 ** 31)
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)


def _probe(ctx, models: PolicyModels, prompts: list[str], step: int, config) -> None:
    """Sample the fixed held-out probe prompts (same seed each time) and log them for this checkpoint, scored
    as the SFT stage scores its probes (`gold.probe_score`), so the Probes page compares like with like."""
    if not prompts:
        return
    rollouts = sample_probes(models.model, models.tokenizer, prompts, config)
    for prompt, response in zip(prompts, rollouts.responses):
        ctx.log_sample(prompt, response, probe_score(prompt, response, config.data), step, kind="probe",
                       checkpoint=f"ppo/step-{step}")


# --- the stage ------------------------------------------------------------------------------------


def learning_rate_at(cfg, step: int) -> float:
    """The learning rate of iteration `step` (from 1): `ppo.learning_rate`, after rising linearly over the first
    `ppo.lr_warmup_steps`. A function of the step alone, so a resumed run continues the schedule."""
    if cfg.lr_warmup_steps and step < cfg.lr_warmup_steps:
        return cfg.learning_rate * step / cfg.lr_warmup_steps
    return cfg.learning_rate


def run(config: PipelineConfig, ctx: RunContext, train_step: Step) -> PPOReport:
    """The alignment stage with a sampling algorithm (`config.algorithm`, whose step is `train_step`) against the
    reward model, on the SFT policy; returns the stage report."""
    algorithm = config.algorithm
    cfg = config.ppo
    device = resolve_device(config.device)
    run_dir = Path(ctx.run_dir)
    out_dir = ctx.stage_dir("ppo")
    torch.manual_seed(config.seed)
    memory.reset_peak(device)

    train_prompts = [row["prompt"] for row in prompts(run_dir, "train")]
    probe_prompts = [row["prompt"] for row in prompts(run_dir, "test")[: cfg.n_probe_prompts]]

    # What the stage holds, measured around building it: one copy of the network (plus one quantized copy for
    # an int8/int4 reward model), the adapters and (PPO only) the value head.
    before = memory.tensor_bytes(device)
    models = build_models(config, run_dir, device, validation=config.reward.validation, ensemble=config.reward.ensemble)
    held_bytes = memory.tensor_bytes(device) - before
    network_bytes = sum(base_weight_storages([models.model]).values())
    params = models.policy_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, eps=1e-5, weight_decay=0.0)
    kl_ctl = kl_controller(config)

    signal = best_signal(config)
    best = BestPolicy(signal, cfg.early_stop_patience) if signal is not None else None
    signal_key = algorithm_metric(algorithm, SIGNAL_METRICS[signal]) if signal is not None else None
    best_dir = out_dir / BEST_DIR
    ckpt_dir = out_dir / "checkpoint"
    start = load_checkpoint(ckpt_dir, models, optimizer, kl_ctl, config, run_dir, best) or 0
    # ppo/best/ is the checkpoint's best (a crash may have left a newer one the resumed steps will weigh again).
    shutil.rmtree(best_dir, ignore_errors=True)
    if best is not None and best.weights is not None:
        save_adapter(best_dir, models, best.weights)
    end = start if best is not None and best.exhausted else cfg.steps  # an early-stopped stage does not go on
    if start:
        ctx.log(f"{algorithm}: resuming from {ckpt_dir} at step {start}")
    else:
        if (ckpt_dir / CHECKPOINT_FILE).exists():
            ctx.log(f"{algorithm}: {ckpt_dir} cannot be resumed (another algorithm, adapter or sft/reward models, or a "
                    "file that cannot be read safely); starting afresh", "warning")
        _probe(ctx, models, probe_prompts, 0, config)
    gold_scorer = independent_gold(config)
    independent = [what for what, on in (("the validation reward model", models.validation_model is not None),
                                         (f"the gold {gold_scorer}", gold_scorer is not None)) if on]
    ctx.log(f"{algorithm}: {sum(p.numel() for p in params):,} trainable parameters, rewards from "
            f"{reward_source(models, cfg)}" + (f"; rollouts also scored by {' and '.join(independent)}"
                                               if independent else ""))

    if models.ensemble_models:
        ctx.log(f"{algorithm}: the reward model's score is the {cfg.ensemble_score} of {1 + len(models.ensemble_models)} "
                f"ensemble members" + (f" (lambda {cfg.ensemble_penalty:g})" if cfg.ensemble_score == "mean_minus_std"
                                       else ""))
    if best is not None:
        ctx.log(f"{algorithm}: the policy written is the best by {signal} (`ppo.keep_best`), weighed every "
                f"{cfg.checkpoint_every} steps" + (f"; stopping after {cfg.early_stop_patience} weighings without "
                                                   "improvement" if cfg.early_stop_patience else ""))

    def weighs(step: int) -> bool:
        return best is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps)

    history: dict[str, list[float]] = {}
    micro = StepMicroBatches.of(cfg, ctx, device, config)
    t_start = time.perf_counter()
    last_step = end
    for step in range(start + 1, end + 1):
        ctx.check_cancelled()
        _seed_step(config.seed, step)
        n_prompts = cfg.batch_size // cfg.samples_per_prompt
        chosen = random.choices(train_prompts, k=n_prompts) if len(train_prompts) < n_prompts \
            else random.sample(train_prompts, n_prompts)
        batch_prompts = [p for p in chosen for _ in range(cfg.samples_per_prompt)]  # each prompt k times in a row
        lr = learning_rate_at(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        sampled_by = policy_weights(models) if weighs(step) else None  # the policy of this step's rollouts
        metrics, rollouts, scores = train_step(models, optimizer, kl_ctl, batch_prompts, cfg, micro, step)
        metrics.update(independent_metrics(algorithm, models, rollouts, scores, gold_scorer))
        metrics[algorithm_metric(algorithm, "learning_rate")] = lr
        metrics.update(memory.snapshot(device))
        ctx.log_metrics(metrics, step)
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        ctx.progress(step, cfg.steps)
        if best is not None:
            best.observe(metrics[signal_key])
            if weighs(step):
                if best.weigh(step):
                    best.weights = sampled_by
                    save_adapter(best_dir, models, sampled_by)
                if best.best_step is not None:
                    ctx.log_metrics({algorithm_metric(algorithm, "best_step"): best.best_step}, step)

        if step % cfg.sample_every == 0 or step == 1:
            for i in sorted({0, cfg.samples_per_prompt % cfg.batch_size}):  # two different prompts when there are
                parts = models.rewards.last_parts if models.rewards is not None else {}  # this step's, per term
                ctx.log_sample(rollouts.prompts[i], rollouts.responses[i], scores[i].item(), step,
                               parts={name: values[i].item() for name, values in parts.items()} or None)
        stop = best is not None and best.exhausted and step < cfg.steps
        if step % cfg.checkpoint_every == 0 and step < cfg.steps and not stop:
            save_checkpoint(ckpt_dir, step, models, optimizer, kl_ctl, config, run_dir, best)
            _probe(ctx, models, probe_prompts, step, config)
        if stop:
            ctx.log(f"{algorithm}: stopping early at step {step}: {signal} has not improved for "
                    f"{cfg.early_stop_patience} weighings (best at step {best.best_step})")
            last_step = step
            break

    # The final policy (with `ppo.keep_best`, the best one), plus a last checkpoint so a finished stage re-run does
    # not train again.
    kept = best.weights if best is not None else None
    save_adapter(run_dir / PPO_ADAPTER, models, kept)
    save_checkpoint(ckpt_dir, last_step, models, optimizer, kl_ctl, config, run_dir, best)
    if start < last_step:
        _probe(ctx, models, probe_prompts, last_step, config)
    if kept is not None:
        ctx.log(f"{algorithm}: {PPO_ADAPTER} is the policy of step {best.best_step}, the best by {signal} "
                f"({best.best_value:.4g} smoothed)")
        ctx.artifact("best", best_dir)
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
        reward_precision=None if models.reward_model is None else cfg.reward_precision,
        reward_model=("python function" if models.reward_function else "none" if models.reward_model is None else
                      "shared adapter" if models.reward_shared else "separate quantized copy"),
        rewards=models.rewards.names if models.rewards is not None else None,
        validation_reward=models.validation_model is not None,
        ensemble_members=1 + len(models.ensemble_models or []),
        gold_scorer=gold_scorer,
        compute_dtype=dtype_name(compute_dtype(device)),
        device=str(device),
        trainable_parameters=sum(p.numel() for p in params),
        network_bytes=int(network_bytes),
        held_bytes=int(held_bytes),
        network_copies=held_bytes / network_bytes,
        first={k: v[0] for k, v in history.items() if k.startswith(namespace)},
        final={k: last(k) for k in history if k.startswith(namespace)},
        kl_coef_final=kl_ctl.value,
        best_signal=signal,
        best_step=best.best_step if best is not None else None,
        best_value=best.best_value if best is not None else None,
        stopped_early_at=last_step if last_step < cfg.steps else None,
        wall_s=time.perf_counter() - t_start,
        peak_rss_mb=memory.peak_rss_mb(),
        memory=memory.snapshot(device),
    )
