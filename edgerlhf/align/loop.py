"""The loop of the sampling algorithms (PPO, GRPO, RLOO): prompts, the models, resume, the step loop, samples
and probes, checkpoints, and the stage report.

`run(config, ctx, train_step)` is called by `edgerlhf.align.run` with the algorithm's step; every step has one
signature, `(models, optimizer, kl_ctl, batch_prompts, cfg, micro, step) -> (metrics, rollouts, scores)`, and
logs under the algorithm's namespace (`ppo/...`, `grpo/...`, `rloo/...`). Laid out as CleanRL's `ppo.py`
main loop: the models and optimizer, then each iteration samples its prompts, runs one step, logs, and every
`ppo.checkpoint_every` steps writes a checkpoint a resumed run continues from exactly (the sampling is reseeded
from (seed, step)). After each step the same rollouts are scored with what the step did not train on
(`rollout.independent_metrics`: the validation reward model with `reward.validation`, the gold on the known-answer
task), logged beside the step's own metrics.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgerlhf import memory
from edgerlhf.align.policy import (POLICY, VALUE_HEAD_FILE, PolicyModels, base_weight_storages, build_models,
                                   reward_source)
from edgerlhf.align.ppo import kl_controller
from edgerlhf.align.rollout import StepMicroBatches, independent_gold, independent_metrics
from edgerlhf.config import PipelineConfig
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


def save_checkpoint(path: Path, step: int, models: PolicyModels, optimizer, kl_ctl, config, run_dir: Path) -> None:
    """Everything a resumed run needs, in one file written atomically (a crash never leaves half a file)."""
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
        # Sampling is reseeded from (seed, step) at each step; the generators are kept for completeness, as tensors
        # and plain data (numpy's key as a tensor), so the file loads with `weights_only=True`.
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "numpy": (kind, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss),
                          float(cached_gaussian))},
    }
    tmp = path / (CHECKPOINT_FILE + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path / CHECKPOINT_FILE)


def load_checkpoint(path: Path, models: PolicyModels, optimizer, kl_ctl, config, run_dir: Path) -> int | None:
    """Restore a checkpoint written by `save_checkpoint`; returns its step, or None if there is none it can resume."""
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
    return int(state["step"])


def save_adapter(path: Path, models: PolicyModels) -> None:
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
    models = build_models(config, run_dir, device, validation=config.reward.validation)
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
            ctx.log(f"{algorithm}: {ckpt_dir} cannot be resumed (another algorithm, adapter or sft/reward models, or a "
                    "file that cannot be read safely); starting afresh", "warning")
        _probe(ctx, models, probe_prompts, 0, config)
    gold_scorer = independent_gold(config)
    independent = [what for what, on in (("the validation reward model", models.validation_model is not None),
                                         (f"the gold {gold_scorer}", gold_scorer is not None)) if on]
    ctx.log(f"{algorithm}: {sum(p.numel() for p in params):,} trainable parameters, rewards from "
            f"{reward_source(models, cfg)}" + (f"; rollouts also scored by {' and '.join(independent)}"
                                               if independent else ""))

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
        metrics.update(independent_metrics(algorithm, models, rollouts, scores, gold_scorer))
        metrics[algorithm_metric(algorithm, "learning_rate")] = lr
        metrics.update(memory.snapshot(device))
        ctx.log_metrics(metrics, step)
        for key, value in metrics.items():
            history.setdefault(key, []).append(value)
        ctx.progress(step, cfg.steps)

        if step % cfg.sample_every == 0 or step == 1:
            for i in sorted({0, cfg.samples_per_prompt % cfg.batch_size}):  # two different prompts when there are
                parts = models.rewards.last_parts if models.rewards is not None else {}  # this step's, per term
                ctx.log_sample(rollouts.prompts[i], rollouts.responses[i], scores[i].item(), step,
                               parts={name: values[i].item() for name, values in parts.items()} or None)
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
        reward_precision=None if models.reward_model is None else cfg.reward_precision,
        reward_model=("python function" if models.reward_function else "none" if models.reward_model is None else
                      "shared adapter" if models.reward_shared else "separate quantized copy"),
        rewards=models.rewards.names if models.rewards is not None else None,
        validation_reward=models.validation_model is not None,
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
        wall_s=time.perf_counter() - t_start,
        peak_rss_mb=memory.peak_rss_mb(),
        memory=memory.snapshot(device),
    )
