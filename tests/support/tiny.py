"""The tiny budgets, by name, and one `tiny_config`: the `tiny` preset shrunk to seconds for what a test runs.

A budget is a dict of overrides of the `tiny` preset (section -> fields). `tiny_config(budget, **sections)` is that
preset with the budget and then `sections` applied (`edgerlhf.contract.merge_overrides`: a dict merges key by key,
anything else replaces). `make_tiny_run` writes an untrained run directory in seconds; `edgerlhf.pipeline`
trains one (`tests/support/trained.py`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edgerlhf.config import HH_PREFS_SAMPLE, TINY_TOKENIZER_DIR, ModelConfig, load_config
from edgerlhf.contract import CONFIG_FILE, SFT_MERGED, TEST_PREFS, TRAIN_PREFS, merge_overrides, reward_dir
from edgerlhf.dialogue import normalize_prompt

MODEL = {"n_layer": 1, "n_head": 2, "n_embd": 32}
"""A 1-layer, 32-wide GPT-2 (its embedding, 50,257 x 32 floats, is 6.4 MB: the out-of-memory tests' limits count on it)."""

SHORT_PAIRS = {"source": HH_PREFS_SAMPLE, "max_pairs": 60, "test_fraction": 0.2, "max_prompt_tokens": 64,
               "max_response_tokens": 16}
"""60 short pairs of the local HH-RLHF sample."""

UNTRAINED = {
    "model": MODEL,
    "reward": {"precisions": ["bf16"]},
    "ppo": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "response_length": 8, "sample_every": 1,
            "checkpoint_every": 1, "n_probe_prompts": 2, "lora_r": 4, "lora_alpha": 8},
    "evaluate": {"n_prompts": 6, "response_length": 8, "n_show": 2, "n_bootstrap": 200},
}
"""The alignment and evaluation tests on `make_tiny_run`'s untrained run directory: a few PPO steps on short prompts."""

SFT_STEPS = {
    "model": {**MODEL, "n_positions": 256},
    "data": {**SHORT_PAIRS, "max_pairs": 40},
    "warmup": {"steps": 0},  # the warm-up's own tests: WARMUP_STEPS
    "sft": {"max_steps": 4, "batch_size": 4, "max_length": 96, "eval_every": 2, "sample_every": 2,
            "n_sample_prompts": 2},
}
"""The SFT stage's tests: 4 steps of 4 examples on 40 pairs, on the random base (no warm-up)."""

WARMUP_STEPS = {
    "model": {**MODEL, "n_positions": 256},
    "data": SHORT_PAIRS,
    "warmup": {"steps": 40, "batch_size": 4, "learning_rate": 3e-3, "max_epochs": 100, "eval_every": 20},
    "sft": {"max_steps": 2, "batch_size": 4, "max_length": 96, "eval_every": 2, "sample_every": 2,
            "n_sample_prompts": 1},
}
"""The warm-up's tests: 40 causal-LM steps, enough for the held-out loss to fall by more than 2 nats."""

REWARD_STUDY = {
    "model": {"n_layer": 1, "n_head": 2, "n_embd": 64, "n_positions": 256},
    "data": {**SHORT_PAIRS, "test_fraction": 0.25, "max_response_tokens": 24},
    "reward": {"precisions": ["bf16", "int8", "int4"], "max_steps": 6, "batch_size": 4, "max_length": 96,
               "eval_every": 3},
}
"""The reward stage's tests: 6 steps per precision of a 64-wide model."""

SFT_AND_REWARD = {
    "model": MODEL,
    "data": {"source": HH_PREFS_SAMPLE, "max_pairs": 40, "max_prompt_tokens": 64, "max_response_tokens": 16},
    "warmup": {"steps": 2, "eval_every": 2},
    "sft": {"max_steps": 2, "batch_size": 4, "max_length": 96, "eval_every": 2, "sample_every": 2},
    "reward": {"precisions": ["bf16"], "max_steps": 2, "batch_size": 4, "eval_every": 2, "max_length": 96},
}
"""data -> sft -> reward in seconds (`edgerlhf pipeline --stages data,sft,reward` with `as_sets(SFT_AND_REWARD)`)."""

PIPELINE = {
    "model": MODEL,
    "data": {"source": HH_PREFS_SAMPLE, "max_pairs": 60, "max_prompt_tokens": 64, "max_response_tokens": 16},
    "warmup": {"steps": 2, "batch_size": 2, "eval_every": 2},
    "sft": {"max_steps": 2, "batch_size": 4, "max_length": 96, "eval_every": 2, "sample_every": 2,
            "n_sample_prompts": 1},
    # Two precisions, so the study has two rows and int8 has a Spearman correlation with bf16.
    "reward": {"precisions": ["bf16", "int8"], "max_steps": 2, "batch_size": 4, "max_length": 96, "eval_every": 2},
    "ppo": {"steps": 2, "batch_size": 4, "samples_per_prompt": 1, "mini_batch_size": 2, "ppo_epochs": 1,
            "response_length": 8, "sample_every": 1, "checkpoint_every": 1, "n_probe_prompts": 1, "lora_r": 4,
            "lora_alpha": 8},
    "evaluate": {"n_prompts": 4, "response_length": 8, "n_show": 2, "samples_per_prompt": 1, "n_bootstrap": 100},
}
"""Every stage in seconds (data, a 2-step warm-up, 2 SFT steps, 2 reward steps per precision, 2 PPO steps, 4
evaluation prompts): the jobs the service tests' worker runs."""

TRAINED = merge_overrides(PIPELINE, {
    "data": {"max_prompt_tokens": 96, "max_response_tokens": 24},  # 48 of the 60 pairs kept: 9 held-out prompts
    "reward": {"precisions": ["bf16", "int8", "int4"]},
    # A large learning rate and two answers per prompt: two steps move the policy clearly away from SFT.
    "ppo": {"samples_per_prompt": 2, "learning_rate": 3e-2},
    "evaluate": {"n_prompts": 6, "n_show": 2, "n_bootstrap": 200},
})
"""The session's one trained run (`tests/support/trained.py`): `PIPELINE` with longer prompts (enough held-out ones
for 6 evaluation prompts), all three reward precisions, and a PPO that clearly moves the policy."""

FAMILIES = {
    "model": {"n_layer": 1, "n_head": 2, "n_kv_head": 1, "n_embd": 64, "intermediate_size": 128, "n_positions": 256},
    "data": {"source": HH_PREFS_SAMPLE, "max_pairs": 48, "max_prompt_tokens": 64, "max_response_tokens": 24},
    "warmup": {"steps": 0},
    "sft": {"target_modules": ["all-linear"], "max_steps": 2, "batch_size": 4, "max_length": 128, "eval_every": 2,
            "sample_every": 2, "n_sample_prompts": 1},
    "reward": {"precisions": ["bf16", "int8", "int4"], "max_steps": 2, "batch_size": 4, "eval_every": 2,
               "max_length": 128},
    "ppo": {"steps": 2, "batch_size": 4, "samples_per_prompt": 2, "mini_batch_size": 2, "ppo_epochs": 1,
            "response_length": 8, "learning_rate": 3e-2, "sample_every": 1, "checkpoint_every": 1,
            "n_probe_prompts": 1},
    "evaluate": {"n_prompts": 4, "response_length": 8, "n_show": 1, "samples_per_prompt": 1},
}
"""Every model family's pipeline (`tests/test_families.py`): one layer of each architecture, every stage."""

ARENA_VOTES_JOB = {
    "stages": ["data", "sft", "reward"],
    "model": {**MODEL, "n_positions": 256},
    "warmup": {"steps": 0},
    "data": {"source": HH_PREFS_SAMPLE, "labels": "human", "max_pairs": 40, "test_fraction": 0.2,
             "max_prompt_tokens": 128, "max_response_tokens": 64, "votes_weight": 1.0},
    "sft": {"max_steps": 2, "batch_size": 4, "max_length": 96, "eval_every": 2, "sample_every": 2,
            "n_sample_prompts": 0},
    "reward": {"precisions": ["bf16"], "max_steps": 150, "batch_size": 8, "eval_every": 150, "max_length": 192},
}
"""A job on arena votes (`data.votes_file` added by the test): 2 SFT steps; the reward model is what is tested."""

DATA_ONLY = {"stages": ["data"], "data": {"max_pairs": 20}}
"""The cheapest real job: reads and splits 1,000 local pairs (no torch)."""


def sft_job(max_steps: int) -> dict[str, Any]:
    """data + a tiny LoRA SFT (no warm-up of the random base first) that checks cancel after each step and logs
    `sft/loss` at every step 1..max_steps (SFT logs every max(1, max_steps // 100) steps, so keep max_steps under
    200)."""
    return {"stages": ["data", "sft"], "data": {"max_pairs": 20}, "warmup": {"steps": 0},
            "sft": {"max_steps": max_steps, "batch_size": 2, "max_length": 96, "n_sample_prompts": 0,
                    "eval_every": 100_000}}


def tiny_config(budget: dict[str, Any] = UNTRAINED, **sections: Any):
    """The `tiny` preset with `budget` and then `sections` (e.g. `ppo={"steps": 4}`, `algorithm="grpo"`) applied."""
    return load_config("tiny", merge_overrides(budget, sections))


def as_sets(budget: dict[str, Any]) -> list[str]:
    """`budget` as `edgerlhf pipeline --set` items (`sft.max_steps=2`, `reward.precisions=["bf16"]`)."""
    items = []
    for section, fields in budget.items():
        for name, value in (fields.items() if isinstance(fields, dict) else [(None, fields)]):
            key = section if name is None else f"{section}.{name}"
            items.append(f"{key}={value if isinstance(value, str) else json.dumps(value)}")
    return items


def make_tiny_run(run_dir: Path, config=None, precisions=("bf16",), n_train: int = 24, n_test: int = 8) -> Path:
    """A run directory for the alignment, evaluation and bench tests, without running the sft and reward stages.

    Writes what those stages would leave behind, in the formats `edgerlhf.models` reads: `sft/merged` (a random
    GPT-2 of `config.model`'s size + the GPT-2 tokenizer), `reward/<precision>/` (a random causal-LM LoRA adapter
    + score head) and `data/{train,test}_prefs.jsonl` from the HH-RLHF sample.
    """
    import torch
    from peft import get_peft_model

    from edgerlhf.models import load_tokenizer, lora_config, random_model

    config = config or tiny_config()
    run_dir = Path(run_dir)
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    model_cfg = ModelConfig(name_or_path="tiny", random_init=True, n_layer=config.model.n_layer,
                            n_head=config.model.n_head, n_embd=config.model.n_embd, n_positions=256)
    model = random_model(model_cfg, tokenizer, seed=0)
    merged = run_dir / SFT_MERGED
    model.save_pretrained(merged)
    tokenizer.save_pretrained(merged)

    for precision in precisions:
        rm_dir = run_dir / reward_dir(precision)
        torch.manual_seed(1)
        body = random_model(model_cfg, tokenizer, seed=0)
        lora = get_peft_model(body, lora_config(body, 4, 8, ["c_attn", "c_proj"]))
        with torch.no_grad():
            for name, p in lora.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)  # a non-zero reward adapter: it must change what the network computes
        lora.save_pretrained(rm_dir / "adapter")
        torch.save({"weight": torch.randn(1, config.model.n_embd), "bias": torch.zeros(1)}, rm_dir / "score_head.pt")
        meta = {"precision": precision, "max_length": 160, "compute_dtype": "float32",
                "hidden_size": config.model.n_embd}
        (rm_dir / "reward_model.json").write_text(json.dumps(meta))

    rows = []
    with open(HH_PREFS_SAMPLE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            prompt = normalize_prompt(row["prompt"])
            if len(tokenizer(prompt)["input_ids"]) <= 48:
                rows.append({"prompt": prompt, "chosen": row["chosen"].strip(), "rejected": row["rejected"].strip()})
            if len(rows) == n_train + n_test:
                break
    for name, part in ((TEST_PREFS, rows[:n_test]), (TRAIN_PREFS, rows[n_test:])):
        (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / name).write_text("".join(json.dumps(r) + "\n" for r in part))
    (run_dir / CONFIG_FILE).write_text(config.to_json())
    return run_dir


CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
"""The ChatML template of Qwen and SmolLM2 chat models (their system-prompt defaults left out)."""


def data_and_random_sft(run_dir: Path, config=None) -> Path:
    """`run_dir` as the reward stage finds it: the data stage's files of `config` (default: the `REWARD_STUDY` budget,
    gold labels) and a random model as `sft/merged`; for the reward stage's tests."""
    from edgerlhf.context import RunContext
    from edgerlhf.data import run as run_data
    from edgerlhf.models import load_tokenizer, random_model

    config = config or tiny_config(REWARD_STUDY)
    ctx = RunContext(run_dir)
    ctx.begin_stage("data")
    run_data(config, ctx)
    tokenizer = load_tokenizer(config.model.tokenizer)
    model = random_model(config.model, tokenizer, seed=0)
    model.save_pretrained(run_dir / SFT_MERGED)
    tokenizer.save_pretrained(run_dir / SFT_MERGED)
    return run_dir


def chat_template_tokenizer(path: Path):
    """The GPT-2 tokenizer made a chat model's: ChatML's two special tokens added and its template set, saved
    to `path` (a `model.tokenizer` directory). Returns the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return tokenizer
