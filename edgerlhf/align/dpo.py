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
scores the reference with the adapter disabled. `offline.held_base_storages` counts the base weights the trainer
can reach, and the report's `network_copies` is measured around building it (`memory.tensor_bytes`).

The stage around the trainer is the one KTO shares (`edgerlhf.align.offline.run_trainer`): the policy is saved where the
rest of the system loads an aligned policy, `ppo/adapter/` (`edgerlhf.contract.PPO_ADAPTER`): a standard peft
adapter directory on sft/merged, without a value head (evaluation, chat and export read the LoRA only).
Checkpoints are the Trainer's own (`ppo/checkpoint/checkpoint-N/`: adapter, optimizer, scheduler, data position
and RNG), resumed when their signature (`dpo_signature.json`: algorithm, adapter shape, sft/merged) still matches.

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

from pathlib import Path

import torch
import torch.nn.functional as F

from edgerlhf.align.offline import (CHECKPOINT_DIR, add_answer_logprob_head, assemble_trainer, eval_renames,
                                    run_trainer)
from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import KL_CHUNK, TEST_PREFS, TRAIN_PREFS
from edgerlhf.data import read_prefs
from edgerlhf.dialogue import PromptFormat
from edgerlhf.models import head_logits, trainer_arguments
from edgerlhf.oom import SplitPairsOnOutOfMemory
from edgerlhf.reports import PPOReport

ALGORITHM = "dpo"


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
    from trl import DPOConfig

    cfg = config.dpo
    args = DPOConfig(**trainer_arguments(cfg, config.seed, device, ctx.run_dir / CHECKPOINT_DIR,
                                         beta=cfg.beta, loss_type=[cfg.loss_type], logging_steps=1,
                                         save_strategy="steps", save_steps=cfg.checkpoint_every, save_total_limit=1))
    return assemble_trainer(trainer_class or _trainer_class(), "dpo", config, ctx, model, tokenizer, device, args,
                            preference_dataset(ctx.run_dir / TRAIN_PREFS, tokenizer, cfg.max_length),
                            preference_dataset(ctx.run_dir / TEST_PREFS, tokenizer, cfg.max_length),
                            callbacks, ref_model)


_TRAINING = {"loss": "loss", "rewards/accuracies": "accuracy", "rewards/margins": "margin", "kl": "kl",
             "rewards/chosen": "chosen_reward", "rewards/rejected": "rejected_reward", "learning_rate": "learning_rate",
             "grad_norm": "grad_norm"}
RENAMES = {**_TRAINING, **eval_renames(_TRAINING, ("loss", "accuracy", "margin", "kl", "chosen_reward",
                                                           "rejected_reward"))}
"""TRL's logs (training, and held-out as `eval_*`) -> DPO's metrics (`dpo/<name>`)."""


def describe(trainer) -> str:
    """What the trainer trains on, for the stage's log."""
    return f"{len(trainer.train_dataset)} training pairs"


# --- the stage ------------------------------------------------------------------------------------


def run(config: PipelineConfig, ctx: RunContext) -> PPOReport:
    """DPO on the SFT policy with the training pairs; writes `ppo/adapter` and returns the alignment stage's report."""
    return run_trainer(config, ctx, ALGORITHM, build_trainer, RENAMES, describe)
