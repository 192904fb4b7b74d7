"""A tiny run directory for PPO / evaluate / bench tests, built without running the sft and reward stages.

`make_tiny_run` writes what those stages would leave behind, in the formats `edgerlhf.models` reads:
`sft/merged` (a random 1-layer GPT-2 + the GPT-2 tokenizer), `reward/<precision>/` (a random causal-LM
LoRA adapter + score head) and `data/{train,test}_prefs.jsonl` from the HH-RLHF sample. Only the tests of
the stages that read them use it; the known-answer test runs the real stages end to end.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from edgerlhf.config import HH_PREFS_SAMPLE, TINY_TOKENIZER_DIR, ModelConfig, load_config
from edgerlhf.contract import CONFIG_FILE, SFT_MERGED, TEST_PREFS, TRAIN_PREFS, reward_dir
from edgerlhf.dialogue import normalize_prompt


def tiny_config(run_dir: Path | None = None, **ppo):
    """The `tiny` preset shrunk to seconds: a few PPO steps on short prompts."""
    overrides = {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32},
                 "reward": {"precisions": ["bf16"]},
                 "ppo": {"steps": 2, "batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 1, "response_length": 8,
                         "sample_every": 1, "checkpoint_every": 1, "n_probe_prompts": 2, "lora_r": 4,
                         "lora_alpha": 8, **ppo},
                 "evaluate": {"n_prompts": 6, "response_length": 8, "n_show": 2, "n_bootstrap": 200}}
    return load_config("tiny", overrides)


def make_tiny_run(run_dir: Path, config=None, precisions=("bf16",), n_train: int = 24, n_test: int = 8) -> Path:
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


def chat_template_tokenizer(path: Path):
    """The GPT-2 tokenizer made a chat model's: ChatML's two special tokens added and its template set, saved
    to `path` (a `model.tokenizer` directory). Returns the tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_TOKENIZER_DIR)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    return tokenizer
