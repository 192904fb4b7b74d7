"""The warm-up of a random base: a short causal-LM pre-training on the training dialogues' text, before SFT.

A `model.random_init` network cannot form words, and a LoRA SFT of a few hundred steps on top of it stays
word salad (held-out perplexity in the hundreds): no reward model or PPO run on such a policy can show
that the loop aligns *content*. So, for random bases only, the SFT stage first calls `warm_up`: every
parameter trains as a plain language model (next-token loss on every token, AdamW, linear warm-up then
cosine decay, as nanoGPT's `train.py`) for `warmup.steps` steps on the text of the *training* pairs: each
prompt followed by each of its responses (chosen and rejected alike: the warm-up learns the language, not
the preference), in the model's `PromptFormat`, so it reads exactly the sequences SFT, the reward model
and PPO will see, each from its first token. Held-out pairs are never trained on.

Reports through the context: `warmup/loss`, `warmup/learning_rate`, `warmup/tokens_per_s` every
`LOG_EVERY` steps, and `warmup/eval_loss`, `warmup/perplexity` (at step 0, every `warmup.eval_every` steps
and at the end): exp of the mean loss of the held-out pairs' chosen responses given their prompts, SFT's
own `sft/perplexity`, so the two read on one scale. The SFT stage then saves the warmed-up weights as
`base/` (the base later stages, the Probes page and the chat start from).
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from edgerlhf.config import PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import TEST_PREFS, TRAIN_PREFS
from edgerlhf.data import demonstrations, read_prefs
from edgerlhf.dialogue import PromptFormat
from edgerlhf.models import head_logits

LOG_EVERY = 10
"""Training loss and learning rate are logged every this many steps."""
EVAL_BATCH = 8
"""Held-out texts per forward pass of the evaluation."""


def encode(rows: list[dict[str, str]], tokenizer, max_length: int, both: bool) -> list[tuple[list[int], list[int]]]:
    """(token ids, loss mask) of each distinct (prompt, response) text, cut at `max_length` tokens.

    The mask is 1 on the tokens that carry loss: every token after the first (`both`, training on the chosen
    and the rejected response), or only the response's tokens (`both=False`, the chosen response given its
    prompt: the held-out measure SFT also reports). Responses against an empty answer (added for the reward
    model) contribute nothing new and are left out with their empty side.
    """
    fmt = PromptFormat.of(tokenizer)
    texts = {(r["prompt"], r[side]) for r in rows for side in (("chosen", "rejected") if both else ("chosen",))
             if r[side]}
    out = []
    for prompt, response in sorted(texts):  # sorted: a set has no stable order across processes
        prompt_ids = tokenizer(fmt.prompt(prompt), add_special_tokens=fmt.add_special_tokens)["input_ids"]
        answer_ids = tokenizer(fmt.answer(response), add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + answer_ids)[:max_length]
        mask = [0] + [1] * (len(ids) - 1) if both else ([0] * len(prompt_ids) + [1] * len(answer_ids))[:max_length]
        out.append((ids, mask))
    return out


def dialogues(run_dir, split: str) -> list[dict[str, str]]:
    """The texts to warm up on, as `encode` reads them: the preference pairs, or, for a run without any, the
    demonstrations (`edgerlhf.data`), each as a pair against no answer."""
    rows = read_prefs(Path(run_dir) / (TRAIN_PREFS if split == "train" else TEST_PREFS))
    return rows or [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": ""}
                    for r in demonstrations(run_dir, split)]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, ...]:
    """Right-padded `(input_ids, attention_mask, loss_mask)`, each (B, T)."""
    T = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), T), dtype=torch.long)
    loss_mask = torch.zeros((len(examples), T), dtype=torch.bool)
    for i, (ids, mask) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        loss_mask[i, :len(mask)] = torch.tensor(mask, dtype=torch.bool)
    return input_ids.to(device), attention.to(device), loss_mask.to(device)


def next_token_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each masked token given the ones before it.

    The output layer runs on the masked positions only, as SFT's loss does (`sft.CompletionSFTTrainer`):
    a (tokens, vocabulary) matrix of 50k columns is most of a small model's step.
    """
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    targets = input_ids[:, 1:]  # (B, T-1): position t predicts token t + 1
    mask = loss_mask[:, 1:]  # (B, T-1)
    logits = head_logits(model, hidden[:, :-1][mask])  # (N, V)
    return F.cross_entropy(logits, targets[mask], reduction=reduction)


@torch.no_grad()
def held_out_loss(model, examples, pad_id: int, device) -> float:
    """Mean loss per response token of the held-out examples (NaN without any)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), EVAL_BATCH):
        input_ids, attention, loss_mask = collate(examples[i:i + EVAL_BATCH], pad_id, device)
        total += next_token_loss(model, input_ids, attention, loss_mask, reduction="sum").item()
        count += int(loss_mask[:, 1:].sum())
    model.train(was_training)
    return total / count if count else float("nan")


def learning_rate(step: int, steps: int, peak: float) -> float:
    """Linear warm-up over the first 5 % of the steps, then cosine decay to a tenth of the peak (nanoGPT)."""
    warm = max(1, steps // 20)
    if step < warm:
        return peak * (step + 1) / warm
    progress = (step - warm) / max(1, steps - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def warm_up(config: PipelineConfig, ctx: RunContext, model, tokenizer) -> dict[str, float]:
    """Train every parameter of `model` (in place) as a causal LM on the training dialogues' text.

    Runs `warmup.steps` steps, or fewer when that many would pass over the training texts more than
    `warmup.max_epochs` times. Returns the held-out loss before and after, the perplexity after and the
    steps run (`{}` when `warmup.steps` is 0).
    """
    cfg = config.warmup
    if cfg.steps == 0:
        return {}
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id
    held_out = encode(dialogues(ctx.run_dir, "test"), tokenizer, cfg.max_length, both=False)
    train = encode(dialogues(ctx.run_dir, "train"), tokenizer, cfg.max_length, both=True)
    steps = min(cfg.steps, math.ceil(cfg.max_epochs * len(train) / cfg.batch_size))
    rng = random.Random(config.seed)

    def evaluate(step: int) -> float:
        loss = held_out_loss(model, held_out, pad_id, device)
        if math.isfinite(loss):  # NaN without held-out pairs
            ctx.log_metrics({"warmup/eval_loss": loss, "warmup/perplexity": math.exp(min(loss, 50.0))}, step)
        return loss

    was_training = model.training
    first = evaluate(0)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(0.9, 0.95), weight_decay=0.1)
    model.train()
    started, tokens = time.perf_counter(), 0
    for step in range(1, steps + 1):
        ctx.check_cancelled()
        lr = learning_rate(step - 1, steps, cfg.learning_rate)
        for group in optimizer.param_groups:
            group["lr"] = lr
        input_ids, attention, loss_mask = collate(rng.sample(train, min(cfg.batch_size, len(train))), pad_id, device)
        loss = next_token_loss(model, input_ids, attention, loss_mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        tokens += int(attention.sum())
        if step % LOG_EVERY == 0 or step == steps:
            ctx.log_metrics({"warmup/loss": loss.item(), "warmup/learning_rate": lr,
                             "warmup/tokens_per_s": tokens / max(time.perf_counter() - started, 1e-9)}, step)
        if step % cfg.eval_every == 0 and step < steps:
            evaluate(step)
    last = evaluate(steps)
    model.train(was_training)
    ctx.log(f"warm-up: {steps} causal-LM steps on {len(train)} training texts in "
            f"{time.perf_counter() - started:.0f}s, held-out perplexity {math.exp(min(first, 50.0)):.0f} -> "
            f"{math.exp(min(last, 50.0)):.1f}")
    return {"eval_loss_before": first, "eval_loss": last, "perplexity": math.exp(min(last, 50.0)), "steps": steps}
