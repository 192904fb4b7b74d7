"""Memory planner: the peak memory of every stage of a pipeline config, before anything is loaded.

    edgerlhf plan --preset qwen2.5-0.5b-8gb --gpu-memory 8GiB
    edgerlhf plan --preset tiny --set ppo.mini_batch_size=8 --device cpu --json

"Will it fit on my 8 GB card?" is answered per stage, with the terms that make up each peak, so a person
sees what dominates: LLaMA-Factory answers it with a static table, Unsloth for SFT only; RL needs the
rollout's KV cache, the full-vocabulary logits of the PPO passes and the networks PPO actually holds.
The alignment stage (`ppo`) is planned for `config.algorithm`: PPO, GRPO and RLOO share one sampling loop
(only PPO holds a value head and keeps every layer's hidden states for it), `ppo.reward_function` drops the
reward adapter, its copy and its scoring pass, and DPO and KTO are TRL's trainers on preference pairs (`_dpo`) and
on labelled answers (`_kto`).
Pure arithmetic: the architecture comes from `edgerlhf.architectures.model_config` (a config file, never
weights), and every term below follows what the stage code does, term by term. Figures are checked
against measured peaks of the real stages by `python -m edgerlhf.lab.plan_check` (README, "Will it fit?").

What is counted (bytes; `cb` = bytes of the compute dtype: 2 for bf16 on a GPU, 4 for fp32 on the CPU,
`edgerlhf.models.compute_dtype`):
- weights in their precision: plain (cb per parameter), int8 (LLM.int8(): 1 byte + an fp32 scale per
  output row) or nf4 (QLoRA: half a byte + the double-quantized block constants); embeddings, norms and the
  output layer stay in cb. PPO, GRPO and RLOO hold one network (policy = LoRA, reference = adapters off,
  reward = a second adapter) plus one quantized reward copy when the reward model is int8/int4 without
  `ppo.quantized_policy` (`edgerlhf.align.policy.build_models`), and with `reward.validation` the validation
  reward model as one more frozen adapter and score head on the one network; DPO and KTO one bf16 network,
  policy LoRA and reference; the reward stage one model per precision, plus the validation model
  (`reward/validation`, trained in the alignment network's precision) with `reward.validation`, and the extra
  members of `reward.ensemble` (`reward/ensemble`, one at a time, in the same precision; frozen adapters in the
  alignment stage as the validation one);
- trainable parameters (LoRA on `sft.target_modules`, PPO's value head, the score head, `modules_to_save`): fp32
  weight + fp32 gradient + two fp32 AdamW moments = 16 bytes each; frozen adapters 4 bytes each;
- activations a training micro-batch saves for its backward pass, layer by layer (`_layer_saved`): norm
  inputs, the inputs LoRA needs for its gradient, q/k/v and the attention output, the MLP's intermediate
  tensors, dropout masks; with gradient checkpointing each layer's input, and in a phase of its own after the
  loss one layer recomputed with as much again in its gradients;
- full-vocabulary logits: SFT's labelled positions through log-softmax and back (3 fp32 copies), the
  sampling algorithms' response positions (policy and reference logits, and the gradient tensors of the
  vocabulary in the update), DPO's and KTO's answer positions (the CPU head's log-softmax kept for the backward,
  the reference's beside it, DPO's `chosen_kl` pieces; TRL's tiles on a GPU);
- the generation KV cache of the rollout batch (prompt + response positions, every layer), the reward
  model's scoring pass, one layer's working set of a no-grad pass;
- on a GPU, the CUDA context and the caching allocator's slack, which are not tensors but do run out.

The device kind matters: `device="cpu"` gives the fp32 figures the CPU check measures; `device="cuda"`
those of a bf16 GPU, where the GPU-only details (peft's fp32 copy of each LoRA input, autocast copies)
are counted from the code but have not been measured on a device in this repository yet.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from edgerlhf.config import ConfigError, PipelineConfig, build_config
from edgerlhf.contract import (ALL_LINEAR, EVAL_GEN_BATCH, KL_CHUNK, SCORE_BATCH, algorithm_traits, merge_overrides,
                               network_precision)

MiB = 2**20
GiB = 2**30

CUDA_CONTEXT_BYTES = 450 * MiB
"""The CUDA context, cuBLAS workspace and kernels of one process: memory nvidia-smi counts but torch never allocates."""
ALLOCATOR_SLACK = 0.10
"""Share of the tensor peak the caching allocator holds beyond it (blocks cached, split or fragmented)."""
CHAT_TEMPLATE_TOKENS = 32
"""Tokens a chat template adds around an HH prompt (system turn, role markers), for models that have one."""
JUDGE_RUBRIC_TOKENS = 256
"""Positions a judge's request adds to the prompt and the answer: the rubric's words and the reply (`max_tokens`)."""


# --- the architecture ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Linear:
    """One linear layer of a transformer block: its module name, widths, and which tensor feeds it."""

    name: str
    d_in: int
    d_out: int
    source: str
    """Linears with the same source read the same tensor (q, k and v read the attention norm's output)."""
    bias: bool = False


@dataclass(frozen=True)
class Architecture:
    """What the planner needs of a model, read from its transformers config."""

    family: str
    n_layer: int
    hidden: int
    intermediate: int
    n_head: int
    n_kv_head: int
    head_dim: int
    vocab: int
    n_positions: int
    tied: bool
    attn_dropout: float
    resid_dropout: float
    embd_dropout: float
    activation: str
    n_norms: int
    """Norms per block (each saves its fp32 input for the backward pass)."""
    qk_norm: bool
    eager_attention: bool
    """Attention weights are materialised (softcapping families cannot use sdpa)."""

    @classmethod
    def of(cls, hf) -> Architecture:
        family = hf.model_type
        if family == "gpt2":
            return cls(family, hf.n_layer, hf.n_embd, hf.n_inner or 4 * hf.n_embd, hf.n_head, hf.n_head,
                       hf.n_embd // hf.n_head, hf.vocab_size, hf.n_positions, bool(hf.tie_word_embeddings),
                       hf.attn_pdrop, hf.resid_pdrop, hf.embd_pdrop, hf.activation_function, 2, False, False)
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        return cls(family, hf.num_hidden_layers, hf.hidden_size, hf.intermediate_size, hf.num_attention_heads,
                   hf.num_key_value_heads or hf.num_attention_heads, head_dim, hf.vocab_size,
                   hf.max_position_embeddings, bool(hf.tie_word_embeddings),
                   getattr(hf, "attention_dropout", 0.0) or 0.0, getattr(hf, "resid_pdrop", 0.0) or 0.0,
                   getattr(hf, "embd_pdrop", 0.0) or 0.0, getattr(hf, "hidden_act", "silu"),
                   4 if family in ("gemma2", "gemma3_text") else 2, family in ("qwen3", "gemma3_text"),
                   getattr(hf, "attn_logit_softcapping", None) is not None)

    @property
    def q_dim(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_head * self.head_dim

    def linears(self) -> list[Linear]:
        """The linear layers of one block, as the family names them (what LoRA's target_modules match)."""
        H, I, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        if self.family == "gpt2":
            return [Linear("attn.c_attn", H, 3 * H, "attn_in", True), Linear("attn.c_proj", H, H, "attn_out", True),
                    Linear("mlp.c_fc", H, I, "mlp_in", True), Linear("mlp.c_proj", I, H, "mlp_mid", True)]
        if self.family == "phi3":
            return [Linear("self_attn.qkv_proj", H, q + 2 * kv, "attn_in"), Linear("self_attn.o_proj", q, H, "attn_out"),
                    Linear("mlp.gate_up_proj", H, 2 * I, "mlp_in"), Linear("mlp.down_proj", I, H, "mlp_mid")]
        qkv_bias = self.family == "qwen2"
        return [Linear("self_attn.q_proj", H, q, "attn_in", qkv_bias),
                Linear("self_attn.k_proj", H, kv, "attn_in", qkv_bias),
                Linear("self_attn.v_proj", H, kv, "attn_in", qkv_bias),
                Linear("self_attn.o_proj", q, H, "attn_out"),
                Linear("mlp.gate_proj", H, I, "mlp_in"), Linear("mlp.up_proj", H, I, "mlp_in"),
                Linear("mlp.down_proj", I, H, "mlp_mid")]

    def targeted(self, target_modules: list[str]) -> list[Linear]:
        """The block's linears LoRA adapts: peft's rule (a name, or a dotted suffix of the module's name)."""
        if list(target_modules) == [ALL_LINEAR]:
            return self.linears()
        return [lin for lin in self.linears()
                if any(lin.name == t or lin.name.endswith("." + t) for t in target_modules)]

    def other_params(self) -> int:
        """Parameters outside the blocks' linears that stay in the compute dtype: embeddings, norms, biases."""
        per_norm = 2 * self.hidden if self.family == "gpt2" else self.hidden  # LayerNorm has a bias
        norms = self.n_layer * self.n_norms * per_norm + per_norm
        if self.qk_norm:
            norms += self.n_layer * 2 * self.head_dim
        biases = self.n_layer * sum(lin.d_out for lin in self.linears() if lin.bias)
        positions = self.n_positions * self.hidden if self.family == "gpt2" else 0
        return self.vocab * self.hidden + positions + norms + biases

    def linear_params(self) -> int:
        return self.n_layer * sum(lin.d_in * lin.d_out for lin in self.linears())

    def parameters(self, lm_head: bool = True) -> int:
        head = self.vocab * self.hidden if lm_head and not self.tied else 0
        return self.linear_params() + self.other_params() + head

    def describe(self) -> str:
        return (f"{self.family}, {self.n_layer} layers, hidden {self.hidden}, {self.n_head} heads "
                f"({self.n_kv_head} key/value), MLP {self.intermediate}, vocabulary {self.vocab:,}, "
                f"{self.parameters() / 1e6:,.1f}M parameters")


def architecture(config: PipelineConfig) -> Architecture:
    """The architecture of the model a config loads (no weights: a config file, offline for the presets)."""
    return _architecture(json.dumps(config.to_dict()["model"], sort_keys=True))


@functools.lru_cache(maxsize=64)
def _architecture(model_json: str) -> Architecture:
    from edgerlhf.architectures import model_config
    from edgerlhf.config import ModelConfig

    return Architecture.of(model_config(ModelConfig(**json.loads(model_json))))


# --- bytes of the things held --------------------------------------------------------------------


def linear_weight_bytes(params: int, out_rows: int, precision: str, cb: int) -> float:
    """Bytes of the body's linear weights in `precision` (bitsandbytes layouts)."""
    if precision == "int8":
        return params * 1 + out_rows * 4  # int8 weights + one fp32 scale per output row (SCB)
    if precision == "int4":
        # NF4: two weights a byte; double quantization stores one uint8 absmax per 64-weight block and one
        # fp32 constant per 256 blocks (QLoRA, Dettmers et al. 2023).
        return params / 2 + params / 64 + params / (64 * 256) * 4
    return params * cb


def network_bytes(arch: Architecture, precision: str, cb: int, lm_head: bool = True) -> float:
    """One copy of the network: body linears in `precision`, the rest (embeddings, norms, biases, an untied
    output layer, which bitsandbytes leaves unquantized) in the compute dtype."""
    rows = arch.n_layer * sum(lin.d_out for lin in arch.linears())
    head = arch.vocab * arch.hidden if lm_head and not arch.tied else 0
    return linear_weight_bytes(arch.linear_params(), rows, precision, cb) + (arch.other_params() + head) * cb


def lora_params(arch: Architecture, target_modules: list[str], r: int, embedding: bool = False) -> int:
    """LoRA parameters on the targeted linears of every block, and on the token embedding with `embedding`."""
    on_embedding = r * (arch.vocab + arch.hidden) if embedding else 0
    return arch.n_layer * sum(r * (lin.d_in + lin.d_out) for lin in arch.targeted(target_modules)) + on_embedding


def modules_to_save_params(arch: Architecture, names: list[str]) -> int:
    """Parameters of the modules SFT trains in full (peft keeps the original and a trainable copy)."""
    out = 0
    for name in names:
        if name in ("lm_head", "wte", "embed_tokens", "transformer.wte", "model.embed_tokens"):
            out += arch.vocab * arch.hidden
    return out


TRAINABLE_BYTES = 16
"""fp32 weight, its gradient and the two AdamW moments, per trainable parameter."""
FROZEN_ADAPTER_BYTES = 4
"""A frozen LoRA adapter stays in fp32 (peft's default on a bf16 base; `upcast_trainable`)."""


# --- what a pass over tokens holds -------------------------------------------------------------


@dataclass(frozen=True)
class Pass:
    """How a forward (+ backward) pass runs: the tokens, the mode and the device's dtypes."""

    batch: int
    seq: int
    cb: int
    gpu: bool
    lora: tuple[Linear, ...] = ()
    r: int = 0
    lora_dropout: bool = False
    model_dropout: bool = False
    """Train mode with the model's own dropout on (SFT; TRL's reward trainer and PPO switch it off)."""
    autocast: bool = False
    """The Trainer's bf16 autocast (SFT and reward on a GPU); PPO runs the bf16 model without it."""
    precision: str = "bf16"
    full: bool = False
    """Every weight trains (the warm-up): every linear and norm keeps its input."""

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def _layer_saved(arch: Architecture, p: Pass) -> float:
    """Bytes one transformer block saves for the backward pass of a micro-batch, term by term.

    Frozen base weights need no saved input; what is saved: each norm's input (in fp32: the CPU's own
    dtype, on a GPU the fp32 copy the norm computes in), the input of every LoRA-adapted linear (its A
    matrix's gradient needs it; with LoRA dropout each linear keeps its own dropped copy and the noise; on
    a GPU peft casts each input to the adapter's fp32, one copy per linear, re-cast to bf16 under autocast)
    and the A output (r values), int8 layers' inputs (bitsandbytes keeps them), q/k/v and the attention
    output, the MLP's intermediates (gated: gate, up, act; GPT-2's tanh GELU written in Python: four), and
    the masks of active dropouts. With attention dropout the CPU falls back to the math attention, which
    keeps the attention weights (heads x T per token, three times); on a GPU the fused kernels do not.
    """
    t, cb, H, I = p.tokens, p.cb, arch.hidden, arch.intermediate
    mask = 1 if p.gpu else 4  # a dropout's saved mask: bool on a GPU, the fp32 noise on the CPU
    out = arch.n_norms * H * 4
    if p.full and arch.family != "gpt2":
        out += arch.n_norms * H * cb  # an RMSNorm's trainable weight needs the normalised input
    if arch.qk_norm:
        out += (arch.q_dim + arch.kv_dim) * 4
    # Inputs of the block's linears that the backward pass needs, by the tensor feeding them.
    fused_attention = not (arch.eager_attention or _math_attention(arch, p))
    lora_names = {lin.name for lin in p.lora}
    for source in ("attn_in", "attn_out", "mlp_in", "mlp_mid"):
        group = [lin for lin in arch.linears() if lin.source == source]
        adapted = [lin for lin in group if lin.name in lora_names]
        d_in = group[0].d_in
        if p.lora_dropout:
            out += len(adapted) * d_in * (cb + mask)
        elif p.gpu:
            out += len(adapted) * d_in * (2 if p.autocast else 4)
        # The input itself, once for the group: bitsandbytes' int8 matmul keeps it, and so does LoRA on the
        # CPU without dropout. The fused attention keeps its output anyway (the o_proj input is a view of it).
        keeps_input = p.full or p.precision == "int8" or (adapted and not p.lora_dropout and not p.gpu)
        if keeps_input and not (source == "attn_out" and fused_attention):
            out += d_in * cb
        out += len(adapted) * p.r * 4
    # Attention: q (and k, v) as sdpa keeps them; k and v repeated to every head when a mask is given.
    kv = arch.q_dim if arch.n_kv_head != arch.n_head else arch.kv_dim
    if arch.family == "gpt2":
        qkv = 3 * H  # q, k and v are views of c_attn's output
    else:
        qkv = arch.q_dim + 2 * kv
    out += qkv * cb
    if not fused_attention:
        out += (arch.q_dim + kv) * cb  # the scaled q and k the matmul keeps
        out += arch.n_head * p.seq * (2 * cb + (mask if p.model_dropout and arch.attn_dropout else 0))
    else:
        out += arch.q_dim * cb + arch.n_head * 4  # the output and its log-sum-exp
    # MLP intermediates.
    if arch.family == "gpt2":
        out += (4 if arch.activation == "gelu_new" else 1) * I * cb
    else:
        out += 3 * I * cb
    if p.model_dropout and arch.resid_dropout:
        out += 2 * H * mask
    return t * out


def _math_attention(arch: Architecture, p: Pass) -> bool:
    """The CPU runs attention with dropout through the math path (the weights are materialised)."""
    return p.model_dropout and arch.attn_dropout > 0 and not p.gpu


def train_activations(arch: Architecture, p: Pass, checkpointing: bool = False) -> float:
    """Activations a training micro-batch holds at the start of its backward pass (without the logits); with
    checkpointing each layer's input only (the layer recomputed in the backward is `_recompute_phase`'s)."""
    t = p.tokens
    around = t * arch.hidden * (p.cb + 4)  # the final norm's input and output
    if p.model_dropout and arch.embd_dropout:
        around += t * arch.hidden * (1 if p.gpu else 4)
    around += p.batch * p.seq * p.seq  # the 4-D boolean attention mask of a padded batch
    if checkpointing:
        return around + arch.n_layer * t * arch.hidden * p.cb
    return around + arch.n_layer * _layer_saved(arch, p)


RECOMPUTED = "backward through a recomputed layer"
"""The phase of a checkpointed training step after its loss: one layer recomputed and its gradients."""


def _with_checkpointing(phases: dict[str, list[Item]], activations: Item, held: list[Item], arch: Architecture,
                        p: Pass, on: bool) -> dict[str, float]:
    """A training stage's totals with gradient checkpointing (`StagePlan.checkpointing_peak_bytes`): each phase that
    holds `activations` with every layer's input in their place, and the backward through a recomputed layer
    (`_recompute_phase` of `held`), which joins `phases` when the stage runs checkpointing (`on`)."""
    inputs = train_activations(arch, p, checkpointing=True)
    ckpt = {name: sum(i.bytes for i in items) - activations.bytes + inputs
            for name, items in phases.items() if any(i is activations for i in items)}
    recompute = _recompute_phase(held, arch, p)
    ckpt[RECOMPUTED] = sum(i.bytes for i in recompute)
    if on:
        phases[RECOMPUTED] = recompute
    return ckpt


def _recompute_phase(held: list[Item], arch: Architecture, p: Pass) -> list[Item]:
    """The backward pass through one checkpointed layer: what the step still holds (`held`: weights, trainable
    parameters with their gradients), every layer's input, and that layer's activations recomputed, with as much
    again in their gradients. The logits are gone by then: the loss is a moment of its own."""
    return [*held, _item("activations", train_activations(arch, p, checkpointing=True),
                         f"{p.batch} x {p.seq} tokens, {arch.n_layer} layers, checkpointed: each layer's input"),
            _item("recomputed layer", 2 * _layer_saved(arch, p),
                  "one layer's activations, recomputed in the backward, and their gradients")]


def inference_transient(arch: Architecture, batch: int, seq: int, cb: int) -> float:
    """Peak of a no-grad pass beyond what it returns: one block's working set (the residual stream in and
    out, q/k/v/output or the MLP's intermediates, whichever is larger) and the attention mask."""
    t = batch * seq
    attn = arch.q_dim * 2 + 2 * arch.q_dim + (arch.n_head * seq if arch.eager_attention else 0)
    mlp = 4 * arch.intermediate if arch.family == "gpt2" else 3 * arch.intermediate
    return t * (2 * arch.hidden + max(attn, mlp)) * cb + batch * seq * seq


def kv_cache_bytes(arch: Architecture, rows: int, positions: int, cb: int) -> float:
    """Keys and values of every layer for `rows` sequences of `positions` tokens (transformers' DynamicCache)."""
    return 2 * arch.n_layer * rows * positions * arch.kv_dim * cb


# --- the plan ------------------------------------------------------------------------------------


class Item(BaseModel):
    """One term of a stage's peak."""

    model_config = ConfigDict(extra="forbid")

    name: str
    bytes: int
    note: str = ""


class Suggestion(BaseModel):
    """The cheapest change found that makes a stage fit."""

    model_config = ConfigDict(extra="forbid")

    change: str
    """What to change, in words."""
    overrides: dict[str, Any]
    """The config overrides that make it (empty when it is not a config option yet)."""
    peak_bytes: int
    """The stage's planned peak (device total) with the change."""


class StagePlan(BaseModel):
    """The planned peak of one stage (reward: of one precision)."""

    model_config = ConfigDict(extra="forbid")

    stage: str
    """`sft`, `reward/bf16` (`/int8`, `/int4`, `/validation`: `reward.validation`'s model, `/ensemble`: each extra
    member of `reward.ensemble` in turn), `ppo` or `evaluate`."""
    phase: str
    """The part of the stage where the peak is (e.g. `training step`, `rollout generation`)."""
    items: list[Item]
    """What the peak is made of, largest first (what is held for the whole stage and the peak phase's terms)."""
    tensor_bytes: int
    """Bytes of tensors at the peak (what torch's allocator counts: `torch.cuda.max_memory_allocated`)."""
    peak_bytes: int
    """Device memory needed: the tensor peak plus, on a GPU, the CUDA context and the allocator's slack."""
    phases: dict[str, int]
    """The tensor peak of each part of the stage."""
    checkpointing_peak_bytes: int | None = None
    """The device total with gradient checkpointing (training stages; `peak_bytes` itself where the stage's
    `gradient_checkpointing` is on)."""
    fits: bool | None = None
    """None when no GPU memory was given or the device is the CPU."""
    suggestion: Suggestion | None = None


class MemoryPlan(BaseModel):
    """The planner's answer for one configuration (the CLI's table, `POST /api/plan`)."""

    model_config = ConfigDict(extra="forbid")

    preset: str
    device: str
    """`cuda` (bf16 compute) or `cpu` (fp32 compute)."""
    compute_dtype: str
    model: str
    """The architecture, in words."""
    gpu_memory_bytes: int | None
    fits: bool | None
    """Every stage fits; None when not checked (no GPU memory given, or a CPU job)."""
    note: str
    stages: list[StagePlan]


def plan(config: PipelineConfig, gpu_memory_bytes: int | None = None, device: str = "cuda",
         suggest: bool = True, served: dict[str, PipelineConfig] | None = None) -> MemoryPlan:
    """The planned peak of each stage of `config` on `device` (`cuda` or `cpu`), checked against a GPU's memory.

    `served`: the judges of `config` that the service's own `/v1` serves on the same GPU (a judge component's
    `model`, `job-7/ppo`, -> that job's config); their weights, KV cache and CUDA context count in the stages
    that ask them (`served_judge_items`)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
    arch = architecture(config)
    gpu = device == "cuda"
    stages = [_stage_plan(config, arch, stage, gpu, served or {}) for stage in _stage_names(config)]
    checked = gpu and gpu_memory_bytes is not None
    for s in stages:
        if checked:
            s.fits = s.peak_bytes <= gpu_memory_bytes
            if not s.fits and suggest:
                s.suggestion = suggestion(config, s.stage, gpu_memory_bytes, served)
    if not gpu:
        note = "CPU figures: fp32 tensors, no CUDA context; a job on the CPU is never refused for memory."
    elif gpu_memory_bytes is None:
        note = "No GPU memory given: figures only, nothing checked."
    else:
        note = (f"Checked against {gpu_memory_bytes / GiB:.2f} GiB, counting the CUDA context "
                f"({CUDA_CONTEXT_BYTES / GiB:.2f} GiB) and {ALLOCATOR_SLACK:.0%} allocator slack.")
    return MemoryPlan(preset=config.preset, device=device, compute_dtype="bfloat16" if gpu else "float32",
                      model=arch.describe(), gpu_memory_bytes=gpu_memory_bytes,
                      fits=all(s.fits for s in stages) if checked else None, note=note, stages=stages)


def _stage_names(config: PipelineConfig) -> list[str]:
    names = []
    for stage in config.stages:
        if stage == "reward":
            names += [f"reward/{p}" for p in config.reward.precisions]
            names += ["reward/validation"] if config.reward.validation else []
            names += ["reward/ensemble"] if config.reward.ensemble > 1 else []  # each member in turn, one at a time
        elif stage != "data":
            names.append(stage)
    return names


def judges_asked(config: PipelineConfig, stage: str) -> list:
    """The judge components (`RewardComponent`, kind judge) a stage asks: the alignment's stated rewards; in the
    evaluation those (both policies are scored with them) and `evaluate.judge`."""
    stated = [c for c in config.ppo.rewards or [] if c.kind == "judge"]
    if stage == "ppo" and algorithm_traits(config.algorithm).samples:
        return stated
    if stage == "evaluate":
        return stated + ([config.evaluate.judge] if config.evaluate.judge is not None else [])
    return []


def served_judge_items(config: PipelineConfig, stage: str, served: dict[str, PipelineConfig], gpu: bool) -> list[Item]:
    """What the judges a stage asks hold on the same GPU while it runs, when the service serves them (its `/v1`
    loads a finished job's merged model in bf16 in the backend process): the weights, a KV cache for
    `concurrency` requests of a rubric with the prompt and the answer, and that process's CUDA context."""
    items = []
    for judge in {c.model: c for c in judges_asked(config, stage) if c.model in served}.values():
        judged = served[judge.model]
        arch = architecture(judged)
        cb = 2 if gpu else 4
        prompt, _ = _lengths(config, arch)
        positions = prompt + max(config.ppo.response_length, config.evaluate.response_length) + JUDGE_RUBRIC_TOKENS
        items += [_weights_item(arch, "bf16", cb, f"judge {judge.model} (served by the backend)"),
                  _item(f"judge {judge.model} KV cache", kv_cache_bytes(arch, judge.concurrency, positions, cb),
                        f"{judge.concurrency} requests x {positions} positions (rubric, prompt, answer, reply)")]
        if gpu:
            items.append(_item(f"judge {judge.model} CUDA context", CUDA_CONTEXT_BYTES, "the backend's own process"))
    return items


def _stage_plan(config: PipelineConfig, arch: Architecture, stage: str, gpu: bool,
                served: dict[str, PipelineConfig] | None = None) -> StagePlan:
    cb = 2 if gpu else 4
    if stage == "sft":
        phases, ckpt = _sft(config, arch, cb, gpu)
    elif stage.startswith("reward/"):
        precision = stage.removeprefix("reward/")
        if precision in ("validation", "ensemble"):  # trained in the precision of the alignment stage's network
            precision = network_precision(config.ppo.reward_precision, config.ppo.quantized_policy)
        phases, ckpt = _reward(config, arch, precision, cb, gpu)
    elif stage == "ppo":
        phases, ckpt = _alignment(config, arch, cb, gpu)
    elif stage == "evaluate":
        phases, ckpt = _sampling(config, arch, cb, gpu, training=False)
    else:
        raise ValueError(f"no memory plan for stage {stage!r}")
    judges = served_judge_items(config, stage, served or {}, gpu)  # held beside every phase of the stage
    phases = {name: [*items, *judges] for name, items in phases.items()}
    totals = {name: sum(i.bytes for i in items) for name, items in phases.items()}
    phase = max(totals, key=totals.get)
    tensor = totals[phase]
    items = list(phases[phase])
    if gpu:
        items += [Item(name="CUDA context", bytes=CUDA_CONTEXT_BYTES, note="not a tensor; nvidia-smi counts it"),
                  Item(name="allocator slack", bytes=int(ALLOCATOR_SLACK * tensor),
                       note=f"{ALLOCATOR_SLACK:.0%} of the tensor peak")]
    ckpt_total = None
    if ckpt is not None:  # {phase name: its total with checkpointing} for the phases that hold activations
        ckpt_total = _device_total(max({**totals, **ckpt}.values()), gpu)
    return StagePlan(stage=stage, phase=phase, items=sorted(items, key=lambda i: -i.bytes), tensor_bytes=int(tensor),
                     peak_bytes=_device_total(tensor, gpu), phases={k: int(v) for k, v in totals.items()},
                     checkpointing_peak_bytes=ckpt_total)


def _device_total(tensor_bytes: float, gpu: bool) -> int:
    return int(tensor_bytes * (1 + ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES) if gpu else int(tensor_bytes)


def _item(name: str, value: float, note: str = "") -> Item:
    return Item(name=name, bytes=int(value), note=note)


def _template_tokens(config: PipelineConfig, arch: Architecture) -> int:
    """Tokens a chat template adds to a prompt: none for GPT-2-family and random models (HH text)."""
    return 0 if config.model.random_init or arch.family == "gpt2" else CHAT_TEMPLATE_TOKENS


def _lengths(config: PipelineConfig, arch: Architecture) -> tuple[int, int]:
    """(prompt tokens, answer tokens): the data stage's budgets, the template's additions and the answer's end."""
    extra = _template_tokens(config, arch)
    prompt = config.data.max_prompt_tokens + extra
    answer = config.data.max_response_tokens + (2 if extra else 1)  # + EOS, or the end of turn
    return prompt, answer


def _weights_item(arch: Architecture, precision: str, cb: int, what: str, lm_head: bool = True) -> Item:
    labels = {"bf16": "bf16" if cb == 2 else "fp32 (the CPU's bf16)", "int8": "int8 (LLM.int8)",
              "int4": "nf4 + quantization constants"}
    n = arch.parameters(lm_head)
    return _item(f"{what} weights, {labels[precision]}", network_bytes(arch, precision, cb, lm_head),
                 f"{n / 1e6:,.1f}M parameters")


def _trainable_item(name: str, params: int) -> Item:
    return _item(name, params * TRAINABLE_BYTES, f"{params:,} parameters x (fp32 weight + gradient + 2 AdamW moments)")


def _adam_step(largest: int, total: int, gpu: bool, bytes_per: int = 4) -> Item:
    """torch.optim.AdamW's temporaries (PPO, the reward stage, the warm-up; the SFT Trainer's fused AdamW has
    none): the CPU updates one tensor at a time (two temporaries of the largest), the GPU all at once
    (`foreach`: one temporary of every trainable tensor)."""
    value = total * bytes_per if gpu else 2 * largest * bytes_per
    return _item("optimizer step temporaries", value, "AdamW's sqrt / division of the second moments")


def _sft(config: PipelineConfig, arch: Architecture, cb: int, gpu: bool):
    """The SFT stage: a random base's warm-up (every parameter trained), a quantized reload for QLoRA, the
    LoRA training steps and the probes (`edgerlhf.sft.run`)."""
    cfg = config.sft
    prompt, answer = _lengths(config, arch)
    seq = min(cfg.max_length, prompt + answer)
    labelled = min(answer, seq - 1) if cfg.completion_only_loss else seq - 1
    lora = tuple(arch.targeted(cfg.target_modules))
    n_lora = lora_params(arch, cfg.target_modules, cfg.lora_r)
    n_saved = modules_to_save_params(arch, cfg.modules_to_save)
    plain = _weights_item(arch, "bf16", cb, "base")
    weights = _weights_item(arch, cfg.precision, cb, "base")
    trainable = [_trainable_item(f"LoRA r={cfg.lora_r} on {len(lora)} linears per block", n_lora)]
    if n_saved:
        trainable.append(_item(f"modules_to_save {cfg.modules_to_save}: trainable copy", n_saved * TRAINABLE_BYTES,
                               f"{n_saved:,} parameters trained in full, beside the frozen original"))
    p = Pass(cfg.batch_size, seq, cb, gpu, lora, cfg.lora_r, cfg.lora_dropout > 0, model_dropout=True,
             autocast=gpu, precision=cfg.precision)
    activations = _item("activations", train_activations(arch, p, cfg.gradient_checkpointing),
                        f"{cfg.batch_size} x {seq} tokens, {arch.n_layer} layers, {_saved(cfg)}")
    step = [weights, *_without_gradients(trainable, cfg.grad_accum), activations,
            *_loss_moment(cfg.batch_size * labelled, arch, (n_lora + n_saved) * 4, cfg.grad_accum),
            *_dequantized(arch, cfg.precision, cb)]
    phases = {
        "training step": step,
        # The Trainer's default AdamW is torch's fused kernel: no temporaries.
        "optimizer step": [weights, *trainable],
        "probe generation": [weights, *trainable, *_generation(arch, max(cfg.n_sample_prompts, 1), prompt,
                                                               config.ppo.response_length, cb)],
    }
    if cfg.precision != "bf16":  # loaded quantized (a random base: once its saved bf16 copy is freed)
        phases["quantized load"] = [weights, *_loading(arch, cb, gpu)]
    if config.model.random_init and config.warmup.steps:
        phases.update(_warm_up(config, arch, plain, prompt, answer, cb, gpu))
    ckpt = _with_checkpointing(phases, activations, [weights, *trainable, *_dequantized(arch, cfg.precision, cb)],
                               arch, p, cfg.gradient_checkpointing)
    return phases, ckpt


def _saved(cfg) -> str:
    """How a stage's activations are kept for the backward (its `gradient_checkpointing`)."""
    if cfg.gradient_checkpointing:
        return f"checkpointed: each layer's input (one layer recomputed: \"{RECOMPUTED}\")"
    return "saved for backward"


def _without_gradients(trainable: list[Item], grad_accum: int) -> list[Item]:
    """The trainable parameters as the backward pass begins: no gradients yet unless they accumulate
    (the optimizer step sets them to None); counted apart in `_loss_moment`."""
    if grad_accum > 1:
        return trainable
    return [_item(i.name + " (without gradients)", i.bytes * 12 / TRAINABLE_BYTES, "fp32 weight + 2 AdamW moments")
            for i in trainable]


def _loss_moment(tokens: int, arch: Architecture, grad_bytes: float, grad_accum: int) -> list[Item]:
    """The logits at the peak of a next-token loss's backward pass: log-softmax's output and two gradients
    (3 fp32 (tokens, V) tensors), or a moment later, when the output layer's backward has made the
    gradients of the trainable parameters (a head trained in full: a vocabulary-sized one), one fewer."""
    one = tokens * arch.vocab * 4
    if grad_accum > 1 or grad_bytes <= one:
        return [_item("logits + log-softmax", 3 * one, f"{tokens} positions x {arch.vocab:,} vocabulary, fp32, 3 copies")]
    return [_item("logits + log-softmax", 2 * one, f"{tokens} positions x {arch.vocab:,} vocabulary, fp32, 2 copies"),
            _item("gradients of the trainable parameters", grad_bytes, "made by the output layer's backward")]


def _warm_up(config: PipelineConfig, arch: Architecture, weights: Item, prompt: int, answer: int, cb: int, gpu: bool):
    """`edgerlhf.warmup`: every parameter of a random base trained as a causal LM (no LoRA, no autocast):
    gradients and AdamW moments in the weights' dtype, a loss on every position."""
    cfg = config.warmup
    seq = min(cfg.max_length, prompt + answer)
    n = arch.parameters()
    moments = _item("AdamW moments (every parameter)", 2 * n * cb, f"{n / 1e6:,.1f}M parameters x 2")
    grads = _item("gradients (every parameter)", n * cb, f"{n / 1e6:,.1f}M parameters")
    p = Pass(cfg.batch_size, seq, cb, gpu, model_dropout=True, full=True)
    tokens = cfg.batch_size * (seq - 1)
    return {
        "warm-up step": [weights, moments,
                         _item("activations", train_activations(arch, p), f"{cfg.batch_size} x {seq} tokens, "
                               f"{arch.n_layer} layers, every weight trained"),
                         *_loss_moment(tokens, arch, 0, 1)],
        "warm-up optimizer step": [weights, moments, grads, _adam_step(arch.vocab * arch.hidden, n, gpu, cb)],
    }


def _loading(arch: Architecture, cb: int, gpu: bool) -> list[Item]:
    """Loading a quantized model: one tensor is held twice while it is converted (on the CPU the
    checkpoint's own copy, the embedding; on a GPU the bf16 weight of a linear before it is quantized)."""
    biggest = max(lin.d_in * lin.d_out for lin in arch.linears()) if gpu else arch.vocab * arch.hidden
    return [_item("tensor being loaded", biggest * cb, "one weight held twice while it is converted")]


def _dequantized(arch: Architecture, precision: str, cb: int) -> list[Item]:
    """bitsandbytes dequantizes one layer's weight to the compute dtype for each matmul (CPU; GPU backward)."""
    if precision == "bf16":
        return []
    biggest = max(lin.d_in * lin.d_out for lin in arch.linears())
    return [_item("dequantized layer weight", biggest * cb, "one linear's weight, transient")]


def _reward(config: PipelineConfig, arch: Architecture, precision: str, cb: int, gpu: bool):
    """One precision of the reward stage: the Bradley-Terry training steps (chosen and rejected in one
    batch, TRL's dropout off), its periodic evaluation, then the reloaded model scoring held-out pairs."""
    cfg = config.reward
    prompt, answer = _lengths(config, arch)
    seq = min(cfg.max_length, prompt + answer - 1)  # scored: prompt + response, no end token
    lora = tuple(arch.targeted(config.sft.target_modules))
    n_lora = lora_params(arch, config.sft.target_modules, cfg.lora_r, cfg.adapt_embedding)
    # A sequence classifier: no output layer (an untied one is not loaded), a score head instead.
    weights = _weights_item(arch, precision, cb, "base (sequence classifier)", lm_head=False)
    trainable = _trainable_item(f"LoRA r={cfg.lora_r} + score head", n_lora + arch.hidden)
    p = Pass(2 * cfg.batch_size, seq, cb, gpu, lora, cfg.lora_r, autocast=gpu, precision=precision)
    step = [_item("activations", train_activations(arch, p, cfg.gradient_checkpointing),
                  f"{cfg.batch_size} pairs = {2 * cfg.batch_size} x {seq} tokens, {arch.n_layer} layers, "
                  f"{_saved(cfg)}")]
    step += _dequantized(arch, precision, cb)
    largest = max((cfg.lora_r * lin.d_in for lin in lora), default=0)
    phases = {
        "training step": [weights, trainable, *step],
        "optimizer step": [weights, trainable, _adam_step(largest, n_lora, gpu)],
        "evaluation": [weights, trainable, _no_grad_pass(arch, 4 * cfg.batch_size, seq, cb, "evaluation pass")],
        # After training the model is reloaded alone (no optimizer) to normalise and score.
        "held-out scoring": [weights, _item("reward LoRA (frozen)", n_lora * FROZEN_ADAPTER_BYTES),
                             _no_grad_pass(arch, SCORE_BATCH, seq, cb, "scoring pass")],
    }
    if precision != "bf16":
        phases["quantized load"] = [weights, *_loading(arch, cb, gpu)]
    ckpt = _with_checkpointing(phases, step[0], [weights, trainable, *_dequantized(arch, precision, cb)], arch, p,
                               cfg.gradient_checkpointing)
    return phases, ckpt


def _no_grad_pass(arch: Architecture, batch: int, seq: int, cb: int, name: str) -> Item:
    """A body pass without gradients that returns the last hidden states (a reward model's)."""
    return _item(name, inference_transient(arch, batch, seq, cb) + batch * seq * arch.hidden * cb,
                 f"{batch} x {seq} tokens without gradients")


def _generation(arch: Architecture, rows: int, prompt: int, response: int, cb: int, label: str = "") -> list[Item]:
    """`generate`: the KV cache of every row, the prompt pass's working set, each step's fp32 logits."""
    positions = prompt + response
    return [_item("KV cache", kv_cache_bytes(arch, rows, positions, cb),
                  f"{rows} rows x {positions} positions x {arch.n_layer} layers{label}"),
            _item("prompt pass", inference_transient(arch, rows, prompt, cb), f"{rows} x {prompt} tokens, one layer"),
            _item("sampling logits", 5 * rows * arch.vocab * 4, "last position, fp32: scaled, masked, softmax")]


def _alignment(config: PipelineConfig, arch: Architecture, cb: int, gpu: bool):
    """The alignment stage (`ppo` in STAGES) of `config.algorithm`: DPO's or KTO's trainer (`OFFLINE`), or the
    sampling loop that PPO, GRPO and RLOO share (`edgerlhf.align.loop`)."""
    if not algorithm_traits(config.algorithm).samples:
        return OFFLINE[config.algorithm](config, arch, cb, gpu)
    return _sampling(config, arch, cb, gpu, training=True)


def _reward_model(config: PipelineConfig, training: bool) -> str | None:
    """How the rollouts are scored, as `align.policy.build_models` loads it: `shared` (the reward adapter on the one
    network), `copy` (a separate int8/int4 network) or None (`ppo.reward_function`'s Python scorer; an evaluation
    of DPO or KTO without a reward stage in `config.stages`, which `evaluate.has_reward_model` finds no model for)."""
    cfg = config.ppo
    if cfg.reward_function is not None:
        return None
    if not training and not algorithm_traits(config.algorithm).samples and "reward" not in config.stages:
        return None
    return "shared" if cfg.reward_precision == "bf16" or cfg.quantized_policy else "copy"


def _sampling(config: PipelineConfig, arch: Architecture, cb: int, gpu: bool, training: bool):
    """PPO, GRPO or RLOO (`training`), or the evaluation: one network with adapters, and the passes of a step
    (`ppo.ppo_step`, `grpo.grpo_step`, `rloo.rloo_step`: the same rollouts, log-prob passes and minibatch
    updates; evaluation: `evaluate.sample_policy`, whose KL pass keeps the previous batch's logits alive).
    Only PPO has a value head, and only its passes ask for every layer's hidden states; a reward function
    replaces the reward adapter, its copy and its scoring pass."""
    cfg = config.ppo
    name = algorithm_traits(config.algorithm).label
    value_head = algorithm_traits(config.algorithm).value_head  # `build_models`' default, in training and evaluation
    reward = _reward_model(config, training)
    precision = cfg.reward_precision
    net_precision = network_precision(precision, cfg.quantized_policy)  # bf16 unless the network itself is quantized
    prompt, _ = _lengths(config, arch)
    response = cfg.response_length if training else config.evaluate.response_length
    n_policy = lora_params(arch, config.sft.target_modules, cfg.lora_r)
    n_reward = lora_params(arch, config.sft.target_modules, config.reward.lora_r, config.reward.adapt_embedding)
    held = [_weights_item(arch, net_precision, cb,
                          "network (policy, reference" + (", reward)" if reward == "shared" else ")"))]
    if training:
        n_trainable = n_policy + (arch.hidden + 1 if value_head else 0)
        held.append(_trainable_item(f"{name} policy LoRA r={cfg.lora_r}" + (" + value head" if value_head else ""),
                                    n_trainable))
    else:
        held.append(_item("policy LoRA (frozen)", n_policy * FROZEN_ADAPTER_BYTES))
    if reward is not None:
        held.append(_item("reward LoRA (frozen)", n_reward * FROZEN_ADAPTER_BYTES))
    if reward == "copy":
        held.append(_weights_item(arch, precision, cb, "reward copy", lm_head=False))
    validation = training and config.reward.validation  # `build_models(validation=...)`: the loop's only
    if validation:
        held.append(_item("validation LoRA + score head (frozen)", (n_reward + arch.hidden + 1) * FROZEN_ADAPTER_BYTES,
                          "reward.validation: one more adapter on the one network"))
    members = config.reward.ensemble - 1 if training and reward is not None else 0  # `build_models(ensemble=...)`
    if members:
        held.append(_item(f"{members} ensemble LoRA{'s' if members > 1 else ''} + score heads (frozen)",
                          members * (n_reward + arch.hidden + 1) * FROZEN_ADAPTER_BYTES,
                          "reward.ensemble: one more adapter per extra member on the one network"))
    rows = cfg.batch_size if training else min(EVAL_GEN_BATCH, config.evaluate.n_prompts * config.evaluate.samples_per_prompt)
    m = cfg.mini_batch_size
    seq = prompt + response
    reward_seq = min(config.reward.max_length, seq)
    n_vocab = m * response * arch.vocab  # one (M, T, V) tensor's entries
    # The evaluation's KL loop keeps the previous batch's scaled logits in its variables until the new
    # ones replace them (the training loop deletes them).
    previous = 2 if not training and rows > m else 0
    pass_note = f"{m} x {response} response positions x {arch.vocab:,} vocabulary"
    # PPO's pass keeps every layer's output (for the value head) beside its logits; GRPO's and RLOO's do not.
    hidden_states = ([_item("hidden states", (arch.n_layer + 1) * m * seq * arch.hidden * cb,
                            "every layer's output (output_hidden_states, for the value head)")] if value_head else [])
    label = "" if training else f" (evaluation batches of {EVAL_GEN_BATCH})"
    phases = {"rollout generation": [*held, *_generation(arch, rows, prompt, response, cb, label)]}
    if reward is not None:  # a reward function scores the texts in Python: no pass on the device
        phases["reward scoring"] = [*held, _no_grad_pass(arch, min(rows, SCORE_BATCH), reward_seq, cb, "reward pass")]
    if validation:  # the same rollouts through the validation adapter, after the step
        phases["validation scoring"] = [*held, _no_grad_pass(arch, min(rows, SCORE_BATCH), reward_seq, cb,
                                                             "validation pass")]
    phases |= {
        "policy log-probs": [
            *held, _item("previous batch's logits", previous * n_vocab * 4, "policy and reference, scaled fp32"),
            _item("policy logits", _pass_logits(m, response, arch.vocab, cb), f"{pass_note}: raw + scaled fp32"),
            *hidden_states, _item("layer working set", inference_transient(arch, m, seq, cb), f"{m} x {seq} tokens")],
        "reference log-probs": [
            *held, _item("previous batch's logits", previous / 2 * n_vocab * 4, "reference, scaled fp32"),
            _item("policy logits", n_vocab * 4, f"{pass_note}: scaled fp32"),
            _item("reference logits", _pass_logits(m, response, arch.vocab, cb), f"{pass_note}: raw + scaled fp32"),
            _item("layer working set", inference_transient(arch, m, seq, cb), f"{m} x {seq} tokens")],
        "log-prob maths": [
            *held, _item("policy + reference logits", 2 * n_vocab * 4, f"{pass_note}: scaled fp32"),
            _item("sampling support", n_vocab * _full_vocabulary_extra(cfg, update=False, whole=False),
                  "top-k sized; without top-k: a sort, or softmax + logsumexp over the vocabulary"),
            _item("whole-distribution pieces", 2 * min(n_vocab, max(arch.vocab, KL_CHUNK)) * 4,
                  f"exact KL and whole log-probs in pieces of {KL_CHUNK:,} logits: 2 log-softmax, then in place")],
    }
    if not training:
        return phases, None
    lora = tuple(arch.targeted(config.sft.target_modules))
    p = Pass(m, seq, cb, gpu, lora, cfg.lora_r, precision=net_precision)
    update = [_item("activations", train_activations(arch, p, cfg.gradient_checkpointing),
                    f"{m} x {seq} tokens, {arch.n_layer} layers, {_saved(cfg)}"),
              _item("logits and their gradients",
                    _update_logits(cfg, m, response, arch.vocab, cb, whole=config.algorithm == "grpo"),
                    f"{m} x {response} response positions x {arch.vocab:,} vocabulary")]
    if gpu and value_head:  # the norms save fp32 copies, so the bf16 layer outputs output_hidden_states keeps are extra
        update.append(_item("hidden states", (arch.n_layer + 1) * m * seq * arch.hidden * cb,
                            "every layer's output (output_hidden_states)"))
    update += _dequantized(arch, net_precision, cb)
    phases[f"{name} update"] = [*held, *update]
    phases["optimizer step"] = [*held, _adam_step(max((cfg.lora_r * lin.d_in for lin in lora), default=arch.hidden),
                                                  n_policy, gpu)]
    ckpt = _with_checkpointing(phases, update[0], [*held, *_dequantized(arch, net_precision, cb)], arch, p,
                               cfg.gradient_checkpointing)
    return phases, ckpt


TRL_TOKEN_TILE, TRL_VOCAB_TILE = 4096, 32768
"""The tile of TRL's fused log-prob head on a GPU (`trl.kernels.chunked_logprob`: tokens x vocabulary)."""


def _offline_lengths(config: PipelineConfig, arch: Architecture, budget: int) -> tuple[int, int]:
    """(prompt, answer) tokens of a DPO or KTO sequence: `dpo.preference_dataset`'s and `kto.unpaired_dataset`'s cut
    to `budget` (their `max_length`: each answer leaves the prompt at least half the budget, then the prompt is cut
    from the left to fit)."""
    prompt, answer = _lengths(config, arch)
    answer = min(answer, budget - min(prompt, budget // 2))
    return min(prompt, budget - answer), answer


def _dpo(config: PipelineConfig, arch: Architecture, cb: int, gpu: bool):
    """DPO (`edgerlhf.align.dpo`): TRL's DPOTrainer on one bf16 network, the policy a LoRA and the reference the adapter
    disabled; no reward model, no sampling but the probes. A step runs the policy over chosen + rejected
    (2 x `dpo.batch_size` rows) with gradients, the reference over the same rows without, the loss, then
    `chosen_kl` (two more passes over the chosen rows) while the policy's graph waits for the backward pass.
    The log-prob head scores the answer positions only: on the CPU `offline.add_answer_logprob_head`, a piece of
    the vocabulary-wide log-softmax at a time, recomputed in the backward; on a GPU TRL's fused head, in tiles.
    Its evaluation passes run the same without gradients, below the training step."""
    cfg = config.dpo
    prompt, answer = _offline_lengths(config, arch, cfg.max_length)
    seq = prompt + answer
    rows = 2 * cfg.batch_size  # the batch is the chosen rows, then the rejected rows
    positions = rows * answer  # N: the answer positions the head scores
    V, H = arch.vocab, arch.hidden
    chunk = min(positions // 2, max(1, KL_CHUNK // V)) * V * 4  # one fp32 piece of `chosen_kl`
    lora = tuple(arch.targeted(config.sft.target_modules))
    n_lora = lora_params(arch, config.sft.target_modules, cfg.lora_r)
    weights = _weights_item(arch, "bf16", cb, "network (DPO policy, reference = adapter off)")
    trainable = [_trainable_item(f"DPO policy LoRA r={cfg.lora_r}", n_lora)]
    p = Pass(rows, seq, cb, gpu, lora, cfg.lora_r, autocast=gpu)  # TRL switches dropout off
    activations = _item("activations", train_activations(arch, p, cfg.gradient_checkpointing),
                        f"{cfg.batch_size} pairs = {rows} x {seq} tokens (chosen + rejected), {arch.n_layer} layers, "
                        f"{_saved(cfg)}")
    # What the policy's pass keeps from its forward to its backward, beside the weights and the adapter.
    graph = [weights, *_without_gradients(trainable, cfg.grad_accum), activations,
             _item("answer hidden states", positions * H * cb, f"{positions} answer positions, the head's input")]
    last_hidden = _item("last hidden states", rows * seq * H * cb, f"{rows} x {seq} tokens, the reference's output")
    kl_note = f"{positions // 2} chosen answer positions x {V:,} vocabulary, fp32, in pieces of {KL_CHUNK:,} logits"
    kl = [_item("chosen_kl hidden states", 2 * (positions // 2) * H * cb + cfg.batch_size * seq * H * cb,
                "policy and reference at the chosen answers, one pass's output"),
          _item("chosen_kl logits", 5 * chunk, kl_note + ": 2 log-softmax, exp, difference, product")]
    if gpu:
        tile = min(positions, TRL_TOKEN_TILE) * min(V, TRL_VOCAB_TILE)
        phases = {
            "DPO reference pass": [*graph, last_hidden, _item("log-prob tile", tile * cb, "TRL's fused head")],
            "DPO chosen KL": [*graph, *kl],
            "DPO backward": [*graph, _item("log-prob tile and its gradient", tile * (cb + 4), "TRL's fused head"),
                             _item("gradient of the answer hidden states", positions * H * 4, "fp32 accumulator")],
        }
    else:  # `offline.AnswerLogprobs`: the log-softmax a piece at a time, recomputed in the backward
        piece = min(positions, max(1, KL_CHUNK // V)) * V * 4
        piece_note = f"pieces of {piece // (V * 4)} answer positions x {V:,} vocabulary, fp32"
        phases = {
            "DPO reference pass": [*graph, last_hidden,
                                   _item("head pieces", 4 * piece, piece_note + ": logits, log-softmax, exp, product")],
            "DPO chosen KL": [*graph, *kl],
            "DPO backward": [*graph, _item("head pieces", 2 * piece, piece_note + ": logits, softmax"),
                             _item("gradient of the answer hidden states", positions * H * 4, "fp32")],
        }
    ckpt = _with_checkpointing(phases, activations, [weights, *trainable], arch, p, cfg.gradient_checkpointing)
    phases["optimizer step"] = [weights, *trainable]  # the Trainer's fused AdamW: no temporaries
    if cfg.n_probe_prompts:  # sampled with PPO's settings (`generation.sample_probes`)
        phases["probe generation"] = [weights, *trainable, *_generation(
            arch, cfg.n_probe_prompts, _lengths(config, arch)[0], config.ppo.response_length, cb)]
    return phases, ckpt


def _kto(config: PipelineConfig, arch: Architecture, cb: int, gpu: bool):
    """KTO (`edgerlhf.align.kto`): TRL's KTOTrainer on one bf16 network, the policy a LoRA and the reference the adapter
    disabled; no reward model, no sampling but the probes. A step (`KTOTrainer._compute_loss`) runs the policy
    without gradients over the KL sequences (`kto.batch_size` rows: each prompt with another row's answer), then
    with them over the batch's answers (`kto.batch_size` rows), and, adapter off, the reference over both without,
    while the policy's graph waits for the backward pass. The log-prob head scores the answer positions only, as
    DPO's (on the CPU `offline.add_answer_logprob_head`, on a GPU TRL's fused head). Its evaluation passes run the
    same without gradients, below the training step."""
    cfg = config.kto
    prompt, answer = _offline_lengths(config, arch, cfg.max_length)
    seq = prompt + answer
    rows = cfg.batch_size  # one answer a row; a KL sequence is as long at most (TRL's collator cuts it)
    positions = rows * answer  # N: the answer positions the head scores
    V, H = arch.vocab, arch.hidden
    lora = tuple(arch.targeted(config.sft.target_modules))
    n_lora = lora_params(arch, config.sft.target_modules, cfg.lora_r)
    weights = _weights_item(arch, "bf16", cb, "network (KTO policy, reference = adapter off)")
    trainable = [_trainable_item(f"KTO policy LoRA r={cfg.lora_r}", n_lora)]
    held = [weights, *_without_gradients(trainable, cfg.grad_accum)]
    p = Pass(rows, seq, cb, gpu, lora, cfg.lora_r, autocast=gpu)  # TRL switches dropout off
    activations = _item("activations", train_activations(arch, p, cfg.gradient_checkpointing),
                        f"{rows} answers x {seq} tokens, {arch.n_layer} layers, {_saved(cfg)}")
    # What the policy's pass keeps from its forward to its backward, beside the weights and the adapter.
    graph = [*held, activations,
             _item("answer hidden states", positions * H * cb, f"{positions} answer positions, the head's input")]
    last_hidden = _item("last hidden states", rows * seq * H * cb, f"{rows} x {seq} tokens, a no-grad pass's output")
    if gpu:
        tile = min(positions, TRL_TOKEN_TILE) * min(V, TRL_VOCAB_TILE)
        head = _item("log-prob tile", tile * cb, "TRL's fused head")
        backward = [_item("log-prob tile and its gradient", tile * (cb + 4), "TRL's fused head"),
                    _item("gradient of the answer hidden states", positions * H * 4, "fp32 accumulator")]
    else:  # `offline.AnswerLogprobs`: the log-softmax a piece at a time, recomputed in the backward
        piece = min(positions, max(1, KL_CHUNK // V)) * V * 4
        piece_note = f"pieces of {piece // (V * 4)} answer positions x {V:,} vocabulary, fp32"
        head = _item("head pieces", 4 * piece, piece_note + ": logits, log-softmax, exp, product")
        backward = [_item("head pieces", 2 * piece, piece_note + ": logits, softmax"),
                    _item("gradient of the answer hidden states", positions * H * 4, "fp32")]
    phases = {
        "KTO KL pass": [*held, last_hidden, head],
        "KTO reference passes": [*graph, last_hidden, head],
        "KTO backward": [*graph, *backward],
    }
    ckpt = _with_checkpointing(phases, activations, [weights, *trainable], arch, p, cfg.gradient_checkpointing)
    phases["optimizer step"] = [weights, *trainable]  # the Trainer's fused AdamW: no temporaries
    if cfg.n_probe_prompts:  # sampled with PPO's settings (`generation.sample_probes`)
        phases["probe generation"] = [weights, *trainable, *_generation(
            arch, cfg.n_probe_prompts, _lengths(config, arch)[0], config.ppo.response_length, cb)]
    return phases, ckpt


OFFLINE = {"dpo": _dpo, "kto": _kto}
"""The plan of each algorithm that trains offline through its own trainer (`align.TRAINERS`)."""


def _pass_logits(m: int, response: int, vocab: int, cb: int) -> float:
    """One `forward_response`: the raw logits (compute dtype, one more position) and their scaled fp32 copy."""
    return m * (response + 1) * vocab * cb + m * response * vocab * 4


def _update_logits(cfg, m: int, response: int, vocab: int, cb: int, whole: bool) -> float:
    """The update: the scaled fp32 logits and, in the backward pass, the gradients of the gather and of
    top-k (each a full (M, T, V) fp32 tensor), their sum, and the slice's gradient in the compute dtype; with
    `whole` (GRPO's k3 reads the whole distribution), its log-sum-exp and gradient."""
    n = m * response * vocab
    return n * 4 * 3 + m * (response + 1) * vocab * cb + n * _full_vocabulary_extra(cfg, update=True, whole=whole)


def _full_vocabulary_extra(cfg, update: bool, whole: bool) -> int:
    """Bytes per (position, vocabulary) entry the log-prob maths adds beyond the logits. With `whole` (GRPO's
    update: k3 reads the whole distribution with its gradient), its log-sum-exp and the softmax of its gradient
    (two fp32 temporaries). The sampler's distribution is top-k sized with top-k; without it, its log-sum-exp and
    entropy run over the whole vocabulary (softmax and product: two fp32 temporaries; their gradients three more
    in the update), and top-p sorts it (fp32 values + int64 indices)."""
    extra = 8 if whole else 0
    if cfg.top_k and cfg.top_k < 1_000_000:
        return extra
    return extra + (12 if update else 8) + (12 if cfg.top_p < 1.0 else 0)


# --- the cheapest change that makes a stage fit ------------------------------------------------


def suggestion(config: PipelineConfig, stage: str, gpu_memory_bytes: int,
               served: dict[str, PipelineConfig] | None = None) -> Suggestion | None:
    """The cheapest change that makes `stage` fit in `gpu_memory_bytes`, cheapest first: a smaller
    micro-batch with more accumulation (the same maths, only slower), gradient checkpointing (the same
    maths, about a third more compute), a 4-bit network (QLoRA: different numerics), shorter
    sequences or responses (a different task). None when nothing here makes it fit."""
    base = config.to_dict()

    def peak(overrides: dict[str, Any]) -> int | None:
        try:
            changed = PipelineConfig.from_dict(merge_overrides(base, overrides))
        except ConfigError:
            return None
        planned = plan(changed, gpu_memory_bytes, "cuda", suggest=False, served=served)
        s = next((s for s in planned.stages if s.stage == stage), None)
        return None if s is None else s.peak_bytes

    for change, overrides in _candidates(config, stage):
        value = peak(overrides)
        if value is not None and value <= gpu_memory_bytes:
            return Suggestion(change=change, overrides=overrides, peak_bytes=value)
    return None


def _halvings(value: int, accum: int) -> list[tuple[int, int]]:
    """(micro-batch, accumulation) pairs with the same product, the micro-batch halved each time."""
    out = []
    while value % 2 == 0 and value > 1:
        value, accum = value // 2, accum * 2
        out.append((value, accum))
    return out


def _checkpointing(section: str, cfg):
    """Gradient checkpointing as a candidate change, unless the stage already runs it."""
    if not cfg.gradient_checkpointing:
        yield (f"{section}.gradient_checkpointing -> true (same maths, about a third more compute)",
               {section: {"gradient_checkpointing": True}})


def _candidates(config: PipelineConfig, stage: str):
    """(description, overrides) to try for `stage`, cheapest first."""
    if stage == "sft" or stage.startswith("reward/"):
        section = "sft" if stage == "sft" else "reward"
        cfg = getattr(config, section)
        for batch, accum in _halvings(cfg.batch_size, cfg.grad_accum):
            yield (f"{section}.batch_size {cfg.batch_size} -> {batch} with {section}.grad_accum {cfg.grad_accum} -> "
                   f"{accum} (same effective batch)", {section: {"batch_size": batch, "grad_accum": accum}})
        yield from _checkpointing(section, cfg)
        if stage == "sft" and cfg.precision != "int4":
            yield "sft.precision -> int4 (QLoRA: LoRA on a 4-bit base)", {"sft": {"precision": "int4"}}
        length = cfg.max_length
        while length > 64:
            length //= 2
            yield f"{section}.max_length {cfg.max_length} -> {length} (shorter sequences)", {section: {"max_length": length}}
        return
    traits = algorithm_traits(config.algorithm)
    if stage == "ppo" and not traits.samples:  # DPO's and KTO's trainers read their own section
        section = traits.section
        cfg = getattr(config, section)
        for batch, accum in _halvings(cfg.batch_size, cfg.grad_accum):  # KTO's config refuses a batch of 1
            yield (f"{section}.batch_size {cfg.batch_size} -> {batch} with {section}.grad_accum {cfg.grad_accum} -> "
                   f"{accum} (same effective batch)", {section: {"batch_size": batch, "grad_accum": accum}})
        yield from _checkpointing(section, cfg)
        length = cfg.max_length
        while length > 64:
            length //= 2
            yield (f"{section}.max_length {cfg.max_length} -> {length} (shorter sequences)",
                   {section: {"max_length": length}})
        return
    cfg = config.ppo
    for mini, accum in _halvings(cfg.mini_batch_size, cfg.grad_accum):
        yield (f"ppo.mini_batch_size {cfg.mini_batch_size} -> {mini} with ppo.grad_accum {cfg.grad_accum} -> {accum} "
               "(same optimizer steps)", {"ppo": {"mini_batch_size": mini, "grad_accum": accum}})
    if stage == "ppo":
        yield from _checkpointing("ppo", cfg)
    if not (cfg.quantized_policy and cfg.reward_precision == "int4"):
        precisions = list(dict.fromkeys([*config.reward.precisions, "int4"]))
        yield ("4-bit policy: ppo.quantized_policy with the int4 reward model (one NF4 network)",
               {"reward": {"precisions": precisions}, "ppo": {"quantized_policy": True, "reward_precision": "int4"}})
    section, length = ("ppo", cfg.response_length) if stage == "ppo" else ("evaluate", config.evaluate.response_length)
    value = length
    while value > 8:
        value //= 2
        yield f"{section}.response_length {length} -> {value} (shorter responses)", {section: {"response_length": value}}


# --- the command line --------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """`8GiB`, `8 GB`, `7.5G`, `8192MiB`, `8192MB` -> bytes. A GPU sold as "8 GB" has 8 GiB, so GB means GiB."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([GgMm])(?:i?[Bb])?\s*", text)
    if not m:
        raise ValueError(f"expected a size such as 8GiB or 8192MiB, got {text!r}")
    return int(float(m.group(1)) * (GiB if m.group(2).lower() == "g" else MiB))


def _gib(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.2f}"


def table(result: MemoryPlan) -> str:
    """The plan as text: one line per stage, then each stage's terms."""
    gpu = f"{result.gpu_memory_bytes / GiB:.2f} GiB" if result.gpu_memory_bytes else "no GPU memory given"
    lines = [f"memory plan: {result.preset} on {result.device} ({result.compute_dtype}), {gpu}",
             f"model: {result.model}", result.note, "",
             f"{'stage':<14} {'peak GiB':>9} {'tensors':>8} {'w/ ckpt':>8}  {'fits':<5} peak in"]
    for s in result.stages:
        fits = {True: "yes", False: "NO", None: "-"}[s.fits]
        lines.append(f"{s.stage:<14} {_gib(s.peak_bytes):>9} {_gib(s.tensor_bytes):>8} "
                     f"{_gib(s.checkpointing_peak_bytes):>8}  {fits:<5} {s.phase}")
    for s in result.stages:
        lines += ["", f"{s.stage}: {_gib(s.peak_bytes)} GiB at the {s.phase}"]
        lines += [f"  {i.name:<52} {i.bytes / GiB:>7.3f} GiB  {i.note}" for i in s.items]
        if s.fits is False:
            lines.append(f"  -> does not fit; cheapest change that fits: {s.suggestion.change} "
                         f"({_gib(s.suggestion.peak_bytes)} GiB)" if s.suggestion else
                         "  -> does not fit, and no single change tried here makes it fit")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgerlhf plan", description=__doc__.split("\n\n")[1].strip())
    parser.add_argument("--preset", help="preset to start from (default: tiny, or the config file's preset)")
    parser.add_argument("--config", help="JSON file of config overrides (may name its preset)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field, e.g. --set ppo.mini_batch_size=1 (repeatable; JSON values)")
    parser.add_argument("--stages", help="comma-separated subset of the stages")
    parser.add_argument("--gpu-memory", help="the GPU's memory, e.g. 8GiB, 24GB, 12288MiB (default: figures only)")
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        help="plan for a bf16 GPU (cuda) or fp32 CPU tensors (default: cpu for a cpu config, else cuda)")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = parser.parse_args(argv)
    try:
        config = build_config(args.preset, args.config, args.sets, args.stages)
        gpu_memory = parse_size(args.gpu_memory) if args.gpu_memory else None
    except (ConfigError, ValueError) as exc:
        print(f"edgerlhf plan: {exc}", file=sys.stderr)
        return 2
    device = args.device or ("cpu" if config.device == "cpu" else "cuda")
    result = plan(config, gpu_memory, device)
    print(result.model_dump_json(indent=2) if args.json else table(result))
    return 0 if result.fits is not False else 1


if __name__ == "__main__":
    sys.exit(main())
