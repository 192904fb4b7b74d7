"""KTO — the alignment stage with `algorithm=kto` (`edgerlhf.align.run` hands it here): Kahneman-Tversky
Optimization on answers labelled desirable or undesirable, with TRL's KTOTrainer.

KTO (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization") needs no pairs: an example
is one answer to a prompt and a thumb, up (desirable) or down. With r(x, y) = log pi(y|x) - log ref(y|x) and z the
batch's estimate of KL(pi || ref) (no gradient, clamped at 0), each answer's loss is

    desirable:    kto.desirable_weight   * (1 - sigmoid(beta * (r(x, y) - z)))
    undesirable:  kto.undesirable_weight * (1 - sigmoid(beta * (z - r(x, y))))

averaged over the batch (TRL's `KTOTrainer._compute_loss`, the paper's eq. 7-8). z is the mean log-ratio of each
prompt with *another* answer of the batch (its "KL partner", `kl_partners`): the reference point an answer has to
beat, which the policy cannot raise by moving every answer at once.

The examples are `edgerlhf.data.unpaired`'s: a data set of thumbs (`data.source` of prompt/completion/label rows,
such as a snapshot of chat feedback) or, from preference pairs, each pair's chosen answer labelled desirable and its
rejected one undesirable (on the known-answer task, gold-labelled unpaired data split from the same pairs). They are
tokenized in the model's `PromptFormat` as DPO tokenizes its pairs (`unpaired_dataset`: the prompt through the chat
template when there is one, the answer with its end of turn, the prompt cut from the left) and shuffled with `seed`
once: TRL reads KTO's batches in order, since each answer's KL partner is fixed within its batch.

Memory design — one copy of the base network, as DPO: a fresh LoRA (`kto.lora_r` on `sft.target_modules`) on
sft/merged, the reference its adapter disabled. A step runs the policy's KL pass without gradients, the policy
with them, then, adapter off, the reference's KL pass and pass; off the GPU the log-prob head scores the answer
positions only (`offline.add_answer_logprob_head`). The stage around the trainer is DPO's (`offline.run_trainer`: the
checkpoints, their resume, cancel, `ppo/adapter`, the report), its micro-batch halved on out-of-memory as every
stage's (`oom.SplitOnOutOfMemory`: the losses weighted by their share, each piece with the whole batch's KL
sequences, so that z and the gradients are the whole batch's).

Metrics (`edgerlhf.contract.algorithm_metric("kto", ...)`), per optimizer step: `kto/loss`, `kto/kl` (z, TRL's
estimate: the log-ratio on mismatched answers, clamped at 0 — the loss's reference point, not an exact KL),
`kto/chosen_reward` and `kto/rejected_reward` (the mean implicit reward beta * r of the batch's desirable and of its
undesirable answers), `kto/margin` (their difference, when a batch holds both), `kto/entropy`,
`kto/learning_rate`, `kto/grad_norm`, `kto/step_s`, and at `kto.eval_every` the same on the held-out examples
(`kto/eval_loss`, `kto/eval_kl`, `kto/eval_chosen_reward`, `kto/eval_rejected_reward`, `kto/eval_margin`);
`mem/*` at each step.
"""

from __future__ import annotations

import random
from pathlib import Path

from edgerlhf.align.offline import (CHECKPOINT_DIR, add_answer_logprob_head, assemble_trainer, eval_renames,
                                    run_trainer)
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.data import unpaired
from edgerlhf.dialogue import PromptFormat
from edgerlhf.formats import DataError
from edgerlhf.models import trainer_arguments
from edgerlhf.oom import SplitOnOutOfMemory
from edgerlhf.reports import PPOReport

ALGORITHM = "kto"


# --- data: labelled answers in the model's PromptFormat, each with its KL partner --------------------


def kl_partners(prompts: list[str], batch_size: int) -> list[int]:
    """For each row, the row whose answer its KL sequence takes: within its batch of `batch_size` consecutive rows,
    the one before it (the first takes the last: TRL's rotation), or the nearest before that with another prompt,
    so that an answer is paired with a prompt it does not answer (the same prompt twice in a row, as a pair split
    into its two answers, would otherwise give a matched sequence)."""
    partners = []
    for start in range(0, len(prompts), batch_size):
        batch = list(range(start, min(start + batch_size, len(prompts))))
        for k, row in enumerate(batch):
            others = [batch[(k - step) % len(batch)] for step in range(1, len(batch))]
            partners.append(next((j for j in others if prompts[j] != prompts[row]), others[0] if others else row))
    return partners


def unpaired_dataset(rows: list[dict], tokenizer, max_length: int, batch_size: int, seed: int):
    """Tokenized unpaired examples: `prompt_ids`, `completion_ids`, `label` and `KL_completion_ids` (the answer of the
    row's KL partner), the form TRL's KTO collator takes, shuffled with `seed` into the order the Trainer reads.

    The prompt is `PromptFormat.prompt(p)` and the answer `PromptFormat.answer(c)`, tokenized apart as DPO's pairs
    (`dpo.preference_dataset`): within `max_length` the answer keeps its start and leaves the prompt at least half
    the budget (or all of itself), then the prompt is cut from the left to fit. A KL sequence (a prompt and its
    partner's answer) longer than `max_length` is cut at its end by TRL's collator.
    """
    from datasets import Dataset

    fmt = PromptFormat.of(tokenizer)
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    examples = []
    for r in rows:
        prompt_ids = tokenizer(fmt.prompt(r["prompt"]), add_special_tokens=fmt.add_special_tokens)["input_ids"]
        keep = max_length - min(len(prompt_ids), max_length // 2)
        completion_ids = tokenizer(fmt.answer(r["completion"]), add_special_tokens=False)["input_ids"][:keep]
        room = max_length - len(completion_ids)
        examples.append({"prompt_ids": prompt_ids[max(0, len(prompt_ids) - room):], "completion_ids": completion_ids,
                         "label": bool(r["label"])})
    for example, partner in zip(examples, kl_partners([r["prompt"] for r in rows], batch_size)):
        example["KL_completion_ids"] = examples[partner]["completion_ids"]
    return Dataset.from_list(examples)


def balance_advice(n_desirable: int, n_undesirable: int, desirable_weight: float,
                   undesirable_weight: float) -> str | None:
    """When the two sides' weighted counts are out of the paper's range (eq. 8: desirable_weight x n_desirable /
    (undesirable_weight x n_undesirable) in [1, 4/3]), the weight to set, as TRL advises; None when in range."""
    if not n_desirable or not n_undesirable:
        return None
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if 1.0 <= ratio <= 4 / 3:
        return None
    low = undesirable_weight * n_undesirable / n_desirable
    return (f"{n_desirable} desirable and {n_undesirable} undesirable answers: weighted {ratio:.2f} to 1; the KTO "
            f"paper keeps it within 1 to 1.33, e.g. kto.desirable_weight in [{low:.2f}, {4 / 3 * low:.2f}]")


# --- the trainer ----------------------------------------------------------------------------------


def _trainer_class():
    from trl import KTOTrainer

    class KTOStageTrainer(SplitOnOutOfMemory, KTOTrainer):
        """TRL's KTOTrainer on our tokenized examples, with a step that splits its micro-batch on out-of-memory and,
        off the GPU, a plain LM head."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.accelerator.device.type not in ("cuda", "xpu"):  # where TRL's head runs its Triton kernel
                add_answer_logprob_head(self.model.get_base_model())

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already tokenized, with its KL partners (`unpaired_dataset`)

        def part(self, inputs, rows):
            """A piece of the batch's answers with every KL sequence of the batch: z is then the whole batch's in
            each piece, and the pieces' weighted losses add up to the batch's loss (the KL passes, without
            gradients, run whole in each piece)."""
            return {**super().part(inputs, rows), **{k: v for k, v in inputs.items() if k.startswith("KL_")}}

    return KTOStageTrainer


def build_trainer(config: PipelineConfig, ctx: RunContext, model, tokenizer, device, callbacks=(), ref_model=None,
                  trainer_class=None):
    """TRL's KTOTrainer with a fresh LoRA policy on `model` (sft/merged) and the run's unpaired examples
    (`data.unpaired`); the reference is the adapter disabled unless a `ref_model` is given (tests pass a second copy
    to see the one-copy check fail). `trainer_class` replaces the stage's trainer class (the bench passes TRL's own)."""
    from trl import KTOConfig

    cfg = config.kto
    train, test = unpaired(ctx.run_dir, "train"), unpaired(ctx.run_dir, "test")
    if not train:
        raise DataError(f"kto: {Path(ctx.run_dir) / 'data'} holds no labelled answers to train on: KTO needs "
                        "data.source to hold preference pairs (each split into a desirable and an undesirable "
                        "answer) or unpaired prompt/completion/label rows, such as a feedback snapshot of thumbs")
    n_desirable = sum(bool(r["label"]) for r in train)
    advice = balance_advice(n_desirable, len(train) - n_desirable, cfg.desirable_weight, cfg.undesirable_weight)
    if advice:
        ctx.log(f"kto: {advice}", "warning")
    args = KTOConfig(**trainer_arguments(cfg, config.seed, device, ctx.run_dir / CHECKPOINT_DIR,
                                         beta=cfg.beta, desirable_weight=cfg.desirable_weight,
                                         undesirable_weight=cfg.undesirable_weight, logging_steps=1,
                                         save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=1,
                                         **({} if test else {"eval_strategy": "no"})))
    def dataset(rows: list[dict]):
        return unpaired_dataset(rows, tokenizer, cfg.max_length, cfg.batch_size, config.seed) if rows else None

    return assemble_trainer(trainer_class or _trainer_class(), "kto", config, ctx, model, tokenizer, device, args,
                            dataset(train), dataset(test), callbacks, ref_model)


_TRAINING = {"loss": "loss", "kl": "kl", "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward",
             "rewards/margins": "margin", "entropy": "entropy", "learning_rate": "learning_rate",
             "grad_norm": "grad_norm"}
RENAMES = {**_TRAINING, **eval_renames(_TRAINING, ("loss", "kl", "chosen_reward", "rejected_reward",
                                                           "margin"))}
"""TRL's logs (training, and held-out as `eval_*`) -> KTO's metrics (`kto/<name>`)."""


def describe(trainer) -> str:
    """What the trainer trains on, for the stage's log."""
    labels = trainer.train_dataset["label"]
    return f"{len(labels)} labelled answers ({sum(labels)} desirable, {len(labels) - sum(labels)} undesirable)"


# --- the stage ------------------------------------------------------------------------------------


def run(config: PipelineConfig, ctx: RunContext) -> PPOReport:
    """KTO on the SFT policy with the training examples; writes `ppo/adapter` and returns the alignment stage's
    report."""
    return run_trainer(config, ctx, ALGORITHM, build_trainer, RENAMES, describe)
