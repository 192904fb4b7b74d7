"""Stage 3, reward: pairwise Bradley–Terry reward models in bf16, int8 and int4, and the precision study.

A reward model scores a (prompt, response) pair with a scalar (read at the response's last token, averaged
over the response's tokens with `reward.pooling="mean"`, both summed with `"both"`, or the response's first
token's plus its last's with `"ends"`; laid out by
`models.reward_tokens` in the model's `PromptFormat`) and is trained so the chosen response scores higher:
loss = -log sigmoid(r_chosen - r_rejected) (Bradley & Terry 1952; Ouyang et al. 2022).
It starts from the SFT model (`sft/merged`) as its family's `...ForSequenceClassification` (the LM head
replaced by a 1-output score head) and trains a LoRA adapter plus the score head, with TRL's `RewardTrainer`; the new
head learns `reward.head_lr_scale` times faster than the adapter (it has to grow from a near-zero init).
For int8 / int4 the frozen base is loaded through bitsandbytes (LLM.int8() / NF4, as in QLoRA); the
trainable adapter and head stay in fp32 in every precision (TRL would cast a quantized model's to bf16,
as the QLoRA paper does; fp32 costs little here and keeps the precisions comparable).

Every precision in `reward.precisions` trains from the same seed, data order and initialisation, so the
study compares precisions and not luck. The study (`reward/report.json`, key `precisions`) gives per
precision: held-out pairwise accuracy and mean margin, the model's memory footprint (bytes of weights),
peak memory while loading and training (`edgerlhf.memory.peak_mb`: CUDA peak allocation, or the
process's peak RSS on the CPU; `peak_source` says which), scoring throughput (pairs/s), the compute dtype
actually used (fp32 on the CPU even for "bf16"), and the Spearman rank correlation of its test-set scores
with the bf16 model's. Held-out numbers come from
reloading the saved model with `edgerlhf.models.load_reward_model`, so they measure what PPO will use.

Saved per precision (format documented in `edgerlhf.models`): `reward/<precision>/adapter/` (a plain
causal-LM LoRA adapter, loadable as a second adapter on `sft/merged`), `score_head.pt`,
`reward_model.json`. The saved head is normalised: rewards have mean 0 and std 1 on the training
responses (`normalize_saved`); the margins in the study are in those units.

With `reward.validation` the stage also trains a validation reward model, the independent second opinion the
alignment stage scores its rollouts with (Gao et al. 2022 measure over-optimisation against a second, "gold" reward
model the policy never trains against): the training pairs are split in two parts by prompt (`split_for_validation`),
`reward.validation_share` of them (half by default) for the validation model and the rest for the main reward model of
every precision, so **with validation on, the main reward model sees only the rest of the pairs**. The validation
model is trained in the precision of the alignment stage's one network (`contract.network_precision`: bf16 unless
`ppo.quantized_policy`), where it rides as one more frozen adapter, and saved in `reward/validation/` in the same
format; the report gives its held-out accuracy beside the main models' (`RewardReport.validation`) and the rank
correlation of the two on the test pairs.

With `reward.ensemble` = k >= 2 the stage also trains k - 1 more reward models, the extra members of an ensemble
whose conservative score the sampling algorithms train against (Coste et al. 2023, "Reward Model Ensembles Help
Mitigate Overoptimization"; Eisenstein et al. 2023): member 0 is the main reward model; member i >= 1 trains on a
bootstrap resample of the main model's pairs (`bootstrap`: as many, drawn with replacement) from seed `seed + i`, in
the network's precision as the validation model is, saved in `reward/ensemble/<i>/` and normalised on its own
resample; the report gives each member's held-out accuracy (`RewardReport.ensemble`), metrics `reward/ensemble/<i>/*`.

Metrics: `reward/<precision>/loss`, `/accuracy`, `/margin`, `/learning_rate`, `/eval_loss`,
`/eval_accuracy`, `/eval_margin` at that precision's own step (curves overlay; the validation model's are
`reward/validation/*`), and `mem/*` at the stage step `k * max_steps + step` for the k-th model trained (one
continuous memory curve).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from edgerlhf import memory
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import (ENSEMBLE_REWARD, SFT_MERGED, TEST_PREFS, TRAIN_PREFS, VALIDATION_REWARD,
                               ensemble_reward_dir, network_precision, reward_dir)
from edgerlhf.data import read_prefs
from edgerlhf.errors import require
from edgerlhf.reports import EnsembleMember, PrecisionResult, RewardReport, ValidationResult
from edgerlhf.memory import MB, snapshot
from edgerlhf.oom import MicroBatch, SplitPairsOnOutOfMemory, planner_hint
from edgerlhf.models import (REWARD_ADAPTER_DIR, REWARD_META_FILE, SCORE_HEAD_FILE, compute_dtype, dtype_name,
                             load_causal_lm, load_reward_model, load_tokenizer, lora_config, resolve_device,
                             response_first, response_mask, reward_tokens, running_response_mean, trainer_arguments,
                             upcast_trainable)


def preference_dataset(pairs: Path | list[dict], tokenizer, max_length: int):
    """Tokenized preference pairs (a `.jsonl` file of them, or the rows): `chosen_ids`, `rejected_ids` laid out as
    `models.encode_for_reward` lays out what PPO scores, so the reward model is trained on exactly the inputs it will
    judge, and where each response begins (`chosen_start`, `rejected_start`) for a mean-pooled reward."""
    from datasets import Dataset

    rows = read_prefs(pairs) if isinstance(pairs, Path) else pairs
    prompts = [r["prompt"] for r in rows]
    chosen, chosen_starts = reward_tokens(tokenizer, prompts, [r["chosen"] for r in rows], max_length)
    rejected, rejected_starts = reward_tokens(tokenizer, prompts, [r["rejected"] for r in rows], max_length)
    return Dataset.from_list([{"chosen_ids": c, "rejected_ids": r, "chosen_start": cs, "rejected_start": rs}
                              for c, r, cs, rs in zip(chosen, rejected, chosen_starts, rejected_starts)])


def preference_collator(pad_token_id: int):
    """TRL's preference collator (B chosen rows, then B rejected rows, right-padded) plus `response_mask`."""
    from trl.trainer.reward_trainer import DataCollatorForPreference

    class WithResponseMask(DataCollatorForPreference):
        def torch_call(self, examples):
            batch = super().torch_call(examples)
            starts = [e["chosen_start"] for e in examples] + [e["rejected_start"] for e in examples]
            lengths = [len(e["chosen_ids"]) for e in examples] + [len(e["rejected_ids"]) for e in examples]
            batch["response_mask"] = response_mask(starts, lengths, batch["input_ids"].shape[1])
            return batch

    return WithResponseMask(pad_token_id=pad_token_id)


def split_for_validation(pairs: list[dict], seed: int, share: float = 0.5) -> tuple[list[int], list[int]]:
    """Indices of `pairs` in two parts, (main, validation), for `reward.validation`: disjoint, together every pair,
    `share` of them (about: whole prompts) for the validation model, and split by prompt (every pair of a prompt on
    one side, like the train/test split, so the validation model never saw a prompt, nor an answer to it, that the
    main model learned from). Prompts go in a seeded random order to the validation part while it holds less than
    `share` of the pairs placed so far, else to the main part; each part keeps the pairs' file order."""
    by_prompt: dict[str, list[int]] = {}
    for i, row in enumerate(pairs):
        by_prompt.setdefault(row["prompt"], []).append(i)
    prompts = sorted(by_prompt)
    random.Random(seed).shuffle(prompts)
    main, validation = [], []
    for prompt in prompts:
        (validation if len(validation) < share * (len(main) + len(validation)) else main).extend(by_prompt[prompt])
    if not main or not validation:
        raise ValueError(f"reward.validation needs training pairs of at least two prompts, got {len(prompts)}")
    return sorted(main), sorted(validation)


def bootstrap(n: int, seed: int) -> list[int]:
    """A bootstrap resample of n pairs for an ensemble member (`reward.ensemble`): n indices drawn uniformly with
    replacement, seeded, sorted (so the member reads its pairs in file order, repeats side by side)."""
    rng = random.Random(seed)
    return sorted(rng.randrange(n) for _ in range(n))


def spearman(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    def ranks(x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        order = torch.argsort(x)
        r = torch.empty_like(x)
        r[order] = torch.arange(len(x), dtype=torch.float64)
        for value in torch.unique(x):  # ties share their mean rank
            tied = x == value
            if tied.sum() > 1:
                r[tied] = r[tied].mean()
        return r

    ra, rb = ranks(torch.as_tensor(a)), ranks(torch.as_tensor(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def load_for_training(run_dir: Path, precision: str, device: torch.device, seed: int):
    """sft/merged as a 1-output sequence classifier in `precision`; the new score head is seeded."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # the score head's initialisation is the same for every precision
    model = load_causal_lm(run_dir / SFT_MERGED, device, precision,
                           model_class=_SeqCls(AutoModelForSequenceClassification))
    return model


class _SeqCls:
    """`AutoModelForSequenceClassification` with `num_labels=1` baked into `from_pretrained`."""

    def __init__(self, auto):
        self.auto = auto

    def from_pretrained(self, *args, **kwargs):
        return self.auto.from_pretrained(*args, num_labels=1, **kwargs)


def _callback(ctx: RunContext, name: str, max_steps: int, offset: int, device: torch.device):
    """Logs the Trainer's metrics as `reward/<name>/*` (`name`: the precision, or `validation`) and memory."""
    from transformers import TrainerCallback

    prefix = f"reward/{name}"
    renames = {"loss": "loss", "accuracy": "accuracy", "margin": "margin", "learning_rate": "learning_rate",
               "grad_norm": "grad_norm", "eval_loss": "eval_loss", "eval_accuracy": "eval_accuracy",
               "eval_margin": "eval_margin"}

    class ContextCallback(TrainerCallback):
        def __init__(self):
            self.train_accuracy: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            ctx.check_cancelled()

        def on_log(self, args, state, control, logs=None, **kwargs):
            logs = logs or {}
            metrics = {f"{prefix}/{new}": float(logs[old]) for old, new in renames.items()
                       if old in logs and logs[old] is not None and math.isfinite(float(logs[old]))}
            if metrics:
                ctx.log_metrics(metrics, state.global_step)
            if "accuracy" in logs:
                self.train_accuracy.append(float(logs["accuracy"]))
            if "loss" in logs:
                ctx.log_metrics(snapshot(device), offset + state.global_step)

    return ContextCallback()


def build_trainer(config: PipelineConfig, ctx: RunContext, precision: str, model, tokenizer, device, callbacks=(),
                  pairs: list[dict] | None = None):
    """TRL's RewardTrainer with a LoRA + score-head adapter on `model` (tests use it directly), trained on `pairs`
    (default: every training pair, `data/train_prefs.jsonl`)."""
    from peft import get_peft_model
    from transformers import PrinterCallback
    from trl import RewardConfig

    cfg = config.reward
    args = RewardConfig(**trainer_arguments(cfg, config.seed, device, ctx.stage_dir("reward") / "trainer",
                                            per_device_eval_batch_size=cfg.batch_size * 2))
    lora = lora_config(model, cfg.lora_r, cfg.lora_alpha, config.sft.target_modules, modules_to_save=["score"],
                       task_type="SEQ_CLS", embedding=cfg.adapt_embedding)
    torch.manual_seed(config.seed)  # LoRA initialisation, identical across precisions
    model = get_peft_model(model, lora)
    upcast_trainable(model)
    # The score head is a fresh layer that must grow large weights, the body only needs a small low-rank
    # nudge: one learning rate for both leaves the head far from converged within a short budget.
    head = [p for n, p in model.named_parameters() if p.requires_grad and ".score." in n]
    body = [p for n, p in model.named_parameters() if p.requires_grad and ".score." not in n]
    optimizer = torch.optim.AdamW([{"params": body, "lr": cfg.learning_rate},
                                   {"params": head, "lr": cfg.learning_rate * cfg.head_lr_scale}],
                                  lr=cfg.learning_rate, weight_decay=0.0)
    trainer = _stage_trainer_class()(
        model=model, args=args, processing_class=tokenizer, callbacks=list(callbacks), optimizers=(optimizer, None),
        data_collator=preference_collator(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                          else tokenizer.eos_token_id),
        train_dataset=preference_dataset(ctx.run_dir / TRAIN_PREFS if pairs is None else pairs, tokenizer,
                                         cfg.max_length),
        eval_dataset=preference_dataset(ctx.run_dir / TEST_PREFS, tokenizer, cfg.max_length))
    trainer.remove_callback(PrinterCallback)
    upcast_trainable(trainer.model)  # TRL puts a quantized model's adapter in bf16; we train it in fp32
    trainer.pooling = cfg.pooling
    trainer.micro = MicroBatch(cfg.batch_size, f"reward ({precision})", ctx, device,
                               planner_hint=lambda: planner_hint(config, f"reward/{precision}"))
    return trainer


def _stage_trainer_class():
    from trl import RewardTrainer

    class RewardStageTrainer(SplitPairsOnOutOfMemory, RewardTrainer):
        """TRL's RewardTrainer with a step that splits its micro-batch on out-of-memory, and the response poolings.

        With `pooling` `mean`, the score head's per-token outputs become their running mean over the response's
        tokens (`models.running_response_mean`), so the classifier's last-token score is the mean score of the
        response, which is what `RewardModel` computes with `pooling="mean"`; with `both`, that mean is added
        to each token's own score: `RewardModel`'s score of the last token's hidden state plus the mean's, up to
        the head's bias counted twice (a constant, which the pairwise loss does not see); with `ends`, the
        response's first token's score is added instead (`models.response_first`).
        """

        pooling = "last"

        def _set_signature_columns_if_needed(self):
            super()._set_signature_columns_if_needed()
            self._signature_columns += ["chosen_start", "rejected_start"]

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            mask = inputs.pop("response_mask")
            if self.pooling == "last":
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            head = model.get_submodule("base_model.model.score")  # peft's wrapper of the trained score head
            def pool(_module, _args, out):  # (B, T, 1) per-token scores -> what the last token reads
                if self.pooling == "ends":
                    return response_first(out, mask) + out
                return running_response_mean(out, mask) + (out if self.pooling == "both" else 0)

            handle = head.register_forward_hook(pool)
            try:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            finally:
                handle.remove()

    return RewardStageTrainer

def save_reward_model(peft_model, out_dir: Path, precision: str, max_length: int, device: torch.device,
                      pooling: str = "last") -> None:
    """Write the LoRA (as a plain causal-LM adapter), the score head and metadata (see edgerlhf.models)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    state = get_peft_model_state_dict(peft_model)
    lora = {k: v.detach().float().cpu().contiguous() for k, v in state.items() if "lora_" in k}
    (score_key,) = [k for k in state if k.endswith("score.weight")]
    adapter_config = copy.deepcopy(peft_model.peft_config["default"])
    adapter_config.task_type = "CAUSAL_LM"
    adapter_config.modules_to_save = None
    adapter_dir = out_dir / REWARD_ADAPTER_DIR
    adapter_dir.mkdir(parents=True, exist_ok=True)
    adapter_config.save_pretrained(str(adapter_dir))
    save_file(lora, str(adapter_dir / "adapter_model.safetensors"))
    torch.save({"weight": state[score_key].detach().float().cpu(), "bias": None}, out_dir / SCORE_HEAD_FILE)
    hidden = state[score_key].shape[1]
    (out_dir / REWARD_META_FILE).write_text(json.dumps({
        "precision": precision, "max_length": max_length, "compute_dtype": dtype_name(compute_dtype(device)),
        "hidden_size": hidden, "pooling": pooling, "base": SFT_MERGED}, indent=2))


NORMALIZE_SAMPLES = 1024
"""At most this many training responses set a reward model's normalisation."""


def normalize_saved(run_dir: Path, precision: str, device: torch.device, train: list[dict],
                    where: str | None = None) -> dict[str, float]:
    """Fold a normalisation into the saved score head so rewards have mean 0 and std 1 on the training
    responses (Ziegler et al. 2019 normalise their reward model the same way before RL).

    Pairwise accuracy and rank correlations do not change; PPO gets rewards of a known scale whatever
    the head learned (a fast-learning head can reach scores in the tens), which keeps its value loss and
    the KL penalty's weight comparable across runs and precisions.
    """
    rm = load_reward_model(run_dir, precision, device, where)
    rows = train[: NORMALIZE_SAMPLES // 2]
    prompts = [r["prompt"] for r in rows] * 2
    scores = rm.score(prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])  # (2N,)
    mean, std = float(scores.mean()), float(scores.std().clamp(min=1e-6))
    out_dir = run_dir / (where or reward_dir(precision))
    state = torch.load(out_dir / SCORE_HEAD_FILE, map_location="cpu", weights_only=True)
    bias = state.get("bias")
    bias = torch.zeros(1) if bias is None else bias
    torch.save({"weight": state["weight"] / std, "bias": (bias - mean) / std}, out_dir / SCORE_HEAD_FILE)
    meta = json.loads((out_dir / REWARD_META_FILE).read_text())
    meta["normalization"] = {"mean": mean, "std": std, "samples": len(scores)}
    (out_dir / REWARD_META_FILE).write_text(json.dumps(meta, indent=2))
    return meta["normalization"]


def evaluate_saved(run_dir: Path, precision: str, device: torch.device, test: list[dict],
                   where: str | None = None) -> tuple[dict, torch.Tensor]:
    """Reload the saved reward model (from `where`, default `reward_dir(precision)`) and score the test pairs:
    accuracy, margin, throughput, footprint."""
    rm = load_reward_model(run_dir, precision, device, where)
    prompts = [r["prompt"] for r in test]
    started = time.perf_counter()
    chosen = rm.score(prompts, [r["chosen"] for r in test])  # (N,)
    rejected = rm.score(prompts, [r["rejected"] for r in test])  # (N,)
    seconds = time.perf_counter() - started
    stats = {
        "accuracy": float((chosen > rejected).float().mean()),
        "mean_margin": float((chosen - rejected).mean()),
        "memory_footprint_bytes": rm.memory_footprint(),
        "memory_footprint_mb": round(rm.memory_footprint() / MB, 2),
        "throughput_pairs_per_s": len(test) / max(seconds, 1e-9),
        "reward_mean": float(torch.cat([chosen, rejected]).mean()),
        "reward_std": float(torch.cat([chosen, rejected]).std()),
    }
    del rm
    return stats, torch.cat([chosen, rejected])


def train_precision(config: PipelineConfig, ctx: RunContext, precision: str, index: int,
                    pairs: list[dict] | None = None, where: str | None = None,
                    name: str | None = None) -> dict[str, Any]:
    """Train and save one reward model in `precision` on `pairs` (default: every training pair) into `where` (default
    `reward_dir(precision)`; its metrics `reward/<name>/*`, default the last part of where); returns its row of the
    precision study (without spearman)."""
    cfg = config.reward
    device = resolve_device(config.device)
    tokenizer = load_tokenizer(ctx.run_dir / SFT_MERGED)
    gc.collect()
    memory.reset_peak(device)  # the peak from here on: this precision's model, loaded and trained
    rss_before_mb = memory.rss_mb()
    model = load_for_training(ctx.run_dir, precision, device, config.seed)
    where = where or reward_dir(precision)
    name = name or Path(where).name  # the precision, `validation`, or `ensemble/<i>`
    callback = _callback(ctx, name, cfg.max_steps, index * cfg.max_steps, device)
    trainer = build_trainer(config, ctx, precision, model, tokenizer, device, callbacks=[callback], pairs=pairs)
    n_trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    label = precision if name == precision else f"{name} ({precision})"
    ctx.log(f"reward model {label}: {len(trainer.train_dataset)} train pairs, {cfg.max_steps} steps "
            f"on {device} (compute {dtype_name(compute_dtype(device))})")
    started = time.perf_counter()
    result = trainer.train()
    train_seconds = time.perf_counter() - started
    peak = memory.peak_mb(device)
    source = "cuda_max_allocated" if device.type == "cuda" else "process_rss"
    out_dir = ctx.run_dir / where
    save_reward_model(trainer.model, out_dir, precision, cfg.max_length, device, cfg.pooling)
    ctx.artifact("reward_model", out_dir)
    train_accuracy = callback.train_accuracy
    del trainer, model
    memory.free_memory(device)
    return {
        "precision": precision, "compute_dtype": dtype_name(compute_dtype(device)),
        "quantization": {"bf16": None, "int8": "bitsandbytes LLM.int8()", "int4": "bitsandbytes NF4"}[precision],
        "trainable_parameters": n_trainable,
        "train_seconds": round(train_seconds, 2), "train_loss": result.training_loss,
        "final_train_accuracy": train_accuracy[-1] if train_accuracy else None,
        "peak_train_mb": round(peak, 1), "peak_source": source,
        # On the CPU the RSS peak includes what earlier precisions left allocated; the delta is this model's.
        "peak_train_delta_mb": round(peak - rss_before_mb, 1) if source == "process_rss" else None,
        "rss_before_train_mb": round(rss_before_mb, 1),
    }


def _spearman_or_none(a: torch.Tensor, b: torch.Tensor) -> float | None:
    value = spearman(a, b)
    return None if math.isnan(value) else value


def run(config: PipelineConfig, ctx: RunContext) -> RewardReport:
    cfg = config.reward
    device = resolve_device(config.device)
    require(ctx.run_dir / SFT_MERGED, "sft")
    train = read_prefs(ctx.run_dir / TRAIN_PREFS)
    test = read_prefs(ctx.run_dir / TEST_PREFS)
    if cfg.validation:  # the main models learn from one part, the validation model from the other
        main_part, validation_part = split_for_validation(train, config.seed, cfg.validation_share)
        main_pairs, validation_pairs = [train[i] for i in main_part], [train[i] for i in validation_part]
    else:
        main_pairs, validation_pairs = train, []
        # A validation model of an earlier run saw pairs the main model now trains on: it is no longer independent.
        shutil.rmtree(ctx.run_dir / VALIDATION_REWARD, ignore_errors=True)
    # bf16 first when present: the others are compared with it.
    order = sorted(cfg.precisions, key=lambda p: p != "bf16")
    shutil.rmtree(ctx.run_dir / ENSEMBLE_REWARD, ignore_errors=True)  # an earlier run's members judged other pairs
    n_models = len(order) + bool(cfg.validation) + cfg.ensemble - 1
    study: dict[str, dict[str, Any]] = {}
    scores: dict[str, torch.Tensor] = {}
    for k, precision in enumerate(order):
        row = train_precision(config, ctx, precision, k, main_pairs)
        row["normalization"] = normalize_saved(ctx.run_dir, precision, device, main_pairs)
        held_out, scores[precision] = evaluate_saved(ctx.run_dir, precision, device, test)
        row.update(held_out)
        study[precision] = row
        ctx.log_metrics({f"reward/{precision}/test_accuracy": row["accuracy"],
                         f"reward/{precision}/test_margin": row["mean_margin"]}, cfg.max_steps)
        ctx.log(f"reward model {precision}: held-out accuracy {row['accuracy']:.3f}, margin {row['mean_margin']:.3f}, "
                f"{row['memory_footprint_bytes'] / MB:.1f} MB weights, {row['throughput_pairs_per_s']:.1f} pairs/s")
        ctx.progress(k + 1, n_models)
    validation = None
    if cfg.validation:
        precision = network_precision(config.ppo.reward_precision, config.ppo.quantized_policy)
        main = config.ppo.reward_precision if config.ppo.reward_precision in scores else order[0]
        row = train_precision(config, ctx, precision, len(order), validation_pairs, VALIDATION_REWARD)
        row["normalization"] = normalize_saved(ctx.run_dir, precision, device, validation_pairs, VALIDATION_REWARD)
        held_out, validation_scores = evaluate_saved(ctx.run_dir, precision, device, test, VALIDATION_REWARD)
        row.update(held_out, train_pairs=len(validation_pairs), main_precision=main,
                   spearman_vs_main=_spearman_or_none(validation_scores, scores[main]),
                   spearman_vs_bf16=_spearman_or_none(validation_scores, scores["bf16"]) if "bf16" in scores else None)
        validation = ValidationResult(**row)
        ctx.log_metrics({"reward/validation/test_accuracy": row["accuracy"],
                         "reward/validation/test_margin": row["mean_margin"]}, cfg.max_steps)
        rho = row["spearman_vs_main"]
        ctx.log(f"validation reward model ({precision}, {len(validation_pairs)} pairs; the main models had the other "
                f"{len(main_pairs)}): held-out accuracy {row['accuracy']:.3f}, rank correlation with the {main} model "
                f"on the test pairs {'n/a' if rho is None else f'{rho:.3f}'}")
        ctx.progress(len(order) + 1, n_models)
    ensemble = []
    main = config.ppo.reward_precision if config.ppo.reward_precision in scores else order[0]
    precision = network_precision(config.ppo.reward_precision, config.ppo.quantized_policy)
    for member in range(1, cfg.ensemble):
        seed = config.seed + member
        pairs = [main_pairs[i] for i in bootstrap(len(main_pairs), seed)]
        where = ensemble_reward_dir(member)
        done = len(order) + bool(cfg.validation) + member - 1
        row = train_precision(dataclasses.replace(config, seed=seed), ctx, precision, done, pairs, where,
                              f"ensemble/{member}")
        row["normalization"] = normalize_saved(ctx.run_dir, precision, device, pairs, where)
        held_out, member_scores = evaluate_saved(ctx.run_dir, precision, device, test, where)
        row.update(held_out, member=member, seed=seed, train_pairs=len(pairs),
                   unique_pairs=len({json.dumps(p, sort_keys=True) for p in pairs}),
                   spearman_vs_main=_spearman_or_none(member_scores, scores[main]),
                   spearman_vs_bf16=_spearman_or_none(member_scores, scores["bf16"]) if "bf16" in scores else None)
        ensemble.append(EnsembleMember(**row))
        ctx.log_metrics({f"reward/ensemble/{member}/test_accuracy": row["accuracy"],
                         f"reward/ensemble/{member}/test_margin": row["mean_margin"]}, cfg.max_steps)
        ctx.log(f"reward ensemble member {member} ({precision}, seed {seed}, {row['unique_pairs']} distinct of "
                f"{len(pairs)} resampled pairs): held-out accuracy {row['accuracy']:.3f}")
        ctx.progress(done + 1, n_models)
    shutil.rmtree(ctx.stage_dir("reward") / "trainer", ignore_errors=True)  # the Trainer's unused output_dir
    for precision, row in study.items():
        row["spearman_vs_bf16"] = _spearman_or_none(scores[precision], scores["bf16"]) if "bf16" in scores else None
    return RewardReport(
        device=str(device), test_pairs=len(test), labels=config.data.labels, train_pairs=len(main_pairs),
        precisions={p: PrecisionResult(**study[p]) for p in cfg.precisions},
        validation=validation,
        ensemble=ensemble,
        note=("bf16 computes in fp32 on the CPU (compute_dtype says which); peak memory on the CPU is the "
              "process RSS, which includes everything else the process holds"),
    )
