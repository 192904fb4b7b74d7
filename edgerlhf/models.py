"""Loading every model the pipeline uses: tokenizer, base LM, SFT/PPO policies and reward models.

One place decides devices, dtypes and quantization, so the stages, the evaluation and the chat endpoint
load models the same way. Precision comes from one factory, `quantization_config` (as in TRL's
`get_quantization_config`): `bf16` loads plain weights, `int8` and `int4` load bitsandbytes LLM.int8()
(Dettmers et al. 2022) and NF4 (QLoRA, Dettmers et al. 2023) weights.

Compute dtype (`compute_dtype`): bf16 on a CUDA GPU that supports it (fp16 otherwise); on the CPU
everything computes in fp32, including the "bf16" precision, because CPU bf16 matmuls are slow or
emulated on most CPUs. Reports say which dtype was used.

Run-directory formats read here (where each lives: `edgerlhf.contract`):

    base/                    only for `model.random_init`: the random base LM + tokenizer
    sft/merged/              base with the SFT LoRA merged in, + tokenizer (save_pretrained)
    ppo/adapter/             a peft LoRA adapter on sft/merged (extra files such as a value head are ignored)
    reward/<precision>/
        adapter/             a peft LoRA adapter (task CAUSAL_LM, LoRA weights only) on sft/merged
        score_head.pt        {"weight": (1, hidden) tensor, "bias": (1,) tensor or None}, normalised so
                             rewards have mean 0, std 1 on the training responses
        reward_model.json    {"precision", "max_length", "compute_dtype", "hidden_size", "pooling", "normalization"}

A reward is read from the final hidden states (after the body's final norm, in every family) of
`PromptFormat.scored(prompt, response)` (HH text `prompt + " " + response`, or the chat template's prompt +
response; no EOS or end of turn: `reward_tokens`), through the linear score head, pooled as the reward
model's `pooling` says: at the last token (the position and value the family's `...ForSequenceClassification`
produces, which is how TRL's RewardTrainer trains it), as the mean over the response's tokens (the score
head being linear, the mean of per-token scores; trained through the same classifier by
`running_response_mean`), their sum (`both`), or the response's first token's plus its last's (`ends`,
trained through `response_first`). Because the reward adapter is a plain causal-LM LoRA, PPO can load it as a second
adapter on its shared `sft/merged` model (`model.load_adapter(dir / "adapter", "reward")`) and score with
`RewardModel`; `encode_for_reward` gives the exact token layout and the response mask.
"""

from __future__ import annotations

import copy
import json
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgerlhf import locations
from edgerlhf.config import PRECISIONS, ModelConfig, PipelineConfig
from edgerlhf.contract import (ALL_LINEAR, CONFIG_FILE, PPO_ADAPTER, RANDOM_BASE, REWARD_POOLINGS, SCORE_BATCH,
                               SFT_MERGED, reward_dir)
from edgerlhf.dialogue import PromptFormat
from edgerlhf.errors import MissingPrerequisite, ModelLoadError, require

CONSTRUCTION_LOCK = threading.RLock()
"""Held around building a model wherever several threads may build one (the backend: chat models, exports).
transformers 5's `from_pretrained` patches process-global state while it builds a model (`PreTrainedModel.tie_weights`,
torch's init functions, `torch.linspace`, the meta device) and puts back what it found on the way out; two builds that
overlap put back each other's patches, so every later load in the process fails ("Cannot copy out of meta tensor")."""

REWARD_ADAPTER_DIR = "adapter"
SCORE_HEAD_FILE = "score_head.pt"
REWARD_META_FILE = "reward_model.json"


# --- devices, dtypes, quantization ---------------------------------------------------------------

def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """`auto` -> the first CUDA device when one is available, else the CPU; `cpu`, `cuda`, `cuda:N` as given."""
    if isinstance(spec, torch.device):
        return spec
    if spec == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {spec!r} was requested but no CUDA device is available; use 'cpu' or 'auto'")
    return device


def compute_dtype(device: torch.device | str) -> torch.dtype:
    """The dtype activations and unquantized weights use on `device` (bf16/fp16 on CUDA, fp32 on the CPU)."""
    device = resolve_device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def quantization_config(precision: str, compute_dtype: torch.dtype = torch.float32):
    """The one precision factory: `None` for bf16, a `BitsAndBytesConfig` for int8 or int4 (NF4)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose from {list(PRECISIONS)}")
    if precision == "bf16":
        return None
    from transformers import BitsAndBytesConfig

    if precision == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                              bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=True)


# --- hub or local ---------------------------------------------------------------------------------

def _load(loader, name: str | Path, what: str, **kwargs):
    """`loader.from_pretrained` of a local directory or a hub id (see `edgerlhf.locations`).

    A `Path` is a directory this code built (a run directory's `sft/merged`); a string comes from a config
    and is local only when absolute, otherwise a hub id that is fetched, never looked up on disk.
    """
    if isinstance(name, Path) or locations.is_local(name):
        path = Path(name).expanduser().resolve()
        if not path.is_dir():
            raise ModelLoadError(f"the {what} path {str(name)!r} is not a directory (expected a saved model/tokenizer)")
        try:
            return loader.from_pretrained(str(path), **kwargs)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"cannot load the {what} from the local directory {path}: {exc}") from exc
    try:
        snapshot = locations.hub_snapshot(name, allow_patterns=locations.MODEL_FILES)
    except locations.LocationError as exc:
        raise ModelLoadError(
            f"cannot load the {what} {exc}. Download it where the hub is reachable (e.g. `hf download {name} "
            f"--local-dir DIR`) and set model.name_or_path (and model.tokenizer) to that absolute local "
            f"directory.") from exc
    try:
        return loader.from_pretrained(str(snapshot), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the {what} {name!r} from its hub snapshot {snapshot}: {exc}") from exc


def load_tokenizer(name_or_path: str | Path, padding_side: str = "right"):
    """A tokenizer with its pad token set to EOS (GPT-2 has none). Right padding by default (training,
    scoring); pass `padding_side="left"` for batched `generate`."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer, name_or_path, "tokenizer")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def _placement(device: torch.device, precision: str) -> dict[str, Any]:
    """from_pretrained kwargs for a device and precision (bitsandbytes models need a device_map)."""
    dtype = compute_dtype(device)
    kwargs: dict[str, Any] = {"dtype": dtype}
    qconfig = quantization_config(precision, dtype)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    return kwargs


def load_causal_lm(name_or_path: str | Path, device: torch.device | str = "cpu", precision: str = "bf16",
                   model_class=None):
    """A causal LM (or `model_class`) from a local dir or hub id, on `device`, in `precision`."""
    from transformers import AutoModelForCausalLM

    device = resolve_device(device)
    loader = model_class or AutoModelForCausalLM
    model = _load(loader, name_or_path, "model", **_placement(device, precision))
    if precision == "bf16":
        model = model.to(device)
    if precision == "int4" and device.type == "cpu":
        _keep_nf4_layout(model)
    return model


def _keep_nf4_layout(model) -> None:
    """Turn off bitsandbytes 0.50's CPU repacking of NF4 weights for its AVX512-BF16 kernel.

    It repacks a layer the first time it runs in eval mode, and the packed layout (a) breaks training
    afterwards (the backward fails: "a view of a leaf Variable ... in-place"), which periodic evaluation
    triggers, and (b) fails outright for layers narrower than the 64-value quantization block.
    """
    from bitsandbytes.nn import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


POSITION_AMPLITUDE = 0.1
"""Amplitude of a random GPT-2's sinusoidal position embeddings (see `random_model`)."""


def random_model(model_cfg: ModelConfig, tokenizer, seed: int = 0):
    """A causal LM of `model.architecture` with random weights, sized by `model_cfg` (tests, tiny preset, benchmarks).

    Built from its transformers config (`edgerlhf.architectures.random_config`), so every family
    transformers has comes out as the model class a checkpoint of that family loads into. Two choices
    differ from the families' own initialisation, both for what the frozen random weights must offer the
    small adapters trained on top of them:
    - the LM head is not tied to the input embeddings (unless `model.tie_word_embeddings`), so SFT can
      train it in full (`sft.modules_to_save=["lm_head"]`) while the rest gets LoRA;
    - GPT-2's learned position embeddings start as the sinusoids of Vaswani et al. (2017) with amplitude
      0.1 (five times GPT-2's init std, so they stand out of the token embeddings' noise) instead of noise:
      their slow dimensions are nearly linear in the position, so "how far into the text" can be read from
      one token's hidden state (a linear probe on the last token of a random model then ranks the
      known-answer pairs by length with ~98 % held-out accuracy, against ~89 % with GPT-2's noise init).
      The other families encode positions by rotation (RoPE) and have nothing to initialise.
    """
    from transformers import AutoModelForCausalLM

    from edgerlhf.architectures import random_config

    config = random_config(model_cfg, len(tokenizer), bos_token_id=tokenizer.eos_token_id if tokenizer.bos_token_id is None else tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    if config.model_type == "gpt2":
        n, d = config.n_positions, config.n_embd
        position = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
        frequency = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)  # (d/2,)
        wpe = torch.zeros(n, d)
        wpe[:, 0::2] = torch.sin(position * frequency)
        wpe[:, 1::2] = torch.cos(position * frequency)[:, : d // 2]
        with torch.no_grad():
            model.transformer.wpe.weight.copy_(wpe * POSITION_AMPLITUDE)
    return model


def load_base_model(model_cfg: ModelConfig, device: torch.device | str = "cpu", precision: str = "bf16",
                    tokenizer=None, seed: int = 0):
    """The base causal LM of a config: a hub id, a local directory, or (random_init) a random model.

    Offline, a hub id that is not cached raises `ModelLoadError` at once, saying how to use a local path.
    A random model is built in fp32 and moved to `device`; it cannot be quantized before it is saved
    (the reward stage quantizes `sft/merged`, which is on disk).
    """
    device = resolve_device(device)
    if model_cfg.random_init:
        if precision != "bf16":
            raise ModelLoadError("a random_init model cannot be loaded quantized; save it and load the directory")
        tokenizer = tokenizer or load_tokenizer(model_cfg.tokenizer or model_cfg.name_or_path)
        return random_model(model_cfg, tokenizer, seed).to(device=device, dtype=compute_dtype(device))
    return load_causal_lm(model_cfg.name_or_path, device, precision)


# --- policies ----------------------------------------------------------------------------------

def upcast_trainable(model) -> None:
    """Keep trainable weights (LoRA, fully trained heads) in fp32, whatever the base model's dtype.

    They are few, and fp32 is what the optimizer should update: a bf16 copy of a head trained in full
    (or a QLoRA adapter, which TRL casts to bf16) loses small updates. On the GPU, autocast still runs
    the matmuls in bf16; on the CPU everything is fp32 anyway, and a bf16 head would meet fp32 activations.
    """
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


CHECKPOINTING_KWARGS = {"use_reentrant": False}
"""torch's non-reentrant checkpointing: it needs no input that requires grad (a LoRA on a frozen body has none)."""


def activation_checkpointing(on: bool) -> dict[str, Any]:
    """The training arguments that turn activation checkpointing on or off (TRL's configs turn it on by default;
    for small models recomputing costs more than it saves, so the stages' `gradient_checkpointing` decides).
    transformers 5.23 (here) renamed it `activation_checkpointing` and warns at the old name; 5.17 (the GPU
    image's) knows only `gradient_checkpointing`."""
    from transformers import TrainingArguments

    name = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    return {name: True, f"{name}_kwargs": CHECKPOINTING_KWARGS} if on else {name: False}


def enable_activation_checkpointing(model) -> None:
    """Activation checkpointing on every layer of `model` (a transformers model, in a peft wrapper or not): each
    layer then runs under `torch.utils.checkpoint` whenever that layer's `training` flag is set."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=CHECKPOINTING_KWARGS)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING_KWARGS)


@contextmanager
def checkpointed_layers(model, on: bool = True):
    """Run a block with activation checkpointing while `model` stays in eval mode (dropout off): only each
    checkpointing layer's own `training` flag is set, which is what starts its checkpoint, not its submodules'
    (`enable_activation_checkpointing` first)."""
    layers = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)] if on else []
    before = [m.training for m in layers]
    for m in layers:
        m.training = True
    try:
        yield
    finally:
        for m, was in zip(layers, before):
            m.training = was


def trainer_arguments(cfg, seed: int, device: torch.device, output_dir: str | Path, **overrides) -> dict[str, Any]:
    """The training arguments the pipeline's TRL trainers share (SFT, reward, DPO), from a stage's config
    (`max_steps`, `batch_size`, `grad_accum`, `learning_rate`, `max_length`, `gradient_checkpointing`,
    `eval_every`); `overrides` are the stage's own (its checkpoints, its loss). Pass them to the stage's
    `SFTConfig`, `RewardConfig` or `DPOConfig`."""
    dtype = compute_dtype(device)
    return {
        "output_dir": str(output_dir),
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.batch_size,
        "per_device_eval_batch_size": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, cfg.max_steps // 20),
        "max_length": cfg.max_length,
        **activation_checkpointing(cfg.gradient_checkpointing),
        "eval_strategy": "steps",
        "eval_steps": cfg.eval_every,
        "logging_steps": max(1, cfg.max_steps // 100),
        "save_strategy": "no",
        "report_to": "none",  # metrics go through the run context
        "disable_tqdm": True,
        "seed": seed,
        "data_seed": seed,
        "use_cpu": device.type == "cpu",
        "bf16": dtype == torch.bfloat16,
        "fp16": dtype == torch.float16,
        "dataloader_num_workers": 0,
    } | overrides


def lora_config(model, r: int, alpha: int, target_modules, dropout: float = 0.0, modules_to_save=None,
                task_type: str = "CAUSAL_LM", embedding: bool = False):
    """The peft `LoraConfig` of every adapter the pipeline trains (LoRA, Hu et al. 2021) on `model`.

    `target_modules` names layers (`["q_proj", "v_proj"]`, GPT-2's `["c_attn", "c_proj"]`) or is
    `["all-linear"]`, which fits every family: each linear (or GPT-2 `Conv1D`) layer of the transformer
    body gets an adapter, the output layer does not. `embedding` adds the token embedding, whatever the
    family calls it (`transformer.wte`, `model.embed_tokens`).

    `fan_in_fan_out` is asked of the model, not of its architecture's name: it is set when the target
    layers store their weight as (in, out), as transformers' `Conv1D` does (GPT-2's projections), rather
    than (out, in) as `nn.Linear`. A bitsandbytes layer that replaced a `Conv1D` counts as one (it keeps
    the class in `source_cls`; peft ignores the flag for it), so an adapter trained on a quantized model
    has the same config as one trained on plain weights and loads onto either.
    """
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists
    from transformers.pytorch_utils import Conv1D

    def is_conv1d(module) -> bool:
        replaced = getattr(module, "source_cls", None)
        return isinstance(module, Conv1D) or isinstance(replaced, type) and issubclass(replaced, Conv1D)

    all_linear = list(target_modules) == [ALL_LINEAR]
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules=ALL_LINEAR if all_linear else list(target_modules),
                        modules_to_save=list(modules_to_save) if modules_to_save else None, task_type=task_type)
    # The layers peft will wrap, matched by peft's own rules.
    if all_linear:
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

        names = _maybe_include_all_linear_layers(copy.deepcopy(config), model).target_modules
        conv1d = {name: is_conv1d(model.get_submodule(name)) for name in names}
    else:
        conv1d = {name: is_conv1d(module) for name, module in model.named_modules()
                  if check_target_module_exists(config, name)}
    if not conv1d:
        raise ValueError(f"LoRA target modules {list(target_modules)} match no layer of this "
                         f"{type(model).__name__}; name its layers (e.g. q_proj, v_proj) or use ['all-linear']")
    if len(set(conv1d.values())) > 1:
        raise ValueError(f"LoRA target modules {list(target_modules)} match both Conv1D and Linear layers "
                         f"(Conv1D: {sorted(n for n, c in conv1d.items() if c)[:3]} ...); target one kind")
    config.fan_in_fan_out = any(conv1d.values())
    if embedding:
        table = model.get_input_embeddings()
        name = next(n for n, module in model.named_modules() if module is table)
        config.target_modules = sorted(conv1d) + [name]  # the layers above by full name, and the embedding
    return config


def read_run_config(run_dir: str | Path) -> PipelineConfig | None:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        return None
    return PipelineConfig.from_dict(json.loads(path.read_text()))


def load_policy(run_dir: str | Path, which: str, device: torch.device | str = "cpu", precision: str = "bf16"):
    """(model, tokenizer) ready for `generate`: `base`, `sft` (sft/merged) or `ppo` (sft/merged + ppo/adapter).

    The tokenizer pads on the left, as batched generation needs. The model is in eval mode.
    """
    run_dir = Path(run_dir)
    device = resolve_device(device)
    if which not in ("base", "sft", "ppo"):
        raise ValueError(f"unknown policy {which!r}; choose base, sft or ppo")
    if which == "base":
        if (run_dir / RANDOM_BASE).is_dir():
            source: str | Path = run_dir / RANDOM_BASE
        else:
            config = read_run_config(run_dir)
            if config is None:
                raise ModelLoadError(f"{run_dir} has neither base/ nor config.json to find the base model")
            if config.model.random_init:
                raise MissingPrerequisite(run_dir / RANDOM_BASE, "sft",
                                          "is missing (the random base model is saved by the sft stage)")
            tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path, padding_side="left")
            return load_base_model(config.model, device, precision, tokenizer).eval(), tokenizer
    else:
        source = require(run_dir / SFT_MERGED, "sft")
    model = load_causal_lm(source, device, precision)
    tokenizer = load_tokenizer(source, padding_side="left")
    if which == "ppo":
        from peft import PeftModel

        adapter = require(run_dir / PPO_ADAPTER, "ppo")
        model = PeftModel.from_pretrained(model, str(adapter))
        if precision == "bf16":
            model = model.merge_and_unload()  # plain weights: merging makes generation as fast as sft's
    return model.eval(), tokenizer


# --- reward models -----------------------------------------------------------------------------

def reward_tokens(tokenizer, prompts: list[str], responses: list[str],
                  max_length: int) -> tuple[list[list[int]], list[int]]:
    """The tokens a reward model reads for each (prompt, response), and where the response begins in them.

    The text is `PromptFormat.scored` (HH text `prompt + " " + response`, or the chat template's prompt +
    response), at most `max_length` tokens of it; a longer text loses its start (the response's end, where a
    last-token reward is read, is kept). The response begins at the first token that reaches into the
    response's characters (a token straddling the boundary counts as the response's); it is at most the last
    token, so an empty response pools its last token.
    """
    fmt = PromptFormat.of(tokenizer)
    texts = [fmt.scored(p, r) for p, r in zip(prompts, responses, strict=True)]
    if tokenizer.is_fast:
        encoded = tokenizer(texts, add_special_tokens=fmt.add_special_tokens, return_offsets_mapping=True)
        rows = encoded["input_ids"]
        starts = []
        for text, response, offsets in zip(texts, responses, encoded["offset_mapping"]):
            first_char = len(text) - len(response)
            starts.append(next((i for i, (_, end) in enumerate(offsets) if end > first_char), len(offsets)))
    else:  # no offsets: the response begins after the tokens of the text without it
        rows = tokenizer(texts, add_special_tokens=fmt.add_special_tokens)["input_ids"]
        heads = tokenizer([t[:len(t) - len(r)] for t, r in zip(texts, responses)],
                          add_special_tokens=fmt.add_special_tokens)["input_ids"]
        starts = [len(h) for h in heads]
    cut = [max(0, len(row) - max_length) for row in rows]
    return ([row[c:] for row, c in zip(rows, cut)],
            [min(max(0, start - c), len(row) - c - 1) for row, start, c in zip(rows, starts, cut)])


def reward_token_ids(tokenizer, prompts: list[str], responses: list[str], max_length: int) -> list[list[int]]:
    """The tokens a reward model reads for each (prompt, response) (`reward_tokens` without the starts)."""
    return reward_tokens(tokenizer, prompts, responses, max_length)[0]


def encode_for_reward(tokenizer, prompts: list[str], responses: list[str], max_length: int,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """`reward_tokens` right-padded into a batch: input_ids, attention_mask and response_mask (1 on the
    response's tokens), each (B, T)."""
    rows, starts = reward_tokens(tokenizer, prompts, responses, max_length)
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, :len(row)] = torch.tensor(row)
        attention_mask[i, :len(row)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "response_mask": response_mask(starts, [len(row) for row in rows], width).to(device)}


def response_mask(starts: list[int], lengths: list[int], width: int) -> torch.Tensor:
    """(B, width) long: 1 from each row's response start to its length (right padding)."""
    positions = torch.arange(width)
    return ((positions >= torch.tensor(starts)[:, None]) & (positions < torch.tensor(lengths)[:, None])).long()


def last_token_hidden(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The hidden state of each row's last real token, with right padding: (B, T, H) -> (B, H)."""
    last = attention_mask.long().sum(dim=1) - 1  # (B,)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def running_response_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """At each position, the mean of `values` over the response's tokens up to it: (B, T, D) -> (B, T, D).

    At a row's last token this is the mean over its whole response: a sequence classifier that reads its
    score there (TRL's RewardTrainer) then trains the `mean` pooling that `RewardModel` applies.
    """
    weights = mask.unsqueeze(-1).to(values.dtype)  # (B, T, 1)
    return (values * weights).cumsum(1) / weights.cumsum(1).clamp(min=1)


def response_first(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """At every position, `values` at the response's first token: (B, T, D) -> (B, T, D).

    Read at a row's last token, this is the first token's score: how a sequence classifier that reads its
    score there (TRL's RewardTrainer) trains the `ends` pooling that `RewardModel` applies.
    """
    first = mask.long().argmax(dim=1)  # (B,) the first 1 of each row
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, first].unsqueeze(1).expand_as(values)


def logit_transform(config) -> tuple[float, float | None]:
    """`(scale, cap)`: what the family's forward does to its LM head's output, logits = cap * tanh(scale * z / cap)
    (without a cap: scale * z). Gemma 2 caps them (`final_logit_softcapping`); Cohere scales them by
    `logit_scale`, Falcon-H1 by `lm_head_multiplier`, Granite divides them by `logits_scaling`. Read as TRL's
    fused LM head reads them (`trl.trainer.utils.add_fused_lm_head`), so a loss computed from the hidden states
    (SFT's, the warm-up's, DPO's CPU head) is the model's own."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = next((v for v in (getattr(text, k, None) for k in ("logit_scale", "output_multiplier",
                                                                "lm_head_multiplier")) if v is not None), None)
    if scale is None and getattr(text, "logits_scaling", None) is not None:
        scale = text.logits_scaling if text.model_type == "hyperclovax" else 1 / text.logits_scaling
    return (1.0 if scale is None else float(scale)), getattr(text, "final_logit_softcapping", None)


def transform_logits(z: torch.Tensor, scale: float, cap: float | None) -> torch.Tensor:
    """The LM head's output `z` as the family's logits (`logit_transform`)."""
    z = z * scale if scale != 1.0 else z
    return torch.tanh(z / cap) * cap if cap else z


def head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits in fp32 from final hidden states (..., H) -> (..., V), as the causal LM's own forward
    computes them: its output layer, then its scale and soft cap (`logit_transform`)."""
    return transform_logits(model.get_output_embeddings()(hidden).float(), *logit_transform(model.config))


def _backbone(model) -> nn.Module:
    """The transformer body (GPT2Model for GPT-2) of a causal LM, inside a peft wrapper if any."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


class RewardModel(nn.Module):
    """A causal LM body (+ reward LoRA) with a linear score head on its final hidden states, pooled as
    `pooling` says (`REWARD_POOLINGS`): the last token's, the mean over the response's tokens, their sum, or
    the response's first token's plus its last's."""

    def __init__(self, model, head: nn.Linear, tokenizer, max_length: int = 384, precision: str = "bf16",
                 device: torch.device | str = "cpu", pooling: str = "last"):
        super().__init__()
        if pooling not in REWARD_POOLINGS:
            raise ValueError(f"unknown reward pooling {pooling!r}; choose from {list(REWARD_POOLINGS)}")
        self.model = model
        self.head = head
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.precision = precision
        self.device = resolve_device(device)
        self.compute_dtype = compute_dtype(self.device)
        self.pooling = pooling

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_mask: torch.Tensor | None = None) -> torch.Tensor:
        body = _backbone(self.model)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        pooled = last_token_hidden(hidden, attention_mask) if self.pooling != "mean" else 0  # (B, H)
        if self.pooling != "last":
            if response_mask is None:
                raise ValueError(f"a {self.pooling}-pooled reward model needs the response_mask "
                                 "(encode_for_reward gives it)")
            spread = response_first if self.pooling == "ends" else running_response_mean
            pooled = pooled + last_token_hidden(spread(hidden, response_mask), attention_mask)
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()  # (B,)

    @torch.no_grad()
    def score(self, prompts: list[str], responses: list[str], batch_size: int = SCORE_BATCH) -> torch.Tensor:
        """Rewards for (prompt, response) pairs: a float32 CPU tensor (N,)."""
        out = []
        for i in range(0, len(prompts), batch_size):
            batch = encode_for_reward(self.tokenizer, prompts[i:i + batch_size], responses[i:i + batch_size],
                                      self.max_length, self.device)
            out.append(self(**batch).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def memory_footprint(self) -> int:
        """Bytes of the weights (body, adapter and score head), as held in memory."""
        head = sum(p.numel() * p.element_size() for p in self.head.parameters())
        return int(self.model.get_memory_footprint()) + head


def load_score_head(path: str | Path, device: torch.device | str = "cpu") -> nn.Linear:
    state = torch.load(path, map_location="cpu", weights_only=True)
    weight = state["weight"]  # (1, H)
    head = nn.Linear(weight.shape[1], 1, bias=state.get("bias") is not None)
    head.load_state_dict({k: v for k, v in state.items() if v is not None})
    return head.to(resolve_device(device)).float()


def load_reward_model(run_dir: str | Path, precision: str = "bf16", device: torch.device | str = "cpu",
                      where: str | None = None) -> RewardModel:
    """The reward model trained in `precision`: sft/merged (quantized as trained) + reward LoRA + score head, from
    `where` in the run directory (default `reward_dir(precision)`; the validation model's is
    `contract.VALIDATION_REWARD`)."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    device = resolve_device(device)
    rm_dir = run_dir / (where or reward_dir(precision))
    if not (rm_dir / SCORE_HEAD_FILE).exists():
        must = f" (reward.precisions must include {precision!r})" if where is None else ""
        raise MissingPrerequisite(rm_dir, "reward", f"holds no reward model{must}")
    meta = json.loads((rm_dir / REWARD_META_FILE).read_text()) if (rm_dir / REWARD_META_FILE).exists() else {}
    base_dir = run_dir / SFT_MERGED
    model = load_causal_lm(base_dir, device, precision)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.data_ptr() != embeddings.weight.data_ptr():
        # A reward model never runs the LM head; an untied one (the random tiny models') would only hold
        # memory and count in the footprint. A tied head is the embedding matrix itself and stays.
        model.set_output_embeddings(None)
    model = PeftModel.from_pretrained(model, str(rm_dir / REWARD_ADAPTER_DIR)).eval()
    tokenizer = load_tokenizer(base_dir)
    head = load_score_head(rm_dir / SCORE_HEAD_FILE, device)
    return RewardModel(model, head, tokenizer, meta.get("max_length", 384), precision, device,
                       meta.get("pooling", "last")).eval()
