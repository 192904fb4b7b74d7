"""Configuration of a pipeline run: one dataclass per stage, presets, validation.

Each field carries its help as a docstring right under it (CleanRL's style). Validation lives in
`__post_init__` (as TRL's `ModelConfig` does) and raises `ConfigError` naming the field, so the CLI and
the backend (422) can say exactly what is wrong. A job stores `PipelineConfig.to_dict()` as JSON, and
`PipelineConfig.from_dict()` rebuilds it, so every run can be reproduced.

This module imports nothing heavy: the backend validates jobs with it without loading torch.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from edgerlhf.contract import (ALGORITHMS, ENSEMBLE_SCORES, KEEP_BEST, PRECISIONS, REWARD_POOLINGS, STAGES,
                               algorithm_traits, merge_overrides)
from edgerlhf.locations import absolute_local_paths

LOCATION_FIELDS = (("model", "name_or_path"), ("model", "tokenizer"), ("data", "source"), ("data", "votes_file"),
                   ("sft_data", "source"), ("prompt_data", "source"), ("round", "parent_run"))
"""(section, field) of the config fields that name a model or data location: a hub id or an absolute path (a parent
run, `round.parent_run`: an absolute path only)."""


class ConfigError(ValueError):
    """A configuration value is invalid; `field` is its dotted path, e.g. `ppo.batch_size`."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Range:
    """The values a numeric field accepts, declared on the field: `steps: Annotated[int, Range(1, 10**6)]`.

    Every numeric field has one, so a typo (`10**12` steps, a learning rate of 1e308) is refused before a
    job is queued, and the 422 and the field's documentation (`field_docs`) quote it. Open ends exclude
    the bound: `Range(0, 1, low_open=True)` is (0, 1].
    """

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False

    def __str__(self) -> str:
        def fmt(x: float) -> str:
            return f"{x:g}" if isinstance(x, float) else str(x)
        return f"{'(' if self.low_open else '['}{fmt(self.low)}, {fmt(self.high)}{')' if self.high_open else ']'}"

    def contains(self, value: float) -> bool:
        # Written so that NaN is outside every range.
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return bool(above and below)


COUNT = Range(1, 1_000_000)
"""Steps, intervals and other counts of things done."""
BATCH = Range(1, 4096)
"""Sequences or prompts per batch, accumulation steps."""
TOKENS = Range(1, 32768)
"""Lengths in tokens."""
LORA_RANK = Range(1, 1024)
LEARNING_RATE = Range(0, 1, low_open=True)
FRACTION = Range(0, 1)
FEW = Range(0, 64)
"""How many fixed prompts to sample or show."""
MAX_LIST_ITEMS = 64
"""Most items of any list field (`stages`, `sft.target_modules`, `reward.precisions` ...): none needs more, and a job
stores and serves its config whole."""


@functools.cache
def ranges(cls: type) -> dict[str, Range]:
    """The declared `Range` of each numeric field of a config dataclass."""
    out = {}
    for name, hint in typing.get_type_hints(cls, include_extras=True).items():
        # `Annotated[int, Range(...)]`, or that inside an optional `... | None`
        for candidate in (hint, *typing.get_args(hint)):
            if typing.get_origin(candidate) is Annotated:
                out[name] = next(a for a in typing.get_args(candidate) if isinstance(a, Range))
    return out


def check_ranges(section: str, obj: Any) -> None:
    """Raise `ConfigError` for the first field of `obj` outside its declared `Range` (None is always allowed)."""
    for name, bounds in ranges(type(obj)).items():
        value = getattr(obj, name)
        if value is not None and not bounds.contains(value):
            raise ConfigError(f"{section}.{name}" if section else name, f"must be in {bounds}, got {value}")


RANDOM_ARCHITECTURES = ("gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "gemma3_text", "phi3")
"""Model families a `random_init` model can be built as (transformers `model_type` names); each is tested end to end."""


@dataclass
class ModelConfig:
    name_or_path: str = "distilgpt2"
    """Base causal LM: a Hugging Face hub id (`name` or `org/name`) or an absolute local directory with config
    and weights. Any causal LM family works (GPT-2, Llama, Qwen, Mistral, Gemma, Phi...); a chat model's chat
    template is used when its tokenizer has one."""
    tokenizer: str | None = None
    """Tokenizer hub id or absolute local directory; defaults to `name_or_path`."""
    random_init: bool = False
    """Build the model with random weights from `architecture` and the size fields below instead of loading
    weights (tests, benchmarks)."""
    architecture: str = "gpt2"
    """With `random_init`: the model family (a transformers model type: gpt2, llama, qwen2, qwen3, mistral,
    gemma, gemma2, gemma3_text, phi3)."""
    n_layer: Annotated[int, Range(1, 128)] = 6
    """With `random_init`: number of transformer blocks (6 = distilgpt2)."""
    n_head: Annotated[int, Range(1, 256)] = 12
    """With `random_init`: attention heads per block (12 = distilgpt2)."""
    n_kv_head: Annotated[int, Range(1, 256)] | None = None
    """With `random_init`: key/value heads (grouped-query attention; None: one per attention head; not gpt2)."""
    n_embd: Annotated[int, Range(1, 16384)] = 768
    """With `random_init`: hidden size (768 = distilgpt2)."""
    head_dim: Annotated[int, Range(1, 1024)] | None = None
    """With `random_init`: width of an attention head (None: n_embd / n_head; not gpt2)."""
    intermediate_size: Annotated[int, Range(1, 131072)] | None = None
    """With `random_init`: width of the MLP (None: 4 * n_embd)."""
    n_positions: Annotated[int, Range(8, 1048576)] = 1024
    """With `random_init`: maximum sequence length."""
    vocab_size: Annotated[int, Range(1, 1048576)] | None = None
    """With `random_init`: rows of the embedding matrix (None: the tokenizer's length; more rows rebuild a
    published model's exact shape for benchmarks)."""
    tie_word_embeddings: bool = False
    """With `random_init`: share the output layer with the input embeddings. Off by default so the `tiny`
    preset can train its output layer in full; the published shapes of small models tie them."""

    def __post_init__(self):
        if not self.name_or_path and not self.random_init:
            raise ConfigError("model.name_or_path", "must name a hub id or a local path")
        check_ranges("model", self)
        if self.architecture not in RANDOM_ARCHITECTURES:
            raise ConfigError("model.architecture", f"unknown architecture {self.architecture!r}; "
                                                    f"choose from {list(RANDOM_ARCHITECTURES)}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise ConfigError("model.n_embd", f"must be divisible by n_head={self.n_head}")
        if self.n_kv_head is not None and self.n_head % self.n_kv_head:
            raise ConfigError("model.n_kv_head", f"must divide n_head={self.n_head}")


HUB_SUBSET = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
"""A hub data set's subset (`data.data_dir`): folder names under the snapshot (`harmless-base`, `data/en`), never a
path that leaves it (`datasets` joins it to the snapshot directory: `..` or `/etc` would read anything)."""
HUB_SPLIT = re.compile(r"^\w+(\.\w+)*(\[[0-9%:+-]*\])?(\+\w+(\.\w+)*(\[[0-9%:+-]*\])?)*$")
"""A `datasets` split: `train`, `test`, a slice (`train[:1000]`, `train[10%:20%]`), or several joined by `+`."""


DATA_FORMATS = ("auto", "preference", "demonstration", "prompt", "unpaired")
"""What a data source holds (`edgerlhf.formats`); `auto` detects it from the columns."""


def check_source(section: str, source: str | None, fmt: str, columns: dict[str, str] | None, data_dir: str | None,
                 split: str, formats: tuple[str, ...] = DATA_FORMATS) -> None:
    """The checks every data source's fields share (`data`, `sft_data`, `prompt_data`)."""
    if source is not None and not source:
        raise ConfigError(f"{section}.source", "must name a hub id, a file or a directory")
    if fmt not in formats:
        raise ConfigError(f"{section}.format", f"must be one of {list(formats)}, got {fmt!r}")
    for old, new in (columns or {}).items():
        if not old or not new:
            raise ConfigError(f"{section}.columns", "maps a column name to a format's column name, both non-empty")
    if data_dir and not (HUB_SUBSET.match(data_dir) and ".." not in data_dir.split("/")):
        raise ConfigError(f"{section}.data_dir", f"must be a subset name of the hub data set such as 'harmless-base' "
                                                 f"(folder names joined by '/', no '..', not absolute), got {data_dir!r}")
    if not HUB_SPLIT.match(split):
        raise ConfigError(f"{section}.split", f"must be a split name such as 'train', 'test' or 'train[:1000]', "
                                              f"got {split!r}")


@dataclass
class DataConfig:
    source: str = "Anthropic/hh-rlhf"
    """Hub id, or an absolute path to a local file (`.jsonl`, `.json`, `.csv`, `.parquet`, each also `.gz`) or a
    directory of them: preference pairs (prompt/chosen/rejected or chosen/rejected, text or message lists; HH-RLHF's
    raw dialogues too), or any other format of `format` (`edgerlhf.formats`)."""
    format: str = "auto"
    """What `source` holds: `auto` (detected from its columns), `preference`, `demonstration` (prompt/completion,
    messages or text), `prompt` (prompt-only, other columns kept) or `unpaired` (prompt/completion/label). The
    reward model and DPO read preferences; KTO unpaired feedback, or the preferences split into their two answers;
    without them, the data stage still gives SFT its demonstrations and the sampling algorithms their prompts."""
    columns: dict[str, str] | None = None
    """Column mapping applied before detection, your name -> the format's: {"question": "prompt", "answer":
    "completion"}."""
    name: str | None = None
    """The hub data set's configuration name (`datasets.load_dataset(..., name)`); ignored for local files."""
    data_dir: str | None = "harmless-base"
    """Subset of the hub data set (`harmless-base`, `helpful-base`, ...); ignored for local files."""
    split: str = "train"
    """Split to read from the hub data set."""
    max_pairs: Annotated[int, Range(2, 10_000_000)] | None = None
    """Keep at most this many pairs after cleaning (None: all)."""
    test_fraction: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.1
    """Share of pairs held out for evaluation, split by prompt; the split is deterministic given `seed`."""
    max_prompt_tokens: Annotated[int, TOKENS] = 256
    """Pairs whose prompt is longer than this (in tokens) are dropped."""
    max_response_tokens: Annotated[int, TOKENS] = 128
    """Pairs whose chosen or rejected response is longer than this (in tokens) are dropped."""
    skip_bad_lines: bool = False
    """Count and skip malformed input lines instead of failing on the first one."""
    labels: str = "human"
    """`human`: HH-RLHF's own preference; `gold`: relabel each pair with the known gold scorer (known-answer task)."""
    gold_scorer: str = "concise"
    """With `labels=gold`: the text scorer whose preference is the truth (see edgerlhf.gold)."""
    gold_empty_fraction: Annotated[float, FRACTION] = 0.3
    """With `labels=gold`: for this share of training pairs, also add the pair (chosen vs an empty response), so
    the reward model learns the gold's rule that an empty answer is a bad one."""
    votes_file: str | None = None
    """Arena votes as preference pairs, an absolute path (`POST /api/arena/votes/snapshot` writes one): mixed into
    the training and held-out pairs after the data set's own cleaning and split (edgerlhf.votes); None: no votes."""
    votes_weight: Annotated[float, Range(0, 1, low_open=True)] = 1.0
    """With `votes_file`: the share of training pairs that are votes (each vote pair repeated to reach it); 1: the
    votes alone, the data set's pairs set aside."""

    def __post_init__(self):
        if not self.source:
            raise ConfigError("data.source", "must name a hub id, a file or a directory")
        check_source("data", self.source, self.format, self.columns, self.data_dir, self.split)
        if self.labels not in ("human", "gold"):
            raise ConfigError("data.labels", f"must be 'human' or 'gold', got {self.labels!r}")
        from edgerlhf.gold import SCORERS  # light: plain Python, no torch

        if self.gold_scorer not in SCORERS:
            raise ConfigError("data.gold_scorer", f"unknown scorer {self.gold_scorer!r}; choose from {sorted(SCORERS)}")
        check_ranges("data", self)


@dataclass
class StageDataConfig:
    """A data set of one stage's own (`sft_data`: demonstrations for SFT; `prompt_data`: prompts for PPO, GRPO and
    RLOO), read like `data.source` (`edgerlhf.formats`), split by prompt with `data.test_fraction` and `seed`."""

    source: str | None = None
    """Hub id or absolute local path, as `data.source`; None: derived from `data` (SFT: the preferred answers of
    the preference pairs, or `data`'s own demonstrations; prompts: the prompts of `data`)."""
    format: str = "auto"
    """`auto` (detected from the columns) or the kind this stage reads (`demonstration` / `prompt`); a preference
    set serves as a prompt set with `prompt`."""
    columns: dict[str, str] | None = None
    """Column mapping, your name -> the format's, as `data.columns`."""
    name: str | None = None
    """The hub data set's configuration name."""
    data_dir: str | None = None
    """Subset folder of the hub data set."""
    split: str = "train"
    """Split to read from the hub data set."""
    max_rows: Annotated[int, Range(1, 10_000_000)] | None = None
    """Keep at most this many records after cleaning (None: all)."""


def _stage_data_check(section: str, kind: str):
    def __post_init__(self):
        check_source(section, self.source, self.format, self.columns, self.data_dir, self.split, ("auto", kind))
        check_ranges(section, self)
    return __post_init__


@dataclass
class SFTDataConfig(StageDataConfig):
    __post_init__ = _stage_data_check("sft_data", "demonstration")


@dataclass
class PromptDataConfig(StageDataConfig):
    __post_init__ = _stage_data_check("prompt_data", "prompt")


@dataclass
class WarmupConfig:
    steps: Annotated[int, Range(0, 100_000)] = 0
    """With `model.random_init`: causal-LM steps on the training dialogues' text before SFT, every parameter
    trained, so the random base can form words (edgerlhf.warmup); 0: none."""
    batch_size: Annotated[int, BATCH] = 8
    """Dialogue texts (a prompt and one of its responses) per step."""
    max_length: Annotated[int, TOKENS] = 256
    """Tokens per text; longer ones are cut."""
    learning_rate: Annotated[float, LEARNING_RATE] = 3e-3
    """Peak learning rate (linear warm-up over the first 5 % of the steps, then cosine decay to a tenth)."""
    max_epochs: Annotated[float, Range(0, 1000, low_open=True)] = 4.0
    """At most this many passes over the training texts: fewer steps on a small data set, which more passes
    would only memorise."""
    eval_every: Annotated[int, COUNT] = 100
    """Measure the held-out perplexity every N steps (and before and after)."""

    def __post_init__(self):
        check_ranges("warmup", self)


@dataclass
class SFTConfig:
    precision: str = "bf16"
    """Precision of the frozen base during SFT: `bf16`, or `int8` / `int4` (QLoRA: the LoRA trains on a
    bitsandbytes-quantized base; the adapter is then merged into the base's bf16 weights for sft/merged)."""
    lora_r: Annotated[int, LORA_RANK] = 16
    """LoRA rank."""
    lora_alpha: Annotated[int, Range(1, 4096)] = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: Annotated[float, Range(0, 1, high_open=True)] = 0.05
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Modules that get LoRA adapters, by name (`q_proj`, GPT-2's `c_attn`...), or `all-linear`: every linear
    layer of the body, in any model family. The reward model and the PPO policy adapt the same modules."""
    modules_to_save: list[str] = field(default_factory=list)
    """Modules trained in full beside the LoRA adapters and merged into sft/merged (the `tiny` preset trains
    its random model's untied `lm_head`: a low-rank update of random weights alone cannot shape the output)."""
    learning_rate: Annotated[float, LEARNING_RATE] = 2e-4
    """Peak learning rate."""
    max_steps: Annotated[int, COUNT] = 500
    """Optimizer steps."""
    batch_size: Annotated[int, BATCH] = 8
    """Sequences per device step."""
    grad_accum: Annotated[int, BATCH] = 1
    """Gradient accumulation steps."""
    max_length: Annotated[int, TOKENS] = 384
    """Prompt + response tokens per training sequence (longer ones are truncated)."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input for the backward pass and recompute the rest there (activation
    checkpointing): the same maths, a fraction of the activation memory (`edgerlhf plan` gives both), about a
    third more compute per step."""
    completion_only_loss: bool = True
    """Compute the loss on the response tokens only."""
    eval_every: Annotated[int, COUNT] = 100
    """Evaluate loss and perplexity on held-out pairs every N steps."""
    sample_every: Annotated[int, COUNT] = 100
    """Generate samples for the fixed held-out prompts every N steps."""
    n_sample_prompts: Annotated[int, FEW] = 3
    """How many fixed held-out prompts to sample (as probes, with the `ppo` sampling settings)."""

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError("sft.precision", f"unknown precision {self.precision!r}; choose from {list(PRECISIONS)}")
        check_ranges("sft", self)
        if not self.target_modules:
            raise ConfigError("sft.target_modules", "must name at least one module")
        # A module named twice is one module: keep the first mention, in order.
        self.target_modules = list(dict.fromkeys(self.target_modules))
        self.modules_to_save = list(dict.fromkeys(self.modules_to_save))


@dataclass
class RewardConfig:
    precisions: list[str] = field(default_factory=lambda: ["bf16"])
    """Precisions to train a reward model in; more than one produces the precision study."""
    lora_r: Annotated[int, LORA_RANK] = 16
    """LoRA rank of the reward model."""
    lora_alpha: Annotated[int, Range(1, 4096)] = 32
    """LoRA scaling numerator."""
    learning_rate: Annotated[float, LEARNING_RATE] = 1e-4
    """Peak learning rate of the LoRA adapter."""
    head_lr_scale: Annotated[float, Range(0, 1000, low_open=True)] = 10.0
    """The score head (a new layer) learns this many times faster than the adapter."""
    max_steps: Annotated[int, COUNT] = 300
    """Optimizer steps per precision."""
    batch_size: Annotated[int, BATCH] = 8
    """Preference pairs per device step."""
    grad_accum: Annotated[int, BATCH] = 1
    """Gradient accumulation steps."""
    max_length: Annotated[int, TOKENS] = 384
    """Prompt + response tokens per scored sequence."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input for the backward pass and recompute the rest there (activation
    checkpointing): the same maths, a fraction of the activation memory (`edgerlhf plan` gives both), about a
    third more compute per step."""
    eval_every: Annotated[int, COUNT] = 100
    """Evaluate held-out accuracy every N steps."""
    adapt_embedding: bool = False
    """The reward LoRA also adapts the token embedding (beside `sft.target_modules`): a random-init model's
    hidden states carry no word features for the score head to read (a pretrained model's do), and a LoRA on
    the embedding gives each word its own."""
    pooling: str = "last"
    """How the score head reads the response: `last` (the last token's hidden state, the usual reward model) or
    `mean` (the mean of per-token scores over the response's tokens: learns properties spread over the answer,
    such as a share of its words, that one position summarises poorly) or `both` (their sum: one head reads a
    property of one place, such as the closing mark, and one spread over the answer) or `ends` (the response's
    first token's score plus its last's: how the answer opens and how it ends)."""
    validation: bool = False
    """Also train a validation reward model (`reward/validation/`), an independent second opinion on the sampling
    algorithms' rollouts: the training pairs are split in two parts by prompt, the validation model trains on
    `validation_share` of them and the main reward model (each precision) on the rest, so with this on the main
    reward model sees only the rest of the pairs. The alignment stage scores every step's rollouts with it without
    training on it (`<algorithm>/validation_reward_mean`): a proxy reward that climbs while the validation reward does
    not is reward hacking (README, "Seeing reward hacking")."""
    validation_share: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.5
    """With `validation`: the share of the training pairs (whole prompts, so about) the validation model trains on;
    the main reward model keeps the rest. Lower keeps more pairs for the reward model the policy trains against, at a
    weaker second opinion (README, "Held-out golds": with half, the proxy's accuracy fell)."""
    ensemble: Annotated[int, Range(1, 16)] = 1
    """Reward models in an ensemble (1: none). With k >= 2 the stage also trains k - 1 more reward models
    (`reward/ensemble/<i>/`), each on a bootstrap resample of the main model's training pairs and from its own seed,
    in the precision of the alignment stage's network, where each rides as one more frozen adapter; the sampling
    algorithms then train against a conservative score of the k members (`ppo.ensemble_score`, Coste et al. 2023,
    "Reward Model Ensembles Help Mitigate Overoptimization"; Eisenstein et al. 2023) and log the members'
    disagreement (`<algorithm>/ensemble_std_mean`)."""

    def __post_init__(self):
        if isinstance(self.ensemble, bool) or not isinstance(self.ensemble, int):
            raise ConfigError("reward.ensemble", f"must be a whole number of reward models, got {self.ensemble!r}")
        if self.pooling not in REWARD_POOLINGS:
            raise ConfigError("reward.pooling",
                              f"unknown pooling {self.pooling!r}; choose from {list(REWARD_POOLINGS)}")
        if not self.precisions:
            raise ConfigError("reward.precisions", "must list at least one precision")
        for p in self.precisions:
            if p not in PRECISIONS:
                raise ConfigError("reward.precisions", f"unknown precision {p!r}; choose from {list(PRECISIONS)}")
        if len(set(self.precisions)) != len(self.precisions):
            raise ConfigError("reward.precisions", "lists a precision twice")
        check_ranges("reward", self)


@dataclass
class RewardComponent:
    """One term of `ppo.rewards` (`edgerlhf.rewards`): its kind, its weight and the fields that kind reads."""

    kind: str
    """reward_model, reference_answer, regex, contains, not_contains, length, repetition, gold or judge."""
    weight: float = 1.0
    """Its weight in the sum (negative to penalise)."""
    name: str | None = None
    """Its name in the logs (`<algorithm>/rewards/<name>_mean`); default: the kind and its place."""
    column: str | None = None
    """reference_answer: the prompt data's column that holds the reference answer."""
    extract: str = "whole"
    """reference_answer: how to take the answer out of a response: whole, last_number, first_line, tag:<name>,
    after:<marker> or regex:<pattern>."""
    compare: str = "text"
    """reference_answer: text (normalised case and spaces), number, or math (by value, with math-verify)."""
    pattern: str | None = None
    """regex: the regular expression to look for (1 if found)."""
    words: list[str] | None = None
    """contains / not_contains: the words to look for."""
    target: Annotated[int, Range(0, 100_000)] | None = None
    """length: the length that scores 1."""
    tolerance: Annotated[float, Range(0, 100_000, low_open=True)] = 10.0
    """length: how far from the target the score falls to 0."""
    unit: str = "words"
    """length: words or tokens (the policy's tokenizer)."""
    n: Annotated[int, Range(1, 16)] = 3
    """repetition: the n-gram size."""
    scorer: str | None = None
    """gold: the gold scorer's name."""
    url: str | None = None
    """judge: the OpenAI-compatible endpoint's base URL (`http://127.0.0.1:11434/v1` for Ollama, the service's own
    `/v1` for a finished job's model). A job of the service may name only the endpoints its operator lists
    (`EDGERLHF_JUDGE_URLS`) and its own `/v1`."""
    model: str | None = None
    """judge: the model the endpoint serves (`job-7/ppo`, a job's aligned policy, on the service's own `/v1`)."""
    rubric: str | None = None
    """judge: the instructions, with `{prompt}` and `{answer}` where the conversation and the answer go; the
    reply's first number is the score, out of `max_score`. Default: `edgerlhf.rewards.DEFAULT_RUBRIC`."""
    max_score: Annotated[float, Range(0, 1e6, low_open=True)] = 10.0
    """judge: the rubric's top score; the component scores reply / max_score, clipped to [0, 1]."""
    api_key_env: str | None = None
    """judge: the environment variable of the worker that holds the endpoint's API key (never the key itself)."""
    timeout_s: Annotated[float, Range(0, 600, low_open=True)] = 30.0
    """judge: seconds per request."""
    retries: Annotated[int, Range(0, 10)] = 2
    """judge: retries of a failed request (then the step fails, naming the endpoint)."""
    concurrency: Annotated[int, Range(1, 64)] = 4
    """judge: requests in flight at once."""


@dataclass
class PPOConfig:
    """Settings of the sampling algorithms of the alignment stage: PPO, GRPO and RLOO (`PipelineConfig.algorithm`).
    All three read the sampling, batch, optimizer, LoRA, reward and bookkeeping fields; a field only some of
    them read says which."""

    steps: Annotated[int, COUNT] = 200
    """Iterations (each samples `batch_size` responses)."""
    batch_size: Annotated[int, BATCH] = 32
    """Responses sampled per iteration (the rollout batch: batch_size / samples_per_prompt prompts)."""
    mini_batch_size: Annotated[int, BATCH] = 2
    """Rollouts per forward/backward pass."""
    grad_accum: Annotated[int, BATCH] = 1
    """Minibatches accumulated per optimizer step."""
    ppo_epochs: Annotated[int, Range(1, 100)] = 4
    """Optimisation epochs over each rollout batch (GRPO's and RLOO's `num_iterations`, mu)."""
    learning_rate: Annotated[float, LEARNING_RATE] = 1.41e-5
    """Adam learning rate for the policy adapter (and PPO's value head)."""
    lr_warmup_steps: Annotated[int, Range(0, 1_000_000)] = 0
    """Iterations over which the learning rate rises linearly to `learning_rate` (iteration i of N uses i/N of it):
    the first updates, from a fresh value head and Adam's first moments, move the policy the most. 0: none."""
    response_length: Annotated[int, Range(1, 8192)] = 64
    """Maximum new tokens per sampled response (also of the SFT and PPO probes). Keep it at least
    `data.max_response_tokens`: shorter, and the answers the SFT policy learned to give are cut before their end
    (`missing_eos_penalty`); every preset does."""
    missing_eos_penalty: Annotated[float, Range(0, 1000)] = 1.0
    """Subtracted from the score of a sampled answer that ran into `response_length` without ending (PPO, GRPO,
    RLOO): the reward model scores a cut answer as if it were finished, so without it the policy can gain by
    rambling to the cap. The share of such answers is logged as `<algorithm>/cap_hit_rate`. 0 turns it off."""
    length_control: bool = False
    """PPO, GRPO, RLOO: learn from the scores less their linear trend on the answer's length in tokens, fitted over
    each step's batch (least squares; the batch mean is kept), so that making answers longer or shorter earns
    nothing in itself and only what the reward model scores at equal length is learned. The fitted slope, the score
    per token of length, is logged as `<algorithm>/length_slope` whether or not it is removed: a reward model's
    length preference on the policy's own answers. Off by default until it is measured (README, "Held-out golds")."""
    temperature: Annotated[float, Range(0.01, 10)] = 1.0
    """Sampling temperature (logits are divided by it before top-k and top-p); these sampling settings
    also draw the SFT and PPO probes and the evaluation's samples."""
    top_k: Annotated[int, Range(0, 1_000_000)] = 50
    """Top-k sampling (0 disables)."""
    top_p: Annotated[float, Range(0, 1, low_open=True)] = 0.95
    """Nucleus sampling threshold (1.0 disables)."""
    init_kl_coef: Annotated[float, Range(0, 100)] = 0.1
    """Coefficient of the KL to the reference policy. PPO: initial coefficient of the per-token KL penalty in the
    reward; GRPO: beta of the k3 KL term in the loss; RLOO: beta of the response's KL subtracted from its
    score. GRPO and RLOO keep it fixed (as TRL's `beta`)."""
    adaptive_kl: bool = True
    """PPO: adapt the KL coefficient towards `target_kl` (Ziegler et al. 2019); False keeps it fixed."""
    target_kl: Annotated[float, Range(0, 1000, low_open=True)] = 6.0
    """PPO: target KL per response for the adaptive controller."""
    kl_horizon: Annotated[int, Range(1, 1_000_000_000)] = 10000
    """PPO: horizon of the adaptive KL controller, in samples."""
    gamma: Annotated[float, FRACTION] = 1.0
    """PPO: discount factor."""
    lam: Annotated[float, FRACTION] = 0.95
    """PPO: GAE lambda."""
    cliprange: Annotated[float, Range(0, 10, low_open=True)] = 0.2
    """Ratio clipping (PPO and GRPO per token, RLOO per response; TRL's `epsilon`)."""
    cliprange_value: Annotated[float, Range(0, 1000, low_open=True)] = 0.2
    """PPO: value-function clipping."""
    vf_coef: Annotated[float, Range(0, 100)] = 0.1
    """PPO: weight of the value loss."""
    ent_coef: Annotated[float, Range(0, 10)] = 0.0
    """PPO and GRPO: weight of the entropy bonus."""
    whiten_rewards: bool = False
    """PPO: whiten the scores before adding the KL penalty; RLOO: whiten the advantages over the batch (TRL's
    `normalize_advantages`); GRPO ignores it (its group normalisation scales the scores)."""
    max_grad_norm: Annotated[float, Range(0, 1e6, low_open=True)] = 1.0
    """Gradient clipping."""
    gradient_checkpointing: bool = False
    """In the update passes, keep only each layer's input for the backward pass and recompute the rest there
    (activation checkpointing): the same maths, a fraction of the activation memory (`edgerlhf plan` gives both),
    about a third more compute per update."""
    reward_precision: str | None = None
    """Which trained reward model scores the rollouts (one of reward.precisions; None: the first of them)."""
    sample_every: Annotated[int, COUNT] = 10
    """Record sample generations (prompt, response, reward) every N steps."""
    checkpoint_every: Annotated[int, COUNT] = 20
    """Save the policy adapter and optimizer every N steps so a run can resume (and, with `keep_best`, weigh the
    policy against the best so far)."""
    keep_best: str = "none"
    """Which signal the policy is not trained on picks the policy the stage writes to `ppo/adapter` (PPO, GRPO,
    RLOO): `none` (the last one), `validation` (the validation reward model's score of the rollouts: needs
    `reward.validation`), `gold` (the known-answer task's gold: needs `data.labels: gold` and a reward that is not
    that gold) or `auto` (validation if the run has it, else gold, else none). The signal's per-step batch means are
    smoothed (an exponential moving average) and weighed every `checkpoint_every` steps and at the last; the best
    one's policy is kept in `ppo/best/`, and at the end of the stage it is the one written to `ppo/adapter`."""
    early_stop_patience: Annotated[int, Range(0, 1_000_000)] = 0
    """With `keep_best`: stop the stage once the smoothed signal has not improved for this many weighings in a row
    (each `checkpoint_every` steps). 0: never stop early."""
    lora_r: Annotated[int, LORA_RANK] = 16
    """LoRA rank of the policy adapter (trained on top of sft/merged)."""
    lora_alpha: Annotated[int, Range(1, 4096)] = 32
    """LoRA scaling numerator of the policy adapter (scale = alpha / r)."""
    n_probe_prompts: Annotated[int, FEW] = 3
    """Fixed held-out prompts sampled at every checkpoint (kind `probe`), to watch the policy change."""
    samples_per_prompt: Annotated[int | None, Range(1, 64)] = None
    """Responses sampled per prompt in a rollout batch (None: 1 for PPO, 4 for GRPO and RLOO). GRPO's group size
    G and RLOO's k; both need at least 2. PPO with more than one subtracts from each score the mean score of the
    other responses to its prompt (a leave-one-out baseline, as RLOO): prompts the reward model simply likes
    more stop swamping the signal."""
    rewards: list[RewardComponent] | None = None
    """Score the rollouts with a weighted sum of stated components instead of the reward model alone (PPO, GRPO,
    RLOO; `edgerlhf.rewards`): reference answers from the prompt data, regular expressions, words to use or avoid,
    a target length, repetition, a gold scorer, and the reward model itself as one of them. Each is logged
    (`<algorithm>/rewards/<name>_mean`). The evaluation scores with the same sum."""
    reward_function: str | None = None
    """Score the rollouts with a Python function instead of the reward model (PPO, GRPO, RLOO; the reward stage
    is then not needed): a gold scorer's name (`question`, `you`, `positive`, `concise`: known-answer runs
    against the truth itself) or, from the command line or Python only, `package.module:function` taking
    (prompt, response) and returning a float. Evaluation scores with it too."""
    quantized_policy: bool = False
    """With an int8/int4 reward model: load the one network in that precision and train the policy LoRA on it
    (QLoRA-style), so policy, reference and reward share it; False keeps a bf16 policy plus a quantized reward copy."""
    ensemble_score: str = "mean_minus_std"
    """With `reward.ensemble` >= 2, the reward model's score of a rollout from its k members' scores:
    `mean_minus_std` (their mean minus `ensemble_penalty` times their standard deviation) or `min` (the lowest)."""
    ensemble_penalty: Annotated[float, Range(0, 1000)] = 1.0
    """lambda of `ensemble_score: mean_minus_std`: how much the members' disagreement lowers the score (0: the mean)."""

    def __post_init__(self):
        check_ranges("ppo", self)
        if self.ensemble_score not in ENSEMBLE_SCORES:
            raise ConfigError("ppo.ensemble_score", f"must be one of {list(ENSEMBLE_SCORES)}, got {self.ensemble_score!r}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError("ppo.mini_batch_size", f"must divide batch_size={self.batch_size}")
        if (self.batch_size // self.mini_batch_size) % self.grad_accum:
            raise ConfigError("ppo.grad_accum", f"must divide the {self.batch_size // self.mini_batch_size} "
                                                "minibatches of a rollout batch")
        if self.reward_precision is not None and self.reward_precision not in PRECISIONS:
            raise ConfigError("ppo.reward_precision", f"unknown precision {self.reward_precision!r}")
        if self.keep_best not in KEEP_BEST:
            raise ConfigError("ppo.keep_best", f"must be one of {list(KEEP_BEST)}, got {self.keep_best!r}")


def independent_gold(config: PipelineConfig) -> str | None:
    """The gold scorer that judges the rollouts beside the proxy: the known-answer task's (`data.labels = "gold"`,
    `data.gold_scorer`), unless the rollouts are scored with that gold itself (as `ppo.reward_function` or a stated
    `gold` term), where it is the proxy and says nothing independent."""
    name = config.data.gold_scorer
    if config.data.labels != "gold" or config.ppo.reward_function == name:
        return None
    if any(c.kind == "gold" and c.scorer == name for c in config.ppo.rewards or []):
        return None
    return name


def best_signal(config: PipelineConfig) -> str | None:
    """The signal that picks the best policy (`ppo.keep_best`, `auto` resolved): `validation`, `gold`, or None (none
    asked for, or the one asked for is not in the run, which `PipelineConfig` rejects)."""
    wanted = config.ppo.keep_best
    has = {"validation": config.reward.validation, "gold": independent_gold(config) is not None}
    if wanted == "auto":
        return next((name for name in ("validation", "gold") if has[name]), None)
    return wanted if has.get(wanted) else None


@dataclass
class DPOConfig:
    """Direct Preference Optimization (Rafailov et al. 2023) on the preference pairs, with TRL's `DPOTrainer`: a
    LoRA policy on sft/merged whose reference is the same network with the adapter off."""

    beta: Annotated[float, Range(0, 100, low_open=True)] = 0.1
    """Strength of the implicit KL constraint: the loss is -log sigmoid(beta * (policy - reference log-ratio margin))."""
    loss_type: str = "sigmoid"
    """`sigmoid` (the DPO paper), `ipo` (Azar et al. 2023) or `hinge` (SLiC)."""
    max_steps: Annotated[int, COUNT] = 200
    """Optimizer steps."""
    batch_size: Annotated[int, BATCH] = 8
    """Preference pairs per device step."""
    grad_accum: Annotated[int, BATCH] = 1
    """Gradient accumulation steps."""
    learning_rate: Annotated[float, LEARNING_RATE] = 5e-6
    """Peak learning rate of the policy LoRA."""
    max_length: Annotated[int, TOKENS] = 384
    """Prompt + response tokens per sequence (the prompt is cut from the left, keeping its end)."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input for the backward pass and recompute the rest there (activation
    checkpointing): the same maths, a fraction of the activation memory (`edgerlhf plan` gives both), about a
    third more compute per step."""
    eval_every: Annotated[int, COUNT] = 50
    """Evaluate the held-out preference loss and accuracy every N steps."""
    checkpoint_every: Annotated[int, COUNT] = 50
    """Save the adapter, optimizer and scheduler every N steps so a run can resume (and sample the probe prompts)."""
    lora_r: Annotated[int, LORA_RANK] = 16
    """LoRA rank of the policy adapter (trained on top of sft/merged, on `sft.target_modules`)."""
    lora_alpha: Annotated[int, Range(1, 4096)] = 32
    """LoRA scaling numerator of the policy adapter (scale = alpha / r)."""
    n_probe_prompts: Annotated[int, FEW] = 3
    """Fixed held-out prompts sampled at every checkpoint (kind `probe`, with the `ppo` sampling settings)."""

    def __post_init__(self):
        check_ranges("dpo", self)
        if self.loss_type not in ("sigmoid", "ipo", "hinge"):
            raise ConfigError("dpo.loss_type", f"unknown loss {self.loss_type!r}; choose from sigmoid, ipo, hinge")


@dataclass
class KTOConfig:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024) on answers labelled desirable or undesirable, with TRL's
    `KTOTrainer`: unpaired thumbs up/down (a data set of prompt/completion/label, such as a feedback snapshot), or
    the preference pairs split into their chosen (desirable) and rejected (undesirable) answers. A LoRA policy on
    sft/merged whose reference is the same network with the adapter off."""

    beta: Annotated[float, Range(0, 100, low_open=True)] = 0.1
    """Strength of the implicit KL constraint: the value of an answer is sigmoid(beta * (log-ratio - z)), z the
    batch's estimate of KL(policy || reference)."""
    desirable_weight: Annotated[float, Range(0, 100, low_open=True)] = 1.0
    """Weight of the desirable answers' losses (the paper's lambda_D): with fewer desirable than undesirable answers,
    raise it so that weight x count is 1 to 4/3 times the undesirable side's."""
    undesirable_weight: Annotated[float, Range(0, 100, low_open=True)] = 1.0
    """Weight of the undesirable answers' losses (the paper's lambda_U)."""
    max_steps: Annotated[int, COUNT] = 200
    """Optimizer steps."""
    batch_size: Annotated[int, BATCH] = 8
    """Labelled answers per device step; at least 2, since each answer's KL term is estimated from the batch's other
    answers to its prompt."""
    grad_accum: Annotated[int, BATCH] = 1
    """Gradient accumulation steps."""
    learning_rate: Annotated[float, LEARNING_RATE] = 5e-6
    """Peak learning rate of the policy LoRA."""
    max_length: Annotated[int, TOKENS] = 384
    """Prompt + answer tokens per sequence (the prompt is cut from the left, keeping its end)."""
    gradient_checkpointing: bool = False
    """Keep only each layer's input for the backward pass and recompute the rest there (activation
    checkpointing): the same maths, a fraction of the activation memory, about a third more compute per step."""
    eval_every: Annotated[int, COUNT] = 50
    """Evaluate the held-out KTO loss, KL and implicit rewards every N steps."""
    checkpoint_every: Annotated[int, COUNT] = 50
    """Save the adapter, optimizer and scheduler every N steps so a run can resume (and sample the probe prompts)."""
    lora_r: Annotated[int, LORA_RANK] = 16
    """LoRA rank of the policy adapter (trained on top of sft/merged, on `sft.target_modules`)."""
    lora_alpha: Annotated[int, Range(1, 4096)] = 32
    """LoRA scaling numerator of the policy adapter (scale = alpha / r)."""
    n_probe_prompts: Annotated[int, FEW] = 3
    """Fixed held-out prompts sampled at every checkpoint (kind `probe`, with the `ppo` sampling settings)."""

    def __post_init__(self):
        check_ranges("kto", self)
        if self.batch_size < 2:
            raise ConfigError("kto.batch_size", "KTO estimates its KL term from each answer paired with another "
                                                "prompt of the same batch: needs at least 2 answers per device step, "
                                                f"got {self.batch_size}")


@dataclass
class EvalConfig:
    n_prompts: Annotated[int, Range(1, 100_000)] = 64
    """Held-out prompts to evaluate on."""
    response_length: Annotated[int, Range(1, 8192)] = 64
    """Maximum new tokens per response."""
    n_show: Annotated[int, Range(0, 1000)] = 8
    """Sample pairs (SFT vs PPO) written side by side to the report."""
    samples_per_prompt: Annotated[int, Range(1, 64)] = 1
    """Responses sampled per prompt and policy (more samples narrow the confidence intervals)."""
    n_bootstrap: Annotated[int, Range(1, 100_000)] = 2000
    """Bootstrap resamples for the confidence intervals of the PPO - SFT differences."""
    confidence: Annotated[float, Range(0, 1, low_open=True, high_open=True)] = 0.95
    """Level of the bootstrap confidence intervals."""
    judge: RewardComponent | None = None
    """An LLM judge (`kind: "judge"`, `url`, `model`, as a `judge` reward) asked, for every pair of answers, which is
    better, in both orders to cancel its bias for a position: the report gives the aligned policy's win rate over
    SFT with its interval (`judge_win_rate`). Its rubric takes `{prompt}`, `{first}` (A) and `{second}` (B);
    default `edgerlhf.rewards.PAIRWISE_RUBRIC`."""
    length_strata: Annotated[int, Range(0, 100)] = 0
    """Length strata within which the gold difference at equal length compares the two policies: 0, one per
    token length (a pure length effect cannot leak through); N > 0, N quantile bins of the non-empty lengths
    (narrower intervals when few answers share a length, but a length effect leaks within a bin). Empty
    answers are one more stratum."""

    def __post_init__(self):
        check_ranges("evaluate", self)


@dataclass
class RoundConfig:
    """The next round of RLHF: a run that starts from a finished run's aligned policy instead of the base model
    (`POST /api/jobs/{id}/continue`, the job page's Continue, `edgerlhf pipeline --from-run`)."""

    parent_run: str | None = None
    """The finished run directory this run continues, an absolute path (None: round 1, from `model`). Its aligned
    policy (`ppo/adapter` merged into its `sft/merged` by `edgerlhf.export`'s merge) becomes this run's `sft/merged`:
    the reward model trains on it, the alignment starts from it and the evaluation compares against it. SFT then
    trains nothing, unless the round has demonstrations of its own (`sft_data.source`, or a `data.source` of
    demonstrations): then it fine-tunes the parent's policy on them."""
    number: Annotated[int, Range(1, 1_000_000)] = 1
    """Which round of its chain the run is: 1 from the base model, the parent's number + 1 with `parent_run`."""

    def __post_init__(self):
        check_ranges("round", self)
        if self.parent_run is not None:
            if "\x00" in self.parent_run or not os.path.isabs(self.parent_run):
                raise ConfigError("round.parent_run", f"must be the absolute path of a run directory, got "
                                                      f"{self.parent_run!r} (the command line's --from-run takes a "
                                                      "relative one)")
            if self.number < 2:
                raise ConfigError("round.number", "a run that continues round.parent_run is round 2 or later (the "
                                                  "parent's number + 1)")
        elif self.number != 1:
            raise ConfigError("round.number", f"round {self.number} continues a run: set round.parent_run")


def next_round(parent_run: str | Path, parent: dict[str, Any]) -> dict[str, Any]:
    """The `round` section of a run that continues the run directory `parent_run`, whose config (as stored:
    `PipelineConfig.to_dict()`, or an older one without `round`) is `parent`: that directory, and its number + 1."""
    number = (parent.get("round") or {}).get("number", 1)
    return {"parent_run": str(parent_run), "number": int(number) + 1}


@dataclass
class PipelineConfig:
    preset: str = "distilgpt2-8gb"
    """Name of the preset this configuration started from."""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """Stages to run, a subset of data, sft, reward, ppo, evaluate (always in that order)."""
    seed: Annotated[int, Range(0, 2**32 - 1)] = 0
    """Random seed for the data split, initialisation and sampling."""
    device: str = "auto"
    """`auto` (CUDA when available), `cpu`, `cuda` or `cuda:N`; a device the worker's machine lacks fails the job
    when it is claimed."""
    algorithm: str = "ppo"
    """Alignment algorithm of the `ppo` stage: `ppo`, `grpo` (group-normalised advantages, k3 KL in the loss),
    `rloo` (leave-one-out baseline, KL in the reward), `dpo` (offline on the preference pairs; the reward
    stage is then optional) or `kto` (offline on answers labelled desirable or undesirable: a data set of thumbs, or
    the pairs split; the reward stage optional too). PPO, GRPO and RLOO take their settings from `ppo`, DPO from
    `dpo`, KTO from `kto`."""
    model: ModelConfig = field(default_factory=ModelConfig)
    round: RoundConfig = field(default_factory=RoundConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft_data: SFTDataConfig = field(default_factory=SFTDataConfig)
    prompt_data: PromptDataConfig = field(default_factory=PromptDataConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    evaluate: EvalConfig = field(default_factory=EvalConfig)

    def __post_init__(self):
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ConfigError("stages", f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        if not self.stages:
            raise ConfigError("stages", "must list at least one stage")
        self.stages = [s for s in STAGES if s in self.stages]
        check_ranges("", self)
        if not re.fullmatch(r"auto|cpu|cuda(:\d{1,3})?", self.device):
            raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.algorithm not in ALGORITHMS:
            raise ConfigError("algorithm", f"unknown algorithm {self.algorithm!r}; choose from {list(ALGORITHMS)}")
        traits = algorithm_traits(self.algorithm)
        if self.ppo.samples_per_prompt is None:
            self.ppo.samples_per_prompt = max(1, traits.samples_per_prompt)
        if self.ppo.batch_size % self.ppo.samples_per_prompt:
            raise ConfigError("ppo.samples_per_prompt", f"must divide ppo.batch_size={self.ppo.batch_size}")
        if self.ppo.samples_per_prompt < traits.min_samples_per_prompt:
            raise ConfigError("ppo.samples_per_prompt", f"{self.algorithm} compares several samples of a prompt: "
                                                        f"needs at least {traits.min_samples_per_prompt}")
        if self.ppo.reward_precision is None:
            self.ppo.reward_precision = self.reward.precisions[0]
        if self.ppo.rewards is not None:
            from edgerlhf.rewards import RewardError, check

            if not self.ppo.rewards:
                raise ConfigError("ppo.rewards", "lists no component; leave it out to use the reward model")
            if self.ppo.reward_function is not None:
                raise ConfigError("ppo.rewards", "and ppo.reward_function both say how to score: keep one")
            for i, component in enumerate(self.ppo.rewards):
                check_ranges(f"ppo.rewards[{i}]", component)
                if component.unit not in ("words", "tokens"):
                    raise ConfigError(f"ppo.rewards[{i}].unit", f"must be words or tokens, got {component.unit!r}")
            try:
                check(self.ppo.rewards)
            except RewardError as exc:
                field_, _, message = str(exc).partition(": ")
                raise ConfigError(field_, message) from None
        if self.evaluate.judge is not None:
            from edgerlhf.rewards import PAIRWISE_RUBRIC, RewardError, check_judge

            check_ranges("evaluate.judge", self.evaluate.judge)
            try:
                check_judge(self.evaluate.judge, "evaluate.judge", PAIRWISE_RUBRIC)
            except RewardError as exc:
                field_, _, message = str(exc).partition(": ")
                raise ConfigError(field_, message) from None
        function = self.ppo.reward_function
        if function is not None:
            from edgerlhf.gold import SCORERS, is_import_path

            if function not in SCORERS and not is_import_path(function):
                raise ConfigError("ppo.reward_function", f"must be a gold scorer ({sorted(SCORERS)}) or "
                                                         f"`package.module:function`, got {function!r}")
        uses_reward_model = function is None and (self.ppo.rewards is None
                                                  or any(c.kind == "reward_model" for c in self.ppo.rewards))
        if ("ppo" in self.stages and traits.samples and uses_reward_model
                and self.ppo.reward_precision not in self.reward.precisions):
            raise ConfigError("ppo.reward_precision",
                              f"{self.ppo.reward_precision!r} is not among reward.precisions {self.reward.precisions}")
        if traits.samples and self.ppo.keep_best in ("validation", "gold") and best_signal(self) is None:
            raise ConfigError("ppo.keep_best", "validation needs reward.validation: true" if self.ppo.keep_best ==
                              "validation" else "gold needs the known-answer task (data.labels: gold) with a reward "
                                                "that is not its gold scorer")
        if traits.samples and self.ppo.early_stop_patience and best_signal(self) is None:
            raise ConfigError("ppo.early_stop_patience", "stops on the signal of ppo.keep_best, and this run has "
                                                         "none: set ppo.keep_best (validation or gold)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PipelineConfig:
        """Build and validate a config from plain data (as stored in a job), rejecting unknown fields."""
        return _build(cls, data, prefix="")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(prefix.rstrip(".") or "config", f"must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{prefix}{key}", "unknown field")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    for name, f in known.items():  # a field without a default (a reward component's `kind`) must be given
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{prefix}{name}", "missing: this field has no default")
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, path: str) -> Any:
    """Check `value` against a field's type annotation; nested dataclasses are built recursively."""
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, prefix=f"{path}.")
    origin = typing.get_origin(hint)
    if origin is Annotated:  # the range is checked by the dataclass itself
        return _coerce(typing.get_args(hint)[0], value, path)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(path, f"must be a list, got {type(value).__name__}")
        if len(value) > MAX_LIST_ITEMS:
            raise ConfigError(path, f"lists {len(value):,} items; at most {MAX_LIST_ITEMS}")
        return [_coerce(args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"must be an object, got {type(value).__name__}")
        if len(value) > MAX_LIST_ITEMS:
            raise ConfigError(path, f"holds {len(value):,} entries; at most {MAX_LIST_ITEMS}")
        key_hint, value_hint = args
        return {_coerce(key_hint, k, f"{path}.{k}"): _coerce(value_hint, v, f"{path}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"must be a string, got {value!r}")
        try:  # a lone surrogate ("\ud800" in JSON) is no text: no file, log or UTF-8 response can hold it
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ConfigError(path, "holds a lone surrogate (an unpaired \\ud800-\\udfff escape): not valid "
                                    "Unicode") from None
        return value
    raise TypeError(f"unsupported config type {hint!r} at {path}")


# --- documentation of every field (for the dashboard's form and `/api/config/fields`) --------------


@functools.cache
def _docstrings(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (CleanRL's style), by field name."""
    import ast
    import inspect
    import textwrap

    docs = {}
    for klass in reversed([c for c in cls.__mro__ if dataclasses.is_dataclass(c)]):  # a base's fields first
        body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        for node, following in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) \
                    and isinstance(following.value.value, str):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def field_docs(cls: type = None, prefix: str = "") -> list[dict[str, Any]]:
    """Every leaf field of the pipeline config: dotted path, type, default, help text and range.

    The one source of a field's documentation: the CLI help, the API and the dashboard's form read it here.
    """
    cls = cls or PipelineConfig
    hints = typing.get_type_hints(cls)
    required = any(f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
                   for f in dataclasses.fields(cls))
    defaults = None if required else cls()  # a reward component has no default `kind`: its fields' own defaults
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            out += field_docs(hint, f"{prefix}{f.name}.")
            continue
        bounds = ranges(cls).get(f.name)
        default = (getattr(defaults, f.name) if defaults is not None else f.default
                   if f.default is not dataclasses.MISSING else None)
        out.append({"path": f"{prefix}{f.name}", "type": _type_name(hint), "default": default,
                    "help": _docstrings(cls).get(f.name, ""),
                    "range": None if bounds is None else dataclasses.asdict(bounds)})
        item = _list_item(hint)
        if dataclasses.is_dataclass(item):  # a list of objects (`ppo.rewards`): each item's fields, `ppo.rewards.kind`
            out += field_docs(item, f"{prefix}{f.name}.")
    return out


def _list_item(hint: Any) -> Any:
    """The item type of `list[X]` or `list[X] | None`, else None."""
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is list:
            return typing.get_args(arg)[0]
    return None


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _type_name(args[0]) + " | None"
    if typing.get_origin(hint) is list:
        return f"list[{_type_name(args[0])}]"
    if typing.get_origin(hint) is dict:
        return f"dict[{_type_name(args[0])}, {_type_name(args[1])}]"
    return getattr(hint, "__name__", str(hint))


# --- presets -------------------------------------------------------------------------------------

SHARED_DIR = os.path.abspath(os.environ.get(
    "EDGERLHF_SHARED_DIR", os.path.join(os.path.dirname(__file__), "..", "..", "shared")))
"""Local models and data sets beside the checkout (`../shared`); the hub cannot be reached offline."""
TINY_TOKENIZER_DIR = os.path.join(SHARED_DIR, "models", "gpt2-tokenizer")
"""The GPT-2 BPE tokenizer (the same as distilgpt2's) used by the `tiny` preset."""
HH_PREFS_SAMPLE = os.path.join(SHARED_DIR, "data", "hh-rlhf", "processed", "prefs_sample.jsonl")
"""1,000 HH-RLHF pairs as prompt/chosen/rejected, the `tiny` preset's data."""

PRESETS: dict[str, dict[str, Any]] = {
    # The reference configuration for an 8 GB GPU.
    "distilgpt2-8gb": {
        "model": {"name_or_path": "distilgpt2"},
        # Answers of at most 64 tokens, the length PPO samples within 8 GB: SFT learns to finish within the cap.
        "data": {"max_response_tokens": 64},
        "sft": {"lora_r": 16, "target_modules": ["c_attn", "c_proj"]},
        "reward": {"precisions": ["bf16", "int8", "int4"], "lora_r": 16},
        "ppo": {"batch_size": 32, "mini_batch_size": 2, "response_length": 64, "learning_rate": 1.41e-5,
                "init_kl_coef": 0.1, "top_k": 50, "top_p": 0.95},
    },
    # A ~0.5B chat model in bf16 with LoRA adapters on every linear layer, through its chat template.
    "qwen2.5-0.5b-8gb": {
        "model": {"name_or_path": "Qwen/Qwen2.5-0.5B-Instruct"},
        "data": {"max_response_tokens": 64},  # = ppo.response_length, as distilgpt2-8gb
        "sft": {"lora_r": 16, "batch_size": 4, "grad_accum": 2},
        "reward": {"precisions": ["bf16", "int8", "int4"], "lora_r": 16, "batch_size": 4, "grad_accum": 2},
        "ppo": {"batch_size": 16, "mini_batch_size": 2, "response_length": 64, "learning_rate": 1e-5,
                "init_kl_coef": 0.1, "top_k": 50, "top_p": 0.95},
        # DPO holds chosen + rejected rows with gradients: 8 pairs at once plan 10.8 GiB, 4 x 2 plan 6.2.
        "dpo": {"batch_size": 4, "grad_accum": 2},
        # KTO holds one row per answer with gradients: its default 8 answers at once plan 6.2 GiB.
    },
    # A 1.7B chat model that does not fit in bf16 beside its activations: one 4-bit (NF4) copy of the network
    # carries the SFT LoRA (QLoRA), the reward adapter and the policy adapter; the reference is adapters off.
    "smollm2-1.7b-8gb": {
        "model": {"name_or_path": "HuggingFaceTB/SmolLM2-1.7B-Instruct"},
        "data": {"max_response_tokens": 64},  # = ppo.response_length, as distilgpt2-8gb
        "sft": {"precision": "int4", "lora_r": 16, "batch_size": 2, "grad_accum": 4},
        "reward": {"precisions": ["int4"], "lora_r": 16, "batch_size": 2, "grad_accum": 4},
        "ppo": {"quantized_policy": True, "batch_size": 16, "mini_batch_size": 1, "response_length": 64,
                "learning_rate": 1e-5, "init_kl_coef": 0.1, "top_k": 50, "top_p": 0.95},
        # DPO trains a bf16 network (no 4-bit DPO yet): one pair at a time plans 6.5 GiB.
        "dpo": {"batch_size": 1, "grad_accum": 8},
        # KTO likewise, two answers at a time (its least: the KL term pairs each with another) plan 6.4 GiB.
        "kto": {"batch_size": 2, "grad_accum": 4},
    },
    # A small random GPT-2 on the known-answer task: the whole pipeline in minutes on 2 CPU cores.
    "tiny": {
        "device": "cpu",
        "model": {"name_or_path": "tiny-gpt2", "tokenizer": TINY_TOKENIZER_DIR, "random_init": True,
                  "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 256},
        # Both local HH files (raw harmless-base test + the processed sample): enough short pairs for a
        # held-out set of ~120 known-answer pairs.
        "data": {"source": os.path.join(SHARED_DIR, "data", "hh-rlhf"), "labels": "gold",
                 "max_pairs": 600, "test_fraction": 0.2, "max_prompt_tokens": 128, "max_response_tokens": 48},
        # A random base cannot form words: a short causal-LM warm-up on the training dialogues first.
        "warmup": {"steps": 150, "batch_size": 4, "learning_rate": 3e-3, "eval_every": 50},
        # A LoRA on random weights cannot shape the output alone, so the (untied) LM head trains in full.
        "sft": {"lora_r": 8, "lora_alpha": 16, "target_modules": ["c_attn", "c_proj"], "modules_to_save": ["lm_head"],
                "learning_rate": 2e-3, "max_steps": 150, "batch_size": 8, "max_length": 192, "eval_every": 50,
                "sample_every": 50},
        # The reward LoRA also adapts the token embedding: a random base's hidden states carry no word features
        # for a score head to read (a pretrained model's do), and content golds are about words. 600 steps (10-18
        # passes over the pairs): at 300 a word-counting gold's reward model stayed at 0.62 at one seed of three.
        # `ends` pooling: a 2-layer 64-wide model reads the answer's first word poorly from its last token (a
        # first-word gold's reward models reached 0.73-0.81 with `last`, 1.00 with `ends`).
        "reward": {"precisions": ["bf16", "int8", "int4"], "lora_r": 8, "lora_alpha": 16, "learning_rate": 3e-3,
                   "head_lr_scale": 30.0, "max_steps": 600, "batch_size": 8, "max_length": 192, "eval_every": 150,
                   "adapt_embedding": True, "pooling": "ends"},
        # PPO sized so its gold gain over SFT is significant in about 2 CPU minutes: 8 prompts x 4 samples per
        # step with a leave-one-out baseline (the reward model's offsets between prompts dwarf the differences
        # between answers), whitened scores; 4 samples per held-out prompt narrow the bootstrap interval.
        "ppo": {"steps": 30, "batch_size": 32, "samples_per_prompt": 4, "whiten_rewards": True, "mini_batch_size": 4,
                "ppo_epochs": 2, "learning_rate": 3e-3, "response_length": 48, "sample_every": 5,
                "checkpoint_every": 10},
        # DPO (algorithm=dpo) sized like PPO: a significant gold gain over SFT in about 2 CPU minutes (60 steps of
        # 8 pairs, ~2 passes over the ~260 training pairs); a LoRA on a 64-wide model needs a learning rate as high.
        "dpo": {"max_steps": 60, "batch_size": 8, "learning_rate": 5e-3, "max_length": 192, "eval_every": 20,
                "checkpoint_every": 20, "lora_r": 8, "lora_alpha": 16},
        # KTO (algorithm=kto) sized like DPO: the same steps, batch, learning rate and adapter (on the pairs split,
        # 8 answers a step are 4 pairs' worth). Its gold gain on this preset has not been measured yet.
        "kto": {"max_steps": 60, "batch_size": 8, "learning_rate": 5e-3, "max_length": 192, "eval_every": 20,
                "checkpoint_every": 20, "lora_r": 8, "lora_alpha": 16},
        # 48 tokens: every training answer fits (data.max_response_tokens), so lengths are the policy's own.
        "evaluate": {"n_prompts": 48, "response_length": 48, "n_show": 4, "samples_per_prompt": 4},
    },
}


def preset_dict(name: str) -> dict[str, Any]:
    """The full configuration of a preset as plain data (every field, defaults filled in)."""
    if name not in PRESETS:
        raise ConfigError("preset", f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PipelineConfig.from_dict(merge_overrides({"preset": name}, PRESETS[name])).to_dict()


def load_config(preset: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """A preset with overrides applied, e.g. `load_config("tiny", {"ppo": {"steps": 5}})`."""
    if preset not in PRESETS:
        raise ConfigError("preset", f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    # Merge onto the preset as written (not its resolved form) so derived defaults follow the overrides.
    return PipelineConfig.from_dict(merge_overrides({"preset": preset, **PRESETS[preset]}, overrides or {}))


# --- from the command line -----------------------------------------------------------------------

def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`["ppo.steps=5", "reward.precisions=[\\"bf16\\"]"]` -> nested override dict (JSON values, else text)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(item, "expected KEY=VALUE, e.g. ppo.steps=5")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(key, "conflicts with another --set")
        node[parts[-1]] = value
    return out


def build_config(preset: str | None, config_file: str | None, sets: list[str], stages: str | None) -> PipelineConfig:
    """The run's configuration: preset, then the config file's overrides, then `--set`, then `--stages`."""
    overrides: dict[str, Any] = {}
    if config_file:
        try:
            overrides = json.loads(Path(config_file).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError("--config", f"cannot read {config_file}: {exc}") from exc
        if not isinstance(overrides, dict):
            raise ConfigError("--config", "must hold a JSON object")
    preset = preset or overrides.get("preset") or "tiny"
    overrides = merge_overrides(overrides, parse_overrides(sets))
    if stages:
        overrides["stages"] = [s.strip() for s in stages.split(",") if s.strip()]
    config = load_config(preset, overrides)
    # Relative paths are the person's, relative to where they typed the command; the stages only take
    # absolute paths (anything else is a hub id, see edgerlhf.locations).
    for section, name in LOCATION_FIELDS:
        value = getattr(getattr(config, section), name)
        if value is not None:
            setattr(getattr(config, section), name, absolute_local_paths(value))
    return config


# --- what the service allows ----------------------------------------------------------------------

def service_problems(config: PipelineConfig, roots: list[Path],
                     judge_urls: tuple[str, ...] = ()) -> list[tuple[str, str, str]]:
    """What the service refuses in a config the command line accepts, as (dotted field, kind, message): a local
    path outside `roots` (hub ids are always allowed; `edgerlhf.locations.check_location`), and a reward function
    given as an import path, which would run that module's code on the worker, and a judge at a URL other than
    `judge_urls` (the operator's list and the service's own `/v1`: no request to a host of the job's choosing). The
    backend checks it before it queues a job, and the job process again before it runs one: a config in the
    database is not trusted."""
    from edgerlhf.gold import SCORERS
    from edgerlhf.locations import check_location

    problems = []
    for section, name in LOCATION_FIELDS:
        value = getattr(getattr(config, section), name)
        problem = None if value is None else check_location(value, roots)
        if problem:
            problems.append((f"{section}.{name}", "path", problem))
    allowed = {url.rstrip("/") for url in judge_urls}
    judges = [(f"ppo.rewards[{i}].url", c) for i, c in enumerate(config.ppo.rewards or []) if c.kind == "judge"]
    judges += [("evaluate.judge.url", config.evaluate.judge)] if config.evaluate.judge is not None else []
    for field_, judge in judges:
        if (judge.url or "").rstrip("/") not in allowed:
            problems.append((field_, "config",
                             f"a job's judge may be the service's own /v1 or an endpoint the operator lists "
                             f"(EDGERLHF_JUDGE_URLS: {sorted(allowed) or 'none'}), not {judge.url!r}"))
    function = config.ppo.reward_function
    if function is not None and function not in SCORERS:
        problems.append(("ppo.reward_function", "config",
                         f"a job may name a gold scorer ({sorted(SCORERS)}); a Python import path like {function!r} "
                         "is taken from the command line only"))
    return problems
