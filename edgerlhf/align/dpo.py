"""DPO — the alignment stage with `algorithm=dpo` (`edgerlhf.align.run` hands it here): Direct Preference
Optimization on the preference pairs, with TRL's DPOTrainer.

DPO (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is Secretly a Reward
Model") trains the policy offline on the labelled pairs, with no reward model and no sampling:

    loss = -log sigmoid(beta * [(log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))])

(`dpo.loss_type` also offers IPO and hinge). TRL's `DPOTrainer` computes it; this module feeds it the
pairs of `data/train_prefs.jsonl` tokenized in the model's `PromptFormat` (`preference_dataset`: the prompt
through the chat template when there is one, each answer with its end of turn, exactly as SFT trained
them), reports through the context, checkpoints, resumes and honours cancel.

Memory design — one copy of the base network, as PPO: sft/merged is loaded once and TRL wraps it in peft
with a fresh LoRA (`dpo.lora_r` on `sft.target_modules`); with a peft model and `ref_model=None` TRL
scores the reference with the adapter disabled. `held_base_storages` counts the base weights the trainer
can reach, and the report's `network_copies` is measured around building it (`memory.tensor_bytes`).

The policy is saved where the rest of the system loads an aligned policy, `ppo/adapter/`
(`edgerlhf.contract.PPO_ADAPTER`): a standard peft adapter directory on sft/merged, without a value head
(evaluation, chat and export read the LoRA only). Checkpoints are the Trainer's own (`ppo/checkpoint/
checkpoint-N/`: adapter, optimizer, scheduler, data position and RNG), resumed when their signature
(`dpo_signature.json`: adapter shape, sft/merged) still matches.

Metrics (`edgerlhf.contract.algorithm_metric("dpo", ...)`), per optimizer step: `dpo/loss`, `dpo/accuracy`
(pairs whose implicit reward beta * log(pi/ref) ranks chosen above rejected), `dpo/margin` (chosen minus
rejected implicit reward), `dpo/chosen_reward`, `dpo/rejected_reward`, `dpo/kl`, `dpo/learning_rate`,
`dpo/grad_norm`, `dpo/step_s`, and at `dpo.eval_every` the same on the held-out pairs (`dpo/eval_loss`,
`dpo/eval_accuracy`, `dpo/eval_margin`, `dpo/eval_kl`); `mem/*` at each step. `dpo/kl` is the KL of the
policy from the reference on the batch's *chosen* responses (teacher-forced, not sampled): at each
position of a chosen answer the exact KL(pi(.|context) || ref(.|context)) of the two next-token
distributions, summed over the answer, averaged over the pairs (`chosen_kl`).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from edgerlhf import memory
from edgerlhf.align.policy import base_weight_storages
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import KL_CHUNK, PPO_ADAPTER, SFT_MERGED, TEST_PREFS, TRAIN_PREFS, algorithm_metric
from edgerlhf.data import prompts, read_prefs
from edgerlhf.dialogue import PromptFormat
from edgerlhf.errors import require
from edgerlhf.generation import sample_probes
from edgerlhf.models import (compute_dtype, dtype_name, head_logits, load_causal_lm, load_tokenizer, logit_transform,
                             lora_config, resolve_device, trainer_arguments, transform_logits, upcast_trainable)
from edgerlhf.oom import MicroBatch, SplitPairsOnOutOfMemory, planner_hint
from edgerlhf.reports import PPOReport

ALGORITHM = "dpo"
CHECKPOINT_DIR = "ppo/checkpoint"
"""The Trainer's checkpoints (`checkpoint-N/`), beside PPO's `state.pt` (which DPO never reads)."""
SIGNATURE_FILE = "dpo_signature.json"


def metric(name: str) -> str:
    return algorithm_metric(ALGORITHM, name)


# --- data: the pairs in the model's PromptFormat --------------------------------------------------


def preference_dataset(path: Path, tokenizer, max_length: int):
    """Tokenized preference pairs: `prompt_ids`, `chosen_ids`, `rejected_ids`, the form TRL's DPO collator takes.

    The prompt is `PromptFormat.prompt(p)` and each answer `PromptFormat.answer(r)` (the response and its
    end: EOS, or the chat template's end of turn), tokenized apart as `sft.sft_dataset` tokenizes them, so
    DPO scores exactly the answers SFT taught and generation produces. Within `max_length` the answers keep
    their start and the prompt its end (the turn they answer): each answer is cut to leave the prompt at
    least half the budget (or all of itself), then the prompt is cut from the left to fit the longer one.
    Pairs against an empty answer (`data.gold_empty_fraction`) stay: they teach that an empty answer is worse.
    """
    from datasets import Dataset

    fmt = PromptFormat.of(tokenizer)
    rows = []
    for r in read_prefs(path):
        prompt_ids = tokenizer(fmt.prompt(r["prompt"]), add_special_tokens=fmt.add_special_tokens)["input_ids"]
        keep = max_length - min(len(prompt_ids), max_length // 2)
        chosen_ids = tokenizer(fmt.answer(r["chosen"]), add_special_tokens=False)["input_ids"][:keep]
        rejected_ids = tokenizer(fmt.answer(r["rejected"]), add_special_tokens=False)["input_ids"][:keep]
        room = max_length - max(len(chosen_ids), len(rejected_ids))
        rows.append({"prompt_ids": prompt_ids[max(0, len(prompt_ids) - room):], "chosen_ids": chosen_ids,
                     "rejected_ids": rejected_ids})
    return Dataset.from_list(rows)


# --- the trainer ----------------------------------------------------------------------------------


def chosen_kl(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """KL(policy || reference) of each pair's chosen answer (B,): at every answer position the exact KL of the two
    next-token distributions, summed over the answer. `model` is the peft policy (the reference is its adapter
    disabled); `inputs` a DPO batch (B chosen rows, then B rejected rows)."""
    n = len(inputs["input_ids"]) // 2
    input_ids, attention = inputs["input_ids"][:n], inputs["attention_mask"][:n]  # (B, T)
    targets = inputs["completion_mask"][:n, 1:].bool()  # (B, T-1): position t predicts answer token t+1
    lm = model.get_base_model()
    vocabulary = lm.get_output_embeddings().weight.shape[0]

    def answer_hidden() -> torch.Tensor:  # (N, H) at the answer positions only
        hidden = lm.base_model(input_ids=input_ids, attention_mask=attention, use_cache=False).last_hidden_state
        return hidden[:, :-1][targets]

    with torch.no_grad():
        hidden = answer_hidden()
        with model.disable_adapter():
            ref_hidden = answer_hidden()
        per_position = []
        rows = max(1, KL_CHUNK // vocabulary)
        for i in range(0, len(hidden), rows):
            logp = F.log_softmax(head_logits(lm, hidden[i:i + rows]), dim=-1)  # (rows, V)
            ref_logp = F.log_softmax(head_logits(lm, ref_hidden[i:i + rows]), dim=-1)  # (rows, V)
            per_position.append((logp.exp() * (logp - ref_logp)).sum(-1))
        per_position = torch.cat(per_position) if per_position else hidden.new_zeros(0)  # (N,)
    pair = targets.nonzero()[:, 0]  # (N,) the pair of each answer position
    return torch.zeros(n, device=per_position.device).index_add_(0, pair, per_position.float())


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
    (per-token log-probs of the labels, zero where a label is -100), its outputs those DPO reads.

    TRL's head projects every position (prompt included) in vocabulary tiles to save GPU memory; its CPU
    fallback makes several passes over each (tokens, vocab) tile: 11.8-13.0 s per step of the tiny preset
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
            with torch.no_grad():  # DPO logs these, it does not train on them
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


def _trainer_class():
    from trl import DPOTrainer

    class DPOStageTrainer(SplitPairsOnOutOfMemory, DPOTrainer):
        """TRL's DPOTrainer on our tokenized pairs, with a step that splits its micro-batch on out-of-memory, the KL
        of the policy on the chosen answers among its metrics (`kl`, `eval_kl`) and, off the GPU, a plain LM head."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.accelerator.device.type not in ("cuda", "xpu"):  # where TRL's head runs its Triton kernel
                add_answer_logprob_head(self.model.get_base_model())

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized in the model's PromptFormat (`preference_dataset`)


        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["kl"].append(chosen_kl(self.accelerator.unwrap_model(model), inputs).mean().item())
            return out

    return DPOStageTrainer


def build_trainer(config: PipelineConfig, ctx: RunContext, model, tokenizer, device, callbacks=(), ref_model=None,
                  trainer_class=None):
    """TRL's DPOTrainer with a fresh LoRA policy on `model` (sft/merged); the reference is the adapter disabled
    unless a `ref_model` is given (tests pass a second copy to see the one-copy check fail). `trainer_class`
    replaces the stage's trainer class (the bench passes TRL's own)."""
    from transformers import PrinterCallback
    from trl import DPOConfig

    cfg = config.dpo
    args = DPOConfig(**trainer_arguments(cfg, config.seed, device, ctx.run_dir / CHECKPOINT_DIR,
                                         beta=cfg.beta, loss_type=[cfg.loss_type], logging_steps=1,
                                         save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=1))
    lora = lora_config(model, cfg.lora_r, cfg.lora_alpha, config.sft.target_modules)
    trainer = (trainer_class or _trainer_class())(
        model=model, ref_model=ref_model, args=args, processing_class=tokenizer, peft_config=lora,
        callbacks=list(callbacks),
        train_dataset=preference_dataset(ctx.run_dir / TRAIN_PREFS, tokenizer, cfg.max_length),
        eval_dataset=preference_dataset(ctx.run_dir / TEST_PREFS, tokenizer, cfg.max_length))
    trainer.remove_callback(PrinterCallback)  # metrics go through the context, not print()
    upcast_trainable(trainer.model)  # the LoRA trains in fp32 whatever the base's dtype, as in every stage
    trainer.micro = MicroBatch(cfg.batch_size, "dpo", ctx, device, planner_hint=lambda: planner_hint(config, "ppo"))
    return trainer


def held_base_storages(trainer) -> dict[int, int]:
    """The base-network weights the trainer holds (policy and reference), each storage once
    (`policy.base_weight_storages`): one copy of sft/merged with the reference as the adapter disabled."""
    return base_weight_storages([m for m in (trainer.model, trainer.ref_model) if m is not None])


# --- checkpoints ----------------------------------------------------------------------------------


def _signature(config: PipelineConfig, run_dir: Path) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the adapter's shape and the SFT model it was trained on."""
    inputs = {}
    for file in sorted((run_dir / SFT_MERGED).rglob("*.safetensors")):
        stat = file.stat()
        inputs[str(file.relative_to(run_dir))] = [stat.st_size, stat.st_mtime_ns]
    return {"algorithm": ALGORITHM, "lora_r": config.dpo.lora_r, "lora_alpha": config.dpo.lora_alpha,
            "target_modules": list(config.sft.target_modules), "inputs": inputs}


def resumable_checkpoint(config: PipelineConfig, run_dir: Path, ctx: RunContext | None = None) -> Path | None:
    """The last Trainer checkpoint of this run when its signature matches; stale ones are removed (and said so)."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = run_dir / CHECKPOINT_DIR
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last is None:
        return None
    signature = ckpt_dir / SIGNATURE_FILE
    if signature.exists() and json.loads(signature.read_text()) == _signature(config, run_dir):
        return Path(last)
    if ctx is not None:
        ctx.log(f"dpo: {ckpt_dir} was trained with another adapter or another sft model; starting afresh", "warning")
    for old in ckpt_dir.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)
    return None


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


# --- reporting ------------------------------------------------------------------------------------


def _callback(config: PipelineConfig, ctx: RunContext, tokenizer, probe_prompts: list[str], device):
    """A TrainerCallback: TRL's logs as `dpo/*` metrics, `mem/*`, probes at checkpoints, progress and cancel."""
    from transformers import TrainerCallback

    cfg = config.dpo
    renames = {"loss": "loss", "rewards/accuracies": "accuracy", "rewards/margins": "margin", "kl": "kl",
               "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward",
               "learning_rate": "learning_rate", "grad_norm": "grad_norm"}
    renames.update({f"eval_{old}": f"eval_{new}" for old, new in renames.items()
                    if new in ("loss", "accuracy", "margin", "kl", "chosen_reward", "rejected_reward")})

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
                _probe(ctx, model, tokenizer, probe_prompts, state.global_step, config)
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


def _probe(ctx: RunContext, model, tokenizer, prompts: list[str], step: int, config: PipelineConfig) -> None:
    """The fixed held-out probe prompts, sampled and scored as the SFT and PPO stages sample theirs."""
    from edgerlhf.gold import probe_score

    rollouts = sample_probes(model, tokenizer, prompts, config)
    for prompt, response in zip(prompts, rollouts.responses):
        ctx.log_sample(prompt, response, probe_score(prompt, response, config.data), step, kind="probe",
                       checkpoint=f"ppo/step-{step}")


# --- the stage ------------------------------------------------------------------------------------


def run(config: PipelineConfig, ctx: RunContext) -> PPOReport:
    """DPO on the SFT policy with the training pairs; writes `ppo/adapter` and returns the alignment stage's report."""
    cfg = config.dpo
    device = resolve_device(config.device)
    run_dir = Path(ctx.run_dir)
    torch.manual_seed(config.seed)
    memory.reset_peak(device)
    merged = require(run_dir / SFT_MERGED, "sft")
    tokenizer = load_tokenizer(merged)
    probe_prompts = [r["prompt"] for r in prompts(run_dir, "test")][: cfg.n_probe_prompts]

    # What DPO holds, measured around building it: one copy of the network, the adapter (and its optimizer later).
    callback = _callback(config, ctx, tokenizer, probe_prompts, device)
    before = memory.tensor_bytes(device)
    trainer = build_trainer(config, ctx, load_causal_lm(merged, device), tokenizer, device, callbacks=[callback])
    held_bytes = memory.tensor_bytes(device) - before
    network_bytes = sum(held_base_storages(trainer).values())
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)

    resume = resumable_checkpoint(config, run_dir, ctx)
    start = 0
    if resume is not None:
        start = json.loads((resume / "trainer_state.json").read_text())["global_step"]
        ctx.log(f"dpo: resuming from {resume} at step {start}")
    else:
        (run_dir / CHECKPOINT_DIR).mkdir(parents=True, exist_ok=True)
        (run_dir / CHECKPOINT_DIR / SIGNATURE_FILE).write_text(json.dumps(_signature(config, run_dir)))
        if probe_prompts:
            _probe(ctx, trainer.model, tokenizer, probe_prompts, 0, config)
    ctx.log(f"dpo: {n_trainable:,} trainable parameters, {len(trainer.train_dataset)} training pairs, beta "
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
    train_keys = [k for k in history if not k.startswith(metric("eval_"))]

    def last(key: str, n: int = 5) -> float | None:
        values = history.get(key, [])[-n:]
        return float(np.mean(values)) if values else None

    return PPOReport(
        algorithm=ALGORITHM,
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
