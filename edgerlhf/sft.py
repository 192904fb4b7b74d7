"""Stage 2, sft: LoRA supervised fine-tuning on prompt + chosen response, with TRL's SFTTrainer.

The first step of the InstructGPT recipe (Ouyang et al. 2022): the base LM learns to answer prompts the way
the demonstrations do. Demonstrations come from `data/sft_train.jsonl` (`edgerlhf.data.demonstrations`: the job's
own, or the preferred answers of its preference pairs), tokenized here in the model's `PromptFormat`
(`sft_dataset`: its chat template, or `prompt + " " + completion + EOS`); with
`sft.completion_only_loss` (default) the loss covers the answer's tokens only (TRL masks the prompt's
labels to -100 from our `completion_mask`). LoRA (Hu et al. 2021) adapts `sft.target_modules`, `sft.modules_to_save` train in
full, everything else stays frozen. The loss is TRL's, computed without its vocabulary-tiled kernel,
whose CPU fallback is ~30x slower on small models (see `CompletionSFTTrainer`).

Reports through the context: `sft/loss`, `sft/learning_rate`, `sft/grad_norm`, `sft/tokens_per_s`,
`sft/eval_loss`, `sft/perplexity` (exp of the eval loss, on held-out responses), `mem/*`; probe
generations on a few fixed held-out prompts every `sample_every` steps (`kind="probe"`,
`checkpoint="sft/step-N"`, reward = the gold score when `data.labels == "gold"`), sampled as PPO samples
its probes (`edgerlhf.generation.sample_probes`: PPO's sampling settings and response length, same seed).

Writes: `sft/adapter/` (the LoRA adapter), `sft/merged/` (base with the LoRA merged + tokenizer) and,
for a `model.random_init` base, `base/` (the random base + tokenizer) so later stages can load it.

**A later round** (`round.parent_run`: the next round of RLHF from a finished run) starts from the parent's aligned
policy, merged by `edgerlhf.export`'s own merge (`ppo/adapter` into the parent's `sft/merged`). Without
demonstrations of its own (`own_demonstrations`) the stage trains nothing: that policy *is* `sft/merged`
(`from_parent`), so the reward model trains on it, the alignment starts from it, and the evaluation's "SFT" side is
the parent's policy. With them, it is this run's `base/` and SFT fine-tunes it with a LoRA as above (no warm-up).
Either way the report names the round and the parent (`SFTReport.round`, `parent_run`, `trained`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from edgerlhf import gold
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import PPO_ADAPTER, RANDOM_BASE, REPORT_FILE, SFT_MERGED
from edgerlhf.data import demonstrations, prompts
from edgerlhf.errors import StageError
from edgerlhf.dialogue import PromptFormat
from edgerlhf.generation import sample_probes
from edgerlhf.memory import free_memory, reset_peak, snapshot
from edgerlhf.oom import MicroBatch, SplitOnOutOfMemory, planner_hint
from edgerlhf.reports import Probe, SFTReport
from edgerlhf.warmup import warm_up
from edgerlhf.models import (compute_dtype, dtype_name, head_logits, load_base_model, load_causal_lm, load_tokenizer,
                             lora_config, resolve_device, trainer_arguments, upcast_trainable)


def sft_dataset(rows: list[dict[str, str]], tokenizer):
    """Tokenized SFT examples from demonstrations {prompt, completion}: each once, in the model's `PromptFormat`.

    `input_ids` = tokens of `prompt(p)` then tokens of `answer(completion)` (the answer and its end: EOS, or the
    chat template's end of turn), tokenized apart so the prompt's tokens are exactly those generation feeds the
    model; `completion_mask` marks the answer, the only tokens that carry loss with `sft.completion_only_loss`.
    A conversation's earlier turns are in its prompt (`edgerlhf.formats`: one demonstration per assistant turn),
    so the loss covers every assistant turn and nothing else.
    """
    from datasets import Dataset

    fmt = PromptFormat.of(tokenizer)
    rows_out = []
    for prompt, completion in sorted({(r["prompt"], r["completion"]) for r in rows}):  # stable across processes
        prompt_ids = tokenizer(fmt.prompt(prompt), add_special_tokens=fmt.add_special_tokens)["input_ids"]
        answer_ids = tokenizer(fmt.answer(completion), add_special_tokens=False)["input_ids"]
        rows_out.append({"input_ids": prompt_ids + answer_ids,
                         "completion_mask": [0] * len(prompt_ids) + [1] * len(answer_ids)})
    return Dataset.from_list(rows_out)


def _callback(config: PipelineConfig, ctx: RunContext, tokenizer, probe_prompts: list[str], device):
    """A TrainerCallback that forwards logs as namespaced metrics, samples probes and honours cancel."""
    from transformers import TrainerCallback

    cfg = config.sft

    class ContextCallback(TrainerCallback):
        def __init__(self):
            self.losses: list[float] = []
            self.evals: list[tuple[int, float]] = []  # (step, eval loss)
            self.last_probes: list[dict[str, Any]] = []
            self.last_tokens = 0.0
            self.last_time = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, **kwargs):
            ctx.progress(state.global_step, cfg.max_steps)
            ctx.check_cancelled()
            if probe_prompts and (state.global_step % cfg.sample_every == 0 or state.global_step == cfg.max_steps):
                self.probe(model, state.global_step)

        def probe(self, model, step):
            responses = sample_probes(model, tokenizer, probe_prompts, config).responses
            self.last_probes = []
            for prompt, response in zip(probe_prompts, responses):
                reward = gold.probe_score(prompt, response, config.data)
                ctx.log_sample(prompt, response, reward, step, kind="probe", checkpoint=f"sft/step-{step}")
                self.last_probes.append({"step": step, "prompt": prompt, "response": response, "gold": reward})

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            step = state.global_step
            metrics: dict[str, float] = {}
            if "loss" in logs:
                metrics["sft/loss"] = logs["loss"]
                self.losses.append(float(logs["loss"]))
                now = time.perf_counter()
                tokens = logs.get("num_tokens", 0.0)
                if tokens > self.last_tokens:
                    metrics["sft/tokens_per_s"] = (tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
                self.last_tokens, self.last_time = tokens, now
                for src, key in (("learning_rate", "sft/learning_rate"), ("grad_norm", "sft/grad_norm"),
                                 ("mean_token_accuracy", "sft/token_accuracy")):
                    if src in logs:
                        metrics[key] = logs[src]
                metrics.update(snapshot(device))
            if "eval_loss" in logs:
                metrics["sft/eval_loss"] = logs["eval_loss"]
                self.evals.append((step, float(logs["eval_loss"])))
                metrics["sft/perplexity"] = math.exp(min(logs["eval_loss"], 50.0))
            metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
            if metrics:
                ctx.log_metrics(metrics, step)

    return ContextCallback()


def _trainer_class():
    from trl import SFTTrainer

    class CompletionSFTTrainer(SFTTrainer):
        """TRL's SFTTrainer with a plainer loss: the labelled positions go through the LM head in one matmul.

        Same loss as TRL's (summed NLL of the label tokens over their count; prompt tokens are already -100
        with completion_only_loss). TRL computes it with a vocabulary-tiled kernel that saves GPU memory on
        big vocabularies, but whose CPU fallback makes some thirty passes over each (tokens, vocab) tile:
        for 130 tokens x 50k vocab it took ~3.5 s per step against ~0.1 s here, most of a small model's step.
        """

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mode = "train" if model.training else "eval"
            lm = self.accelerator.unwrap_model(model)
            lm = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
            kwargs = {k: inputs[k] for k in ("attention_mask", "position_ids") if k in inputs}
            hidden = lm.base_model(input_ids=inputs["input_ids"], use_cache=False, **kwargs).last_hidden_state
            targets = inputs["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
            mask = targets != -100  # (B, T-1)
            logits = head_logits(lm, hidden[:, :-1][mask])  # (N, V), labelled positions only
            n_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
            loss = F.cross_entropy(logits, targets[mask], reduction="sum") / torch.as_tensor(n_tokens).clamp(min=1)
            with torch.no_grad():
                accuracy = (logits.argmax(-1) == targets[mask]).float().mean() if mask.any() else torch.zeros(())
            self._metrics[mode]["mean_token_accuracy"].append(accuracy.item())
            if mode == "train":
                self._total_train_tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs \
                    else inputs["input_ids"].numel()
            self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
            return (loss, {"loss": loss}) if return_outputs else loss

    class SFTStageTrainer(SplitOnOutOfMemory, CompletionSFTTrainer):
        """The SFT stage's trainer: our loss, and a step that splits its micro-batch on out-of-memory."""

        def loss_share(self, part, inputs, num_items_in_batch) -> float:
            if num_items_in_batch is not None:  # the loss is already over the whole batch's labelled tokens
                return 1.0
            return int((part["labels"][:, 1:] != -100).sum()) / max(int((inputs["labels"][:, 1:] != -100).sum()), 1)

    return SFTStageTrainer


def build_trainer(config: PipelineConfig, ctx: RunContext, model, tokenizer, device, callbacks=()):
    """The SFTTrainer for this run (LoRA on `model`, data from `data/`); tests inspect its collator."""
    from transformers import PrinterCallback
    from trl import SFTConfig

    cfg = config.sft
    train = sft_dataset(demonstrations(ctx.run_dir, "train"), tokenizer)
    if not len(train):
        raise StageError("sft: the run's data holds no demonstrations (data.source holds prompts only): give SFT "
                         "its own data set with sft_data.source, or skip the sft stage")
    test = sft_dataset(demonstrations(ctx.run_dir, "test"), tokenizer)
    args = SFTConfig(**trainer_arguments(cfg, config.seed, device, ctx.stage_dir("sft") / "trainer",
                                         completion_only_loss=cfg.completion_only_loss, packing=False,
                                         prediction_loss_only=True))
    lora = lora_config(model, cfg.lora_r, cfg.lora_alpha, cfg.target_modules, dropout=cfg.lora_dropout,
                       modules_to_save=cfg.modules_to_save)
    trainer = _trainer_class()(model=model, args=args, train_dataset=train, eval_dataset=test,
                               processing_class=tokenizer, peft_config=lora, callbacks=list(callbacks))
    trainer.remove_callback(PrinterCallback)  # metrics go through the context, not print()
    trainer.micro = MicroBatch(cfg.batch_size, "sft", ctx, device, planner_hint=lambda: planner_hint(config, "sft"))
    upcast_trainable(trainer.model)  # a head trained in full must not be a bf16 copy on the GPU
    return trainer


def base_model_config(config: PipelineConfig, ctx: RunContext):
    """The base model's config as later loads see it: a random base, or a later round's parent policy, is the
    directory SFT saved it to (`base/`)."""
    if not config.model.random_init and config.round.parent_run is None:
        return config.model
    return dataclasses.replace(config.model, name_or_path=str(ctx.run_dir / RANDOM_BASE), tokenizer=None,
                               random_init=False)


# --- a later round: the parent's aligned policy -------------------------------------------------------


def own_demonstrations(config: PipelineConfig, run_dir: Path) -> bool:
    """Whether the run has demonstrations of its own, not the preferred answers of its pairs: `sft_data.source`, or
    a `data.source` the data stage read as demonstrations (its report's `format`)."""
    if config.sft_data.source:
        return True
    report = Path(run_dir) / "data" / REPORT_FILE
    return report.is_file() and json.loads(report.read_text()).get("format") == "demonstration"


def write_parent_policy(config: PipelineConfig, out_dir: Path) -> Path:
    """The parent run's aligned policy (`round.parent_run`), merged by `edgerlhf.export.export_policy` (its
    `ppo/adapter` into its `sft/merged`), written with its tokenizer to `out_dir`; returns `out_dir`."""
    from edgerlhf.export import export_policy

    parent = Path(config.round.parent_run)
    missing = [name for name in (SFT_MERGED, PPO_ADAPTER) if not (parent / name).is_dir()]
    if missing:
        raise StageError(f"round.parent_run: {parent} holds no aligned policy ({', '.join(missing)} missing): a run "
                         "continues from a run whose alignment stage has finished")
    return export_policy(parent, out_dir)


def from_parent(config: PipelineConfig, ctx: RunContext) -> SFTReport:
    """The stage of a later round without demonstrations: `sft/merged` is the parent's aligned policy, as is. Its
    probes are sampled as SFT's would be (`sft/step-0`), so the Probes page shows where the round started."""
    cfg = config.sft
    device = resolve_device(config.device)
    merged = ctx.run_dir / SFT_MERGED
    ctx.log(f"round {config.round.number}: the SFT policy is the aligned policy of {config.round.parent_run}, merged "
            "(no demonstrations of this round's own: SFT trains nothing)")
    ctx.progress(0, 1)
    write_parent_policy(config, merged)
    ctx.artifact("model", merged)
    model = load_causal_lm(merged, device).eval()
    tokenizer = load_tokenizer(merged)
    probe_prompts = [r["prompt"] for r in prompts(ctx.run_dir, "test")[: cfg.n_sample_prompts]]
    probes = []
    if probe_prompts:
        responses = sample_probes(model, tokenizer, probe_prompts, config).responses
        for prompt, response in zip(probe_prompts, responses):
            reward = gold.probe_score(prompt, response, config.data)
            ctx.log_sample(prompt, response, reward, 0, kind="probe", checkpoint="sft/step-0")
            probes.append(Probe(step=0, prompt=prompt, response=response, gold=reward))
    ctx.progress(1, 1)
    return SFTReport(
        device=str(device), compute_dtype=dtype_name(compute_dtype(device)),
        parameters=sum(p.numel() for p in model.parameters()), trainable_parameters=0,
        train_examples=0, eval_examples=0, steps=0, train_seconds=0.0, first_loss=None, final_loss=None,
        train_loss=None, eval_loss=None, perplexity=None, completion_only_loss=cfg.completion_only_loss,
        memory=snapshot(device), probes=probes, round=config.round.number, parent_run=config.round.parent_run,
        trained=False)


def run(config: PipelineConfig, ctx: RunContext) -> SFTReport:
    cfg = config.sft
    if config.round.parent_run is not None and not own_demonstrations(config, ctx.run_dir):
        return from_parent(config, ctx)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    if config.round.parent_run is not None:  # a later round with demonstrations: fine-tune the parent's policy
        write_parent_policy(config, ctx.run_dir / RANDOM_BASE)
        ctx.artifact("base_model", ctx.run_dir / RANDOM_BASE)
        tokenizer = load_tokenizer(ctx.run_dir / RANDOM_BASE)
        model = load_base_model(base_model_config(config, ctx), device, cfg.precision)
    elif config.model.random_init:
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
        model = load_base_model(config.model, device, tokenizer=tokenizer, seed=config.seed)
        warm_up(config, ctx, model, tokenizer)  # a random base first learns the dialogues' words (edgerlhf.warmup)
        # Later stages and the chat page need the exact base SFT started from (random, then warmed up).
        base_dir = ctx.run_dir / RANDOM_BASE
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)
        ctx.artifact("base_model", base_dir)
        if cfg.precision != "bf16":  # QLoRA on a random base: quantize what was saved, once the fp copy is gone
            del model
            free_memory(device)
            model = load_base_model(base_model_config(config, ctx), device, cfg.precision)
    else:  # QLoRA: the frozen base is loaded quantized
        tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)
        model = load_base_model(config.model, device, cfg.precision)
    n_params = sum(p.numel() for p in model.parameters())

    probe_prompts = [r["prompt"] for r in prompts(ctx.run_dir, "test")[: cfg.n_sample_prompts]]
    reset_peak(device)
    callback = _callback(config, ctx, tokenizer, probe_prompts, device)
    trainer = build_trainer(config, ctx, model, tokenizer, device, callbacks=[callback])
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    ctx.log(f"SFT: {n_params / 1e6:.1f}M parameters, {n_trainable / 1e6:.3f}M trainable (LoRA r={cfg.lora_r}), "
            f"{len(trainer.train_dataset)} train examples, {cfg.max_steps} steps on {device} "
            f"({dtype_name(compute_dtype(device))})")
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    if callback.evals and callback.evals[-1][0] == result.global_step:
        eval_loss = callback.evals[-1][1]
    else:
        eval_loss = trainer.evaluate()["eval_loss"]  # the callback logs it at the last step

    n_train, n_eval = len(trainer.train_dataset), len(trainer.eval_dataset)
    out_dir = ctx.stage_dir("sft")
    peft_model = trainer.model
    peft_model.save_pretrained(out_dir / "adapter")
    ctx.artifact("adapter", out_dir / "adapter")
    if cfg.precision == "bf16":
        merged = peft_model.merge_and_unload()
    else:
        # A quantized layer cannot hold base + LoRA: merge into the base's full-precision weights, loaded once
        # the quantized training copy is gone (as the QLoRA recipe merges).
        from peft import PeftModel

        del trainer, peft_model, model
        free_memory(device)
        base = load_base_model(base_model_config(config, ctx), device)
        merged = PeftModel.from_pretrained(base, str(out_dir / "adapter")).merge_and_unload()
    merged.save_pretrained(ctx.run_dir / SFT_MERGED)
    tokenizer.save_pretrained(ctx.run_dir / SFT_MERGED)
    ctx.artifact("model", ctx.run_dir / SFT_MERGED)
    shutil.rmtree(out_dir / "trainer", ignore_errors=True)  # the Trainer's output_dir; nothing is kept there

    losses = callback.losses
    return SFTReport(
        device=str(device), compute_dtype=dtype_name(compute_dtype(device)),
        parameters=n_params, trainable_parameters=n_trainable,
        train_examples=n_train, eval_examples=n_eval,
        steps=result.global_step, train_seconds=round(train_seconds, 2),
        first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
        train_loss=result.training_loss, eval_loss=eval_loss,
        perplexity=math.exp(min(eval_loss, 50.0)),
        completion_only_loss=cfg.completion_only_loss,
        memory=snapshot(device),
        probes=[Probe(**p) for p in callback.last_probes],
        round=config.round.number, parent_run=config.round.parent_run,
    )
