"""Model architectures: the transformers config of a pipeline's model, without downloading its weights.

Two users need a model's shape before (or instead of) its weights:
- random-weight models (`model.random_init`: tests, the `tiny` preset, benchmarks) are built from a config
  of any family transformers has (`model.architecture`: gpt2, llama, qwen2, qwen3, mistral, gemma2,
  gemma3_text, phi3, ...) sized by the `model.n_*` fields;
- the memory planner reads layers, widths and the vocabulary of the model a job will load.

`PUBLISHED_SHAPES` holds the exact shapes of the models the presets load, as written in each one's
`config.json` on the hub, so benchmarks can build them with random weights and the planner can answer
offline. Any other model's config is read from its local directory or fetched alone from the hub.
"""

from __future__ import annotations

from typing import Any

from edgerlhf.config import ModelConfig

PUBLISHED_SHAPES: dict[str, dict[str, Any]] = {
    # hub id: the `model.*` fields that rebuild its architecture (random weights, the published shapes)
    "distilgpt2": dict(architecture="gpt2", n_layer=6, n_head=12, n_embd=768, n_positions=1024,
                       vocab_size=50257, tie_word_embeddings=True),
    "Qwen/Qwen2.5-0.5B-Instruct": dict(architecture="qwen2", n_layer=24, n_head=14, n_kv_head=2, n_embd=896,
                                       intermediate_size=4864, n_positions=32768, vocab_size=151936,
                                       tie_word_embeddings=True),
    "Qwen/Qwen2.5-1.5B-Instruct": dict(architecture="qwen2", n_layer=28, n_head=12, n_kv_head=2, n_embd=1536,
                                       intermediate_size=8960, n_positions=32768, vocab_size=151936,
                                       tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-360M-Instruct": dict(architecture="llama", n_layer=32, n_head=15, n_kv_head=5, n_embd=960,
                                                intermediate_size=2560, n_positions=8192, vocab_size=49152,
                                                tie_word_embeddings=True),
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": dict(architecture="llama", n_layer=24, n_head=32, n_kv_head=32,
                                                n_embd=2048, intermediate_size=8192, n_positions=8192,
                                                vocab_size=49152, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-1B-Instruct": dict(architecture="llama", n_layer=16, n_head=32, n_kv_head=8, n_embd=2048,
                                             intermediate_size=8192, n_positions=131072, vocab_size=128256,
                                             tie_word_embeddings=True),
    "google/gemma-3-1b-it": dict(architecture="gemma3_text", n_layer=26, n_head=4, n_kv_head=1, head_dim=256,
                                 n_embd=1152, intermediate_size=6912, n_positions=32768, vocab_size=262144,
                                 tie_word_embeddings=True),
}


def random_config(model_cfg: ModelConfig, vocab_size: int, bos_token_id: int | None = None,
                  eos_token_id: int | None = None, pad_token_id: int | None = None):
    """The transformers config of a `random_init` model: `model.architecture` sized by the `model.*` fields.

    `vocab_size` is the tokenizer's length unless `model.vocab_size` asks for more rows (a published shape).
    """
    from transformers import AutoConfig

    cfg = model_cfg
    tokens = dict(vocab_size=max(vocab_size, cfg.vocab_size or 0), bos_token_id=bos_token_id,
                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, tie_word_embeddings=cfg.tie_word_embeddings)
    if cfg.architecture == "gpt2":
        return AutoConfig.for_model("gpt2", n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                                    n_positions=cfg.n_positions, n_inner=cfg.intermediate_size, **tokens)
    return AutoConfig.for_model(
        cfg.architecture, num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
        num_key_value_heads=cfg.n_kv_head or cfg.n_head, hidden_size=cfg.n_embd,
        head_dim=cfg.head_dim or cfg.n_embd // cfg.n_head, intermediate_size=cfg.intermediate_size or 4 * cfg.n_embd,
        max_position_embeddings=cfg.n_positions, **tokens)


def model_config(model_cfg: ModelConfig):
    """The transformers config of the model a pipeline config loads, without its weights.

    A random model's comes from its fields (with the GPT-2 tokenizer's 50,257 tokens unless
    `model.vocab_size` says more), a published preset model's from `PUBLISHED_SHAPES` (offline), a local
    directory's from its `config.json`, any other hub id's from its `config.json` alone (a few kB).
    """
    from edgerlhf import locations

    if model_cfg.random_init:
        return random_config(model_cfg, model_cfg.vocab_size or GPT2_VOCAB)
    shape = PUBLISHED_SHAPES.get(model_cfg.name_or_path)
    if shape is not None:
        return random_config(ModelConfig(name_or_path=model_cfg.name_or_path, random_init=True, **shape),
                             shape["vocab_size"])
    from transformers import AutoConfig

    if locations.is_local(model_cfg.name_or_path):
        return AutoConfig.from_pretrained(model_cfg.name_or_path)
    snapshot = locations.hub_snapshot(model_cfg.name_or_path, allow_patterns=["config.json"])
    return AutoConfig.from_pretrained(str(snapshot))


GPT2_VOCAB = 50257
"""Tokens of the GPT-2 tokenizer (the `tiny` preset's and the benchmarks')."""


def published_shape(name_or_path: str) -> dict[str, Any]:
    """The `model.*` overrides that build `name_or_path`'s published architecture with random weights."""
    if name_or_path not in PUBLISHED_SHAPES:
        raise KeyError(f"no published shape for {name_or_path!r}; known: {sorted(PUBLISHED_SHAPES)}")
    return {"random_init": True, **PUBLISHED_SHAPES[name_or_path]}
