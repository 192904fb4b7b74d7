"""GGUF: a merged causal LM and its tokenizer as one file that llama.cpp, Ollama and LM Studio run.

Follows llama.cpp's `convert_hf_to_gguf.py`: tensor names from gguf-py's `TensorNameMap`, its layout transforms and
its metadata keys, written with the `gguf` package. Each transform is the exact inverse of what transformers' GGUF
reader (`transformers/modeling_gguf_pytorch_utils.py`) undoes, which is how the tests check a file: loaded back with
`AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`, it must give the merged model's logits.

    family            GGUF arch   transforms
    gpt2              gpt2        Conv1D weights (in, out) transposed to (out, in); output.weight always written
    llama, mistral    llama       q/k rows permuted for llama.cpp's rotary pairs (`permute_rotary`)
    qwen2, qwen3      qwen2/3     none (llama.cpp rotates their halves as transformers does)
    gemma2, gemma3    gemma2/3    every norm weight + 1 (Gemma's RMSNorm scales by 1 + w); soft caps in metadata
    phi3              phi3        none (the fused qkv and gate_up stay fused, in the order llama.cpp splits them)

A tied output layer is left out (llama.cpp and the reader reuse token_embd), except for GPT-2, whose llama.cpp
loader wants `output.weight`. Gemma (1) is refused: transformers has no GGUF reader for it, so its file could not be
checked. Norms, biases and GPT-2's position embeddings stay float32, as llama.cpp keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerlhf.contract import GGUF_QUANTS
from edgerlhf.errors import StageError


class GGUFExportError(StageError):
    """A model or tokenizer this export cannot write as a GGUF file that llama.cpp runs as transformers does."""


@dataclass(frozen=True)
class GGUFFamily:
    """How one transformers model type becomes a GGUF file: one row of `GGUF_FAMILIES`."""

    arch: str
    """The GGUF (llama.cpp) architecture name."""
    write_hparams: Callable[[Any, Any], None]
    """Writes the architecture's metadata keys from the transformers config: (writer, config)."""
    permute_rotary: bool = False
    """q/k rows permuted to llama.cpp's rotary layout (its NORM rope pairs neighbours, transformers' halves)."""
    conv1d: bool = False
    """Projection weights are GPT-2 `Conv1D`s, stored (in, out): transposed to a linear layer's (out, in)."""
    norm_offset: float = 0.0
    """Added to every norm weight: Gemma's RMSNorm scales by (1 + w), llama.cpp's by w."""
    output_always: bool = False
    """Write `output.weight` even when tied (llama.cpp's loader of this architecture requires it)."""
    checks: Callable[[Any], list[str]] = field(default=lambda config: [])
    """Reasons llama.cpp would compute this config differently from transformers (each refuses the export)."""


QUANT_TYPES = {"f16": "F16", "q8_0": "Q8_0"}
"""`contract.GGUF_QUANTS` -> the ggml type of the file's matrices."""
FILE_TYPES = {"f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0"}
"""`contract.GGUF_QUANTS` -> `general.file_type`."""


# --- metadata of each architecture --------------------------------------------------------------------------------

def rope_parameters(config, layer_type: str = "full_attention") -> dict[str, Any]:
    """transformers 5's `rope_parameters` of `config` (for one layer type when they differ by layer type)."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type in params and isinstance(params[layer_type], dict):
        params = params[layer_type]
    return params


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _decoder_hparams(writer, config, layer_type: str = "full_attention") -> None:
    """The keys every RMSNorm decoder (Llama, Qwen, Gemma, Phi-3) shares; the rotary base of `layer_type`'s layers."""
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope_parameters(config, layer_type).get("rope_theta", 10000.0))
    writer.add_vocab_size(config.vocab_size)


def _key_length(writer, config) -> None:
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))


def _gpt2_hparams(writer, config) -> None:
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)


def _llama_hparams(writer, config) -> None:
    _decoder_hparams(writer, config)
    writer.add_rope_dimension_count(head_dim(config))  # transformers' llama reader takes head_dim from it
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        _key_length(writer, config)


def _qwen2_hparams(writer, config) -> None:
    _decoder_hparams(writer, config)
    if head_dim(config) != config.hidden_size // config.num_attention_heads:
        _key_length(writer, config)


def _qwen3_hparams(writer, config) -> None:
    _decoder_hparams(writer, config)
    _key_length(writer, config)


def _gemma2_hparams(writer, config) -> None:
    _decoder_hparams(writer, config)
    _key_length(writer, config)
    writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    writer.add_final_logit_softcapping(config.final_logit_softcapping)
    writer.add_sliding_window(config.sliding_window)


def _gemma3_hparams(writer, config) -> None:
    _decoder_hparams(writer, config)  # llama.cpp's rope.freq_base is the global layers' base
    _key_length(writer, config)
    writer.add_rope_freq_base_swa(rope_parameters(config, "sliding_attention").get("rope_theta", 10_000.0))
    writer.add_sliding_window(config.sliding_window)
    if config.final_logit_softcapping:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _phi3_hparams(writer, config) -> None:
    _decoder_hparams(writer, config)
    rotary = rope_parameters(config).get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0))
    writer.add_rope_dimension_count(int(head_dim(config) * (rotary or 1.0)))
    writer.add_sliding_window(config.sliding_window or config.max_position_embeddings)  # llama.cpp requires one


# --- what llama.cpp would compute differently -----------------------------------------------------------------------

def _rope_checks(config, allowed: tuple[str, ...] = ("default",)) -> list[str]:
    types = {rope_parameters(config, t).get("rope_type", "default") for t in ("full_attention", "sliding_attention")}
    bad = sorted(types - set(allowed))
    return [f"rope_type {bad[0]!r} (this export writes {', '.join(allowed)} rotary embeddings only)"] if bad else []


def _gemma_checks(config, swa_every: int) -> list[str]:
    reasons = _rope_checks(config)
    if config.query_pre_attn_scalar != head_dim(config):
        reasons.append(f"query_pre_attn_scalar={config.query_pre_attn_scalar} differs from head_dim={head_dim(config)} "
                       "(llama.cpp scales Gemma's queries by 1/sqrt(head_dim))")
    sliding = [t == "sliding_attention" for t in getattr(config, "layer_types", None) or []]
    if sliding and sliding != [(i + 1) % swa_every != 0 for i in range(len(sliding))]:
        reasons.append(f"layer_types other than llama.cpp's fixed pattern (one global layer in {swa_every})")
    if not config.tie_word_embeddings and config.model_type == "gemma2":
        reasons.append("an untied output layer (llama.cpp's gemma2 has none: it always reuses the embeddings)")
    if config.model_type == "gemma3_text" and getattr(config, "attn_logit_softcapping", None):
        reasons.append("attn_logit_softcapping (llama.cpp's gemma3 has no attention soft cap)")
    return reasons


def _qwen2_checks(config) -> list[str]:
    reasons = _rope_checks(config)
    if getattr(config, "use_sliding_window", False):
        reasons.append("use_sliding_window (llama.cpp's qwen2 attends to the whole context)")
    return reasons


GGUF_FAMILIES: dict[str, GGUFFamily] = {
    "gpt2": GGUFFamily("gpt2", _gpt2_hparams, conv1d=True, output_always=True),
    "llama": GGUFFamily("llama", _llama_hparams, permute_rotary=True,
                        checks=lambda c: _rope_checks(c, ("default", "llama3"))),
    "mistral": GGUFFamily("llama", _llama_hparams, permute_rotary=True, checks=_rope_checks),
    "qwen2": GGUFFamily("qwen2", _qwen2_hparams, checks=_qwen2_checks),
    "qwen3": GGUFFamily("qwen3", _qwen3_hparams, checks=_qwen2_checks),
    "gemma2": GGUFFamily("gemma2", _gemma2_hparams, norm_offset=1.0, checks=lambda c: _gemma_checks(c, 2)),
    "gemma3_text": GGUFFamily("gemma3", _gemma3_hparams, norm_offset=1.0, checks=lambda c: _gemma_checks(c, 6)),
    "phi3": GGUFFamily("phi3", _phi3_hparams, checks=_rope_checks),
}
"""The families a GGUF export writes, by transformers model type (llama.cpp runs Mistral as Llama)."""

REFUSED_FAMILIES = {
    "gemma": "transformers has no GGUF reader for Gemma (1), so the file could not be loaded back and checked",
}
"""Families of `config.RANDOM_ARCHITECTURES` a GGUF export refuses, and why."""


def family_of(config) -> GGUFFamily:
    """The row of `GGUF_FAMILIES` for `config`, or a `GGUFExportError` naming the supported families."""
    model_type = config.model_type
    supported = f"GGUF export supports {', '.join(GGUF_FAMILIES)}"
    if model_type in REFUSED_FAMILIES:
        raise GGUFExportError(f"cannot export a {model_type} model as GGUF: {REFUSED_FAMILIES[model_type]}; "
                              f"{supported}")
    if model_type not in GGUF_FAMILIES:
        raise GGUFExportError(f"cannot export a {model_type} model as GGUF; {supported}")
    family = GGUF_FAMILIES[model_type]
    reasons = family.checks(config)
    if reasons:
        raise GGUFExportError(f"cannot export this {model_type} model as GGUF: llama.cpp would compute it differently "
                              f"from transformers because of {'; '.join(reasons)}")
    return family


# --- tensors -----------------------------------------------------------------------------------------------------

def permute_rotary(weight, n_head: int):
    """llama.cpp's q/k row order (`LlamaModel.permute` of convert_hf_to_gguf.py): transformers rotates dimension i of a
    head with i + d/2, llama.cpp with its neighbour, so each head's two halves are interleaved."""
    return weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:]).swapaxes(1, 2) \
        .reshape(weight.shape)


def conv1d_to_linear(weight):
    """A GPT-2 `Conv1D` weight (in, out) as the (out, in) matrix llama.cpp multiplies by."""
    return weight.transpose(0, 1)


CONV1D_TENSORS = (".attn_qkv.weight", ".attn_output.weight", ".ffn_up.weight", ".ffn_down.weight")
"""GGUF names of GPT-2's Conv1D weights (llama.cpp transposes exactly these)."""
FLOAT32_TENSORS = ("position_embd.weight", "rope_freqs.weight")
"""Kept in float32 whatever the quant, as llama.cpp keeps them (with every norm and bias)."""


def llama3_rope_factors(config):
    """llama.cpp's `rope_freqs.weight` for Llama 3's rope scaling: the factor each frequency is divided by
    (`LlamaModel.generate_extra_tensors` of convert_hf_to_gguf.py; transformers' `_compute_llama3_parameters`)."""
    import math

    import torch

    params = rope_parameters(config)
    dim = int(head_dim(config) * params.get("partial_rotary_factor", 1.0))
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))  # (dim/2,)
    factor, low, high = params["factor"], params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
    old_context = params.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_context / high:
            factors.append(1.0)
        elif wavelen > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def gguf_tensors(model, family: GGUFFamily):
    """(GGUF name, float32 tensor in llama.cpp's layout) of every weight of `model`, transformed for `family`."""
    import gguf
    import torch

    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    arch = next(key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == family.arch)
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    n_head = config.num_attention_heads
    n_kv_head = getattr(config, "num_key_value_heads", None) or n_head
    state = model.state_dict()
    for hf_name, tensor in state.items():
        base, _, suffix = hf_name.rpartition(".")
        if suffix not in ("weight", "bias"):
            continue  # buffers such as GPT-2's causal mask
        if base == "lm_head" and tied and not family.output_always:
            continue  # llama.cpp and transformers' reader tie it back to token_embd
        name = names.get_name(base)
        if name is None:
            raise GGUFExportError(f"no GGUF tensor for {hf_name} of a {config.model_type} model")
        name = f"{name}.{suffix}"
        data = tensor.detach().to(torch.float32)
        if family.conv1d and name.endswith(CONV1D_TENSORS):
            data = conv1d_to_linear(data)
        if family.permute_rotary and ".attn_q." in name:
            data = permute_rotary(data, n_head)
        elif family.permute_rotary and ".attn_k." in name:
            data = permute_rotary(data, n_kv_head)
        if family.norm_offset and name.endswith("norm.weight"):
            data = data + family.norm_offset
        yield name, data
    if family.output_always and tied and "lm_head.weight" not in state:
        yield "output.weight", model.get_input_embeddings().weight.detach().to(torch.float32)
    if rope_parameters(config).get("rope_type") == "llama3":
        yield "rope_freqs.weight", llama3_rope_factors(config)


def _encode(name: str, data, quant: str):
    """(array, ggml type) of one tensor in the file: float32 for vectors, norms and position tables; the quant's type
    for matrices, or F16 for a matrix whose rows do not split into q8_0's blocks of 32 (as llama.cpp falls back)."""
    import gguf
    import numpy as np

    array = data.contiguous().numpy()
    if array.ndim <= 1 or name.endswith("norm.weight") or name in FLOAT32_TENSORS:
        return array, gguf.GGMLQuantizationType.F32
    qtype = gguf.GGMLQuantizationType[QUANT_TYPES[quant]]
    if qtype != gguf.GGMLQuantizationType.F16:
        try:
            return gguf.quants.quantize(array, qtype), qtype
        except gguf.QuantError:
            qtype = gguf.GGMLQuantizationType.F16
    with np.errstate(over="ignore"):
        half = array.astype(np.float16)
    if not np.isfinite(half).all():
        raise GGUFExportError(f"{name} holds values beyond float16's range (|x| > 65504): it cannot be written as "
                              f"{quant}")
    return half, qtype


# --- tokenizer ---------------------------------------------------------------------------------------------------

LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_PRE_TOKENIZERS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}
"""`tokenizer.ggml.pre` of a byte-level BPE whose pre-tokenizer splits by this regex (Llama 3's, Qwen2.5's): the
regexes transformers' GGUF reader splits by for these names."""


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name (`tokenizer.ggml.pre`) for the pre-tokenizer of a `tokenizer.json`, None when unknown."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    steps = (pre.get("pretokenizers") or []) if pre.get("type") == "Sequence" else []
    kinds = [step.get("type") for step in steps]
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_PRE_TOKENIZERS.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS before a text itself (llama.cpp's `add_bos_token`)."""
    return tokenizer.bos_token_id is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]


def add_tokenizer(writer, tokenizer, n_vocab: int, chat_template: str, stop_token_ids: tuple[int, ...]) -> None:
    """The tokenizer as llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`): one token per embedding row
    (rows past the tokenizer are `[PAD<i>]`, unused), added tokens whole (control when special), the merges, the
    pre-tokenizer's name, the special ids, whether a BOS is added, the chat template, and the end-of-turn token."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "backend_tokenizer", None) else {}
    model = spec.get("model") or {}
    pre = pre_tokenizer_name(spec)
    if model.get("type") != "BPE" or model.get("byte_fallback") or pre is None:
        raise GGUFExportError("GGUF export writes byte-level BPE tokenizers (GPT-2, Qwen2.5, Llama 3, SmolLM2) only; "
                              f"this one is {model.get('type')} with pre-tokenizer "
                              f"{json.dumps(spec.get('pre_tokenizer'))}")
    if len(tokenizer) > n_vocab:
        raise GGUFExportError(f"the tokenizer has {len(tokenizer)} tokens but the model only {n_vocab} embedding rows")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL if i not in added else
                         gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id),
                          (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id),
                          (tokenizer.pad_token_id, writer.add_pad_token_id)):
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(adds_bos(tokenizer))
    writer.add_add_eos_token(tokenizer.eos_token_id is not None and
                             tokenizer("a")["input_ids"][-1:] == [tokenizer.eos_token_id])
    end_of_turn = [i for i in stop_token_ids if i != tokenizer.eos_token_id]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    writer.add_chat_template(chat_template)


# --- the file ----------------------------------------------------------------------------------------------------

def write_gguf(model, tokenizer, path: str | Path, quant: str, *, name: str, chat_template: str,
               stop_token_ids: tuple[int, ...], sampling: dict[str, float] | None = None) -> None:
    """Write `model` (a transformers causal LM) with `tokenizer` to the GGUF file `path`, its matrices in `quant`.

    `sampling` (temperature, top_k, top_p) goes into `general.sampling.*`, the defaults recent llama.cpp reads.
    Raises `GGUFExportError` for a family, config or tokenizer this export cannot write faithfully.
    """
    import gguf

    if quant not in GGUF_QUANTS:
        raise GGUFExportError(f"unknown GGUF quant {quant!r}; choose from {list(GGUF_QUANTS)}")
    config = model.config
    family = family_of(config)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    writer = gguf.GGUFWriter(str(path), family.arch)
    try:
        writer.add_name(name)
        writer.add_file_type(gguf.LlamaFileType[FILE_TYPES[quant]])
        if quant != "f16":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        family.write_hparams(writer, config)
        if sampling:
            writer.add_sampling_temp(float(sampling["temperature"]))
            writer.add_sampling_top_k(int(sampling["top_k"]))
            writer.add_sampling_top_p(float(sampling["top_p"]))
        add_tokenizer(writer, tokenizer, n_vocab, chat_template, stop_token_ids)
        for tensor_name, data in gguf_tensors(model, family):
            array, qtype = _encode(tensor_name, data, quant)
            writer.add_tensor(tensor_name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


READBACK_FIELDS = ("vocab_size", "hidden_size", "n_embd", "num_hidden_layers", "num_attention_heads",
                   "num_key_value_heads", "head_dim", "intermediate_size", "n_inner", "max_position_embeddings",
                   "n_positions", "tie_word_embeddings", "attn_logit_softcapping", "final_logit_softcapping",
                   "query_pre_attn_scalar")
"""Config fields that shape what a model computes, compared by `readback_differences`."""


def readback_differences(path: str | Path, config) -> list[str]:
    """The fields of `config` that transformers' GGUF reader rebuilds differently from the file at `path` (its
    metadata only: no weights are read). Empty when `from_pretrained(..., gguf_file=...)` gives this model back;
    otherwise the file still runs in llama.cpp, which reads keys transformers' reader leaves out, but cannot be
    checked by loading it back."""
    from transformers import AutoConfig

    path = Path(path)
    rebuilt = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    differences = []
    for name in READBACK_FIELDS:
        if not hasattr(config, name):
            continue
        ours, theirs = getattr(config, name), getattr(rebuilt, name, None)
        if name == "head_dim":
            ours, theirs = head_dim(config), head_dim(rebuilt)
        if name == "tie_word_embeddings" and GGUF_FAMILIES[config.model_type].output_always:
            continue  # written untied on purpose: the same weights twice
        if name == "n_inner":
            ours, theirs = ours or 4 * config.n_embd, theirs or 4 * rebuilt.n_embd
        if ours != theirs:
            differences.append(f"{name}={theirs} (the model has {ours})")
    if rope_parameters(config).get("rope_type", "default") != "default":
        differences.append(f"no {rope_parameters(config)['rope_type']} rope scaling (llama.cpp reads rope_freqs)")
    return differences
