"""What the alignment algorithms that train offline through a TRL trainer share (DPO in `dpo.py`, KTO in `kto.py`):
the CPU's answer-only log-prob head, the one network's count, checkpoints and their resume, the saved policy, the
callback that reports through the context, the probes, and the stage around the trainer (`run`).

Each algorithm above this module builds its own trainer (TRL's `DPOTrainer` or `KTOTrainer` on data tokenized in
the model's `PromptFormat`, a fresh LoRA on sft/merged with `ref_model=None`, so the reference is the same network
with the adapter disabled) and says which of TRL's logs are its metrics; `run_trainer` does the rest, alike for both:

- one copy of the network, measured around building the trainer (`memory.tensor_bytes`) and counted by storage
  (`held_base_storages`);
- the Trainer's own checkpoints (`ppo/checkpoint/checkpoint-N/`: adapter, optimizer, scheduler, data position and
  RNG), resumed when the signature (`<algorithm>_signature.json`: algorithm, adapter shape, sft/merged) matches;
- the policy saved where every loader looks, `ppo/adapter/` (`contract.PPO_ADAPTER`): a standard peft adapter on
  sft/merged, without a value head;
- metrics under the algorithm's namespace (`contract.algorithm_metric`), `<algorithm>/step_s` and `mem/*` at each
  step, probes at each checkpoint, progress and cancel.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgerlhf import memory
from edgerlhf.align.policy import base_weight_storages
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import KL_CHUNK, PPO_ADAPTER, SFT_MERGED, algorithm_metric, algorithm_traits
from edgerlhf.data import prompts
from edgerlhf.errors import require
from edgerlhf.generation import sample_probes
from edgerlhf.models import (compute_dtype, dtype_name, head_logits, load_causal_lm, load_tokenizer, logit_transform,
                             lora_config, resolve_device, transform_logits, upcast_trainable)
from edgerlhf.oom import MicroBatch, planner_hint
from edgerlhf.reports import PPOReport

CHECKPOINT_DIR = "ppo/checkpoint"
"""The Trainer's checkpoints (`checkpoint-N/`), beside PPO's `state.pt` (which the offline trainers never read)."""
SIGNATURE_SUFFIX = "_signature.json"
"""`<algorithm>_signature.json` in `CHECKPOINT_DIR`: what a checkpoint must match to be resumed."""


# --- the CPU's log-prob head ----------------------------------------------------------------------


class AnswerLogprobs(torch.autograd.Function):
    """log p(target) at each answer position (N,) from the hidden states (N, H) through a linear LM head and the
    family's `scale` and soft `cap` (`models.logit_transform`), the vocabulary-wide log-softmax computed
    `KL_CHUNK` logits at a time: no (N, V) tensor is kept, in the forward or for the backward, which recomputes
    each piece's softmax (one more head matmul) to get d log p(t) / d logits = onehot(t) - softmax, times the
    transform's derivative. Also returns, without gradients, each position's entropy, mean logit and whether
    the target is the top token (what TRL logs)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale=1.0, cap=None):
        rows = max(1, KL_CHUNK // weight.shape[0])
        token_logp, entropy, mean_logits, is_top1 = [], [], [], []
        for h, t in zip(hidden.split(rows), targets.split(rows)):
            logits = transform_logits(F.linear(h, weight, bias).float(), scale, cap)  # (rows, V)
            logp = logits.log_softmax(-1)
            token_logp.append(logp.gather(-1, t[:, None]).squeeze(-1))
            entropy.append(-(logp.exp() * logp).sum(-1))
            mean_logits.append(logits.mean(-1))
            is_top1.append(logits.argmax(-1) == t)
            del logits, logp
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.scale, ctx.cap = scale, cap
        extras = torch.cat(entropy), torch.cat(mean_logits), torch.cat(is_top1)
        ctx.mark_non_differentiable(*extras)
        return (torch.cat(token_logp), *extras)

    @staticmethod
    def backward(ctx, grad, *_):
        hidden, weight, bias, targets = ctx.saved_tensors
        rows = max(1, KL_CHUNK // weight.shape[0])
        grad_hidden = torch.empty_like(hidden)
        for i in range(0, len(hidden), rows):
            g, t = grad[i:i + rows].float(), targets[i:i + rows]
            z = F.linear(hidden[i:i + rows], weight, bias).float() * ctx.scale  # (rows, V)
            capped = torch.tanh(z / ctx.cap) if ctx.cap else None  # d(cap * tanh(z / cap)) / dz = 1 - tanh^2
            d = (capped * ctx.cap if ctx.cap else z).softmax(-1).mul_(-g[:, None])  # (rows, V)
            d[torch.arange(len(t), device=d.device), t] += g
            if ctx.cap:
                d.mul_(1 - capped.square())
            grad_hidden[i:i + rows] = (d.mul_(ctx.scale).to(weight.dtype) @ weight).to(hidden.dtype)
        return grad_hidden, None, None, None, None, None


def add_answer_logprob_head(model) -> None:
    """Compute TRL's fused LM head plainly, on the answer positions only and a piece of the vocabulary-wide
    log-softmax at a time (`AnswerLogprobs`): `model(..., labels=labels, fused_lm_head=True)` keeps its meaning
    (per-token log-probs of the labels, zero where a label is -100), its outputs those DPO and KTO read.

    TRL's head projects every position (prompt included) in vocabulary tiles to save GPU memory; its CPU
    fallback makes several passes over each (tokens, vocab) tile: 11.8-13.0 s per DPO step of the tiny preset
    (16 sequences x 142 tokens x 50k vocabulary) against 1.8-1.9 s here, on the same loaded core. On a GPU
    TRL's kernel stays. A head that trains (an LM head among the LoRA targets) falls back to the whole
    (answer positions, vocabulary) log-softmax, which autograd keeps for the backward.
    """
    from trl.trainer.utils import FusedCausalLMOutput

    fused = model.forward  # TRL's: without `fused_lm_head` it is the model's own forward
    head = model.get_output_embeddings()
    transform = logit_transform(model.config)  # (scale, soft cap), as the model's forward and TRL's kernel apply

    def forward(*args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return fused(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]  # (B, T-1, H)
        targets = labels[:, 1:]  # (B, T-1): position t predicts token t+1
        mask = targets != -100  # (B, T-1)
        if type(head) is torch.nn.Linear and not any(p.requires_grad for p in head.parameters()):
            token_logp, entropy, mean_logits, is_top1 = AnswerLogprobs.apply(hidden[mask], head.weight, head.bias,
                                                                             targets[mask], *transform)
        else:
            logits = head_logits(model, hidden[mask])  # (N, V)
            with torch.no_grad():  # the trainers log these, they do not train on them
                mean_logits, is_top1 = logits.mean(-1), logits.argmax(-1) == targets[mask]
            logp = F.log_softmax(logits, dim=-1)  # (N, V), kept for the backward
            del logits
            token_logp = logp.gather(-1, targets[mask].unsqueeze(-1)).squeeze(-1)  # (N,)
            with torch.no_grad():
                entropy = -(logp.exp() * logp).sum(-1)

        def scatter(values: torch.Tensor) -> torch.Tensor:  # (N,) -> (B, T-1), zero off the answers
            return values.new_zeros(mask.shape).masked_scatter(mask, values)

        return FusedCausalLMOutput(loss=-token_logp.sum() / mask.sum().clamp(min=1), log_probs=scatter(token_logp),
                                   entropy=scatter(entropy), mean_logits=scatter(mean_logits),
                                   is_top1=scatter(is_top1), label_mask=mask)

    model.forward = forward


def held_base_storages(trainer) -> dict[int, int]:
    """The base-network weights the trainer holds (policy and reference), each storage once
    (`policy.base_weight_storages`): one copy of sft/merged with the reference as the adapter disabled."""
    return base_weight_storages([m for m in (trainer.model, trainer.ref_model) if m is not None])


# --- checkpoints ----------------------------------------------------------------------------------


def signature(config: PipelineConfig, run_dir: Path, algorithm: str, cfg) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the algorithm, its adapter's shape (`cfg`, its config section) and
    the SFT model it was trained on."""
    inputs = {}
    for file in sorted((run_dir / SFT_MERGED).rglob("*.safetensors")):
        stat = file.stat()
        inputs[str(file.relative_to(run_dir))] = [stat.st_size, stat.st_mtime_ns]
    return {"algorithm": algorithm, "lora_r": cfg.lora_r, "lora_alpha": cfg.lora_alpha,
            "target_modules": list(config.sft.target_modules), "inputs": inputs}


def resumable_checkpoint(config: PipelineConfig, run_dir: Path, algorithm: str, cfg,
                         ctx: RunContext | None = None) -> Path | None:
    """The last Trainer checkpoint of this run when its signature matches; stale ones are removed (and said so)."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = run_dir / CHECKPOINT_DIR
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last is None:
        return None
    file = ckpt_dir / f"{algorithm}{SIGNATURE_SUFFIX}"
    if file.exists() and json.loads(file.read_text()) == signature(config, run_dir, algorithm, cfg):
        return Path(last)
    if ctx is not None:
        ctx.log(f"{algorithm}: {ckpt_dir} was trained with another algorithm, adapter or sft model; starting afresh",
                "warning")
    for old in ckpt_dir.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)
    return None


def sign_checkpoints(config: PipelineConfig, run_dir: Path, algorithm: str, cfg) -> None:
    """Start the checkpoint directory afresh for `algorithm`: its signature, and no other algorithm's (whose
    checkpoints `resumable_checkpoint` removed), so none resumes what another trained."""
    ckpt_dir = run_dir / CHECKPOINT_DIR
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    for old in ckpt_dir.glob(f"*{SIGNATURE_SUFFIX}"):
        old.unlink()
    (ckpt_dir / f"{algorithm}{SIGNATURE_SUFFIX}").write_text(json.dumps(signature(config, run_dir, algorithm, cfg)))


def load_adapter_weights(trainer, checkpoint: Path) -> None:
    """The policy LoRA of a Trainer checkpoint, loaded into the trainer's model."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(trainer.model, load_file(str(checkpoint / "adapter_model.safetensors")))


def save_adapter(path: Path, trainer) -> None:
    """The final policy: a standard peft adapter directory, loadable with `PeftModel.from_pretrained` on sft/merged
    (under any adapter name: `models.load_policy`, `policy.build_models`). A PPO run's value head is not left behind."""
    shutil.rmtree(path, ignore_errors=True)
    trainer.model.save_pretrained(str(path))


def assemble_trainer(trainer_class, algorithm: str, config: PipelineConfig, ctx: RunContext, model, tokenizer,
                     device, args, train_dataset, eval_dataset, callbacks=(), ref_model=None):
    """`trainer_class` (TRL's trainer, or the stage's subclass of it) on `model` with a fresh LoRA policy from the
    algorithm's section (`lora_r`, `lora_alpha`, on `sft.target_modules`), set up alike for every offline
    algorithm: metrics through the context rather than print(), the LoRA in fp32, and out-of-memory halving of the
    section's `batch_size`."""
    from transformers import PrinterCallback

    cfg = getattr(config, algorithm_traits(algorithm).section)
    trainer = trainer_class(model=model, ref_model=ref_model, args=args, processing_class=tokenizer,
                            peft_config=lora_config(model, cfg.lora_r, cfg.lora_alpha, config.sft.target_modules),
                            callbacks=list(callbacks), train_dataset=train_dataset, eval_dataset=eval_dataset)
    trainer.remove_callback(PrinterCallback)  # metrics go through the context, not print()
    upcast_trainable(trainer.model)  # the LoRA trains in fp32 whatever the base's dtype, as in every stage
    trainer.micro = MicroBatch(cfg.batch_size, algorithm, ctx, device, planner_hint=lambda: planner_hint(config, "ppo"))
    return trainer


# --- reporting ------------------------------------------------------------------------------------


def eval_renames(renames: dict[str, str], names: tuple[str, ...]) -> dict[str, str]:
    """The held-out counterparts (`eval_<TRL's name>` -> `eval_<ours>`) of the training metrics `names`."""
    return {f"eval_{old}": f"eval_{new}" for old, new in renames.items() if new in names}


def context_callback(config: PipelineConfig, ctx: RunContext, tokenizer, probe_prompts: list[str], device,
                     algorithm: str, cfg, renames: dict[str, str]):
    """A TrainerCallback: TRL's logs renamed (`renames`: TRL's name -> ours) as `<algorithm>/*` metrics, `mem/*` and
    `<algorithm>/step_s` at each step, probes at checkpoints, progress and cancel. Its `history` keeps every value."""
    from transformers import TrainerCallback

    def metric(name: str) -> str:
        return algorithm_metric(algorithm, name)

    class ContextCallback(TrainerCallback):
        def __init__(self):
            self.history: dict[str, list[float]] = {}
            self.last_time = time.perf_counter()

        def on_train_begin(self, args, state, control, **kwargs):
            self.last_time = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            now = time.perf_counter()
            step_s, self.last_time = now - self.last_time, now
            ctx.log_metrics({metric("step_s"): step_s, **memory.snapshot(device)}, state.global_step)
            self.history.setdefault(metric("step_s"), []).append(step_s)
            ctx.progress(state.global_step, cfg.max_steps)
            ctx.check_cancelled()

        def on_save(self, args, state, control, model=None, **kwargs):
            if probe_prompts:
                probe(ctx, model, tokenizer, probe_prompts, state.global_step, config)
            self.last_time = time.perf_counter()  # probes are not training time

        def on_evaluate(self, args, state, control, **kwargs):
            self.last_time = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            metrics = {metric(new): float(logs[old]) for old, new in renames.items()
                       if logs.get(old) is not None and math.isfinite(float(logs[old]))}
            if metrics:
                ctx.log_metrics(metrics, state.global_step)
            for key, value in metrics.items():
                self.history.setdefault(key, []).append(value)

    return ContextCallback()


def probe(ctx: RunContext, model, tokenizer, prompts: list[str], step: int, config: PipelineConfig) -> None:
    """The fixed held-out probe prompts, sampled and scored as the SFT and PPO stages sample theirs."""
    from edgerlhf.gold import probe_score

    rollouts = sample_probes(model, tokenizer, prompts, config)
    for prompt, response in zip(prompts, rollouts.responses):
        ctx.log_sample(prompt, response, probe_score(prompt, response, config.data), step, kind="probe",
                       checkpoint=f"ppo/step-{step}")


# --- the stage ------------------------------------------------------------------------------------


BuildTrainer = Callable[..., Any]
"""`build(config, ctx, model, tokenizer, device, callbacks=[...])`: an algorithm's TRL trainer on `model`
(sft/merged)."""


def run_trainer(config: PipelineConfig, ctx: RunContext, algorithm: str, build: BuildTrainer, renames: dict[str, str],
        describe: Callable[[Any], str]) -> PPOReport:
    """The alignment stage through `algorithm`'s trainer (`build`, its settings in its config section): train from
    the SFT policy, resuming a matching checkpoint, write `ppo/adapter` and return the stage's report. `renames`
    maps TRL's logs to the algorithm's metrics; `describe(trainer)` says what it trains on (for the log)."""
    cfg = getattr(config, algorithm_traits(algorithm).section)
    device = resolve_device(config.device)
    run_dir = Path(ctx.run_dir)
    torch.manual_seed(config.seed)
    memory.reset_peak(device)
    merged = require(run_dir / SFT_MERGED, "sft")
    tokenizer = load_tokenizer(merged)
    probe_prompts = [r["prompt"] for r in prompts(run_dir, "test")][: cfg.n_probe_prompts]

    # What the stage holds, measured around building it: one copy of the network, the adapter (its optimizer later).
    callback = context_callback(config, ctx, tokenizer, probe_prompts, device, algorithm, cfg, renames)
    before = memory.tensor_bytes(device)
    trainer = build(config, ctx, load_causal_lm(merged, device), tokenizer, device, callbacks=[callback])
    held_bytes = memory.tensor_bytes(device) - before
    network_bytes = sum(held_base_storages(trainer).values())
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    resume = resumable_checkpoint(config, run_dir, algorithm, cfg, ctx)
    start = 0
    if resume is not None:
        start = json.loads((resume / "trainer_state.json").read_text())["global_step"]
        ctx.log(f"{algorithm}: resuming from {resume} at step {start}")
    else:
        sign_checkpoints(config, run_dir, algorithm, cfg)
        if probe_prompts:
            probe(ctx, trainer.model, tokenizer, probe_prompts, 0, config)
    ctx.log(f"{algorithm}: {n_trainable:,} trainable parameters, {describe(trainer)}, beta "
            f"{cfg.beta}, {cfg.max_steps} steps on {device} ({dtype_name(compute_dtype(device))}); reference = "
            "the adapter disabled")

    started = time.perf_counter()
    if start < cfg.max_steps:
        trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    else:  # a finished stage run again: the Trainer would take one more step past its end
        load_adapter_weights(trainer, resume)
    wall_s = time.perf_counter() - started
    save_adapter(run_dir / PPO_ADAPTER, trainer)
    ctx.artifact("adapter", run_dir / PPO_ADAPTER)
    ctx.artifact("checkpoint", run_dir / CHECKPOINT_DIR)

    history = callback.history
    train_keys = [k for k in history if not k.startswith(algorithm_metric(algorithm, "eval_"))]

    def last(key: str, n: int = 5) -> float | None:
        values = history.get(key, [])[-n:]
        return float(np.mean(values)) if values else None

    return PPOReport(
        algorithm=algorithm,
        steps=cfg.max_steps,
        resumed_from_step=start,
        reward_precision=None,
        reward_model="none",
        compute_dtype=dtype_name(compute_dtype(device)),
        device=str(device),
        trainable_parameters=n_trainable,
        network_bytes=int(network_bytes),
        held_bytes=int(held_bytes),
        network_copies=held_bytes / network_bytes,
        first={k: history[k][0] for k in train_keys},
        final={k: last(k, 5 if k in train_keys else 1) for k in history},
        kl_coef_final=None,
        wall_s=wall_s,
        peak_rss_mb=memory.peak_rss_mb(),
        memory=memory.snapshot(device),
    )
