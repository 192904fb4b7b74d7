"""GGUF export (`edgerlhf.gguf_export`, `edgerlhf.modelfile`, `edgerlhf export --format gguf`), checked by loading the
file back with an independent reader: transformers' GGUF loader (`from_pretrained(dir, gguf_file=...)`), whose
inverse transforms the writer must undo exactly. (llama.cpp's Python bindings have no prebuilt wheel here, so
llama.cpp itself is not run.)

Every family the export writes is a tiny random model built like the families test's (`random_config`, one GQA
layer pair, a 64-wide body), with its matrices drawn at std 0.3 and its norms jittered: at the usual init (0.02)
attention is uniform and a wrong rotary permutation changes almost nothing, here it changes the logits as much as
the logits themselves. Each model's next-token logits on a few prompts must match the file's: f16 within
`TOLERANCE["f16"]`, q8_0 within the looser `TOLERANCE["q8_0"]`, and a deliberately wrong layout (no rotary
permutation, one on a family that needs none, a GPT-2 projection left untransposed, Gemma's norms without their +1,
Phi-3's gate and up swapped) must exceed even the looser one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil

import pytest
import torch

from edgerlhf import gguf_export
from edgerlhf.config import TINY_TOKENIZER_DIR, ModelConfig
from edgerlhf.contract import exported_gguf, gguf_file_name
from edgerlhf.dialogue import HH_CHAT_TEMPLATE, PromptFormat, render_chat
from edgerlhf.gguf_export import GGUF_FAMILIES, GGUFExportError, write_gguf
from edgerlhf.modelfile import PROBES, turn_template
from tests.support.runs import save_policy_adapter
from tests.support.tiny import CHATML, chat_template_tokenizer

TOLERANCE = {"f16": 0.02, "q8_0": 0.25}
"""Largest |logit difference| / largest |logit| a GGUF file may show against the merged model (measured here: f16
about 0.005, q8_0 up to 0.11; a wrong layout 1.0 or more)."""

TEMPLATE_FAMILIES = {"llama", "qwen2", "gemma2", "phi3"}
"""Families given the ChatML template (as in tests/test_families.py); the others see raw HH text."""

SHAPES = {
    "gpt2": dict(n_positions=1024, intermediate_size=None),  # transformers' reader knows neither n_ctx nor n_inner
    "qwen3": dict(head_dim=128),  # ... nor Qwen3's head_dim (its default is 128)
    "gemma2": dict(head_dim=256, tie_word_embeddings=True),  # llama.cpp: scale 1/sqrt(head_dim), always tied;
    "gemma3_text": dict(head_dim=256, tie_word_embeddings=True),  # the reader: query_pre_attn_scalar 256
}
"""What each family needs beyond the families test's shape for transformers to rebuild it from the file."""

PROMPTS = [[{"role": "user", "content": "How far can spiders jump?"}],
           [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, how can I help?"},
            {"role": "user", "content": "Tell me about the moon, briefly."}]]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from edgerlhf.models import load_tokenizer

    chatml_dir = tmp_path_factory.mktemp("chatml")
    chat_template_tokenizer(chatml_dir)
    return {"raw": load_tokenizer(TINY_TOKENIZER_DIR), "chatml": load_tokenizer(chatml_dir)}


def tokenizer_of(tokenizers, arch: str):
    return tokenizers["chatml" if arch in TEMPLATE_FAMILIES else "raw"]


def tiny_model(arch: str, tokenizer, **shape):
    """A two-layer random `arch` model (the families test's widths) whose layout matters: see the module doc."""
    from edgerlhf.models import random_model

    fields = dict(n_layer=2, n_head=2, n_kv_head=1, n_embd=64, intermediate_size=128, n_positions=256)
    fields.update({**SHAPES.get(arch, {}), **shape})
    model = random_model(ModelConfig(name_or_path="tiny", random_init=True, architecture=arch, **fields), tokenizer)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            else:
                param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model.eval()


def write(model, tokenizer, path, quant: str) -> None:
    fmt = PromptFormat.of(tokenizer)
    write_gguf(model, tokenizer, path, quant, name="tiny", chat_template=tokenizer.chat_template or HH_CHAT_TEMPLATE,
               stop_token_ids=fmt.stop_token_ids, sampling={"temperature": 0.7, "top_k": 40, "top_p": 0.9})


def logit_error(model, tokenizer, path) -> float:
    """Largest |logit difference| / largest |logit| between `model` and the GGUF file at `path`, loaded back by
    transformers, over the next-token logits of every position of `PROMPTS`."""
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    fmt = PromptFormat.of(tokenizer)
    worst = 0.0
    for messages in PROMPTS:
        ids = tokenizer(fmt.chat(messages), return_tensors="pt", add_special_tokens=fmt.add_special_tokens)["input_ids"]
        with torch.no_grad():
            ours, theirs = model.float()(ids).logits, back(ids).logits  # (1, T, V)
        assert theirs.shape == ours.shape
        worst = max(worst, ((theirs - ours).abs().max() / ours.abs().max()).item())
    return worst


@pytest.fixture(scope="module")
def models(tokenizers):
    """One tiny model per family, built once."""
    return {arch: tiny_model(arch, tokenizer_of(tokenizers, arch)) for arch in GGUF_FAMILIES}


Q8_FAMILIES = ("llama",)
"""The family also checked at q8_0: quantization is one code path for every family, while the layouts differ
(a Conv1D transposed, rotary rows permuted), and each f16 check already catches a wrong layout."""


@pytest.mark.parametrize("arch, quant", [(arch, "f16") for arch in GGUF_FAMILIES] +
                         [(arch, "q8_0") for arch in Q8_FAMILIES])
def test_every_family_loads_back_with_the_models_logits(models, tokenizers, arch, quant, tmp_path):
    path = tmp_path / gguf_file_name(quant)
    write(models[arch], tokenizer_of(tokenizers, arch), path, quant)
    assert gguf_export.readback_differences(path, models[arch].config) == []
    assert logit_error(models[arch], tokenizer_of(tokenizers, arch), path) < TOLERANCE[quant]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_a_tied_output_layer_loads_back_tied_or_duplicated(tokenizers, arch, tmp_path):
    """Tied embeddings (distilgpt2, the published Qwen and SmolLM2 shapes): Llama's file leaves `output.weight` out
    and the reader ties it back; GPT-2's carries a copy, which llama.cpp's GPT-2 loader wants."""
    import gguf

    model = tiny_model(arch, tokenizers["raw"], tie_word_embeddings=True)
    assert model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    path = tmp_path / "tied.gguf"
    write(model, tokenizers["raw"], path, "f16")
    names = {tensor.name for tensor in gguf.GGUFReader(str(path)).tensors}
    assert ("output.weight" in names) == (arch == "gpt2")
    assert logit_error(model, tokenizers["raw"], path) < TOLERANCE["f16"]


def _swap_gate_and_up(real_tensors):
    def tensors(model, family):
        for name, data in real_tensors(model, family):
            yield name, torch.cat(data.chunk(2)[::-1]) if name.endswith("ffn_up.weight") else data
    return tensors


MISTAKES = {
    "llama: q/k not permuted": ("llama", "permute_rotary", lambda real: lambda weight, n_head: weight),
    "mistral: k permuted with the query heads": ("mistral", "permute_rotary", lambda real: lambda w, n: real(w, 2)),
    "qwen2 permuted like llama": ("qwen2", "family", dict(permute_rotary=True)),
    "qwen3 permuted like llama": ("qwen3", "family", dict(permute_rotary=True)),
    "gpt2: a square Conv1D left untransposed": ("gpt2", "conv1d_to_linear",
                                                lambda real: lambda w: w if w.shape[0] == w.shape[1] else real(w)),
    "gemma2: norms without their +1": ("gemma2", "family", dict(norm_offset=0.0)),
    "gemma3: norms without their +1": ("gemma3_text", "family", dict(norm_offset=0.0)),
    "phi3: gate and up swapped": ("phi3", "gguf_tensors", _swap_gate_and_up),
}
"""Plausible mistakes in the writer, each made on purpose: the round trip must catch every one."""


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_wrong_layout_fails_the_tolerance(models, tokenizers, mistake, monkeypatch, tmp_path):
    arch, target, change = MISTAKES[mistake]
    if target == "family":
        monkeypatch.setitem(GGUF_FAMILIES, arch, dataclasses.replace(GGUF_FAMILIES[arch], **change))
    else:
        monkeypatch.setattr(gguf_export, target, change(getattr(gguf_export, target)))
    path = tmp_path / "wrong.gguf"
    write(models[arch], tokenizer_of(tokenizers, arch), path, "f16")
    assert logit_error(models[arch], tokenizer_of(tokenizers, arch), path) > TOLERANCE["q8_0"]


def _fields(path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: reader.fields[key].contents() for key in reader.fields
            if not key.startswith("tokenizer.ggml.") or key.endswith("_id") or key.endswith(("pre", "model", "_token"))}


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_the_tokenizer_chat_template_and_stops_travel_in_the_file(models, tokenizers, arch, tmp_path):
    """transformers' GGUF tokenizer cuts text into the same ids, and the file's chat template renders the prompt the
    job's model sees: `apply_chat_template`'s (ChatML), or the HH text of `render_chat` (no template)."""
    from transformers import AutoTokenizer

    tokenizer = tokenizer_of(tokenizers, arch)
    path = tmp_path / "model.gguf"
    write(models[arch], tokenizer, path, "q8_0")
    back = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    fields = _fields(path)
    for messages in [*PROMPTS, *PROBES]:
        ours = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) \
            if tokenizer.chat_template else render_chat(messages)
        theirs = back.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert theirs == ours
        ids = tokenizer(ours, add_special_tokens=False)["input_ids"]
        assert back(theirs, add_special_tokens=False)["input_ids"] == ids
    text = "Héllo wörld  \n\n 1234 😀 <|endoftext|>"
    assert back(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert fields["tokenizer.ggml.eos_token_id"] == tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False and fields["tokenizer.ggml.pre"] == "gpt-2"
    if tokenizer.chat_template:
        assert fields["tokenizer.ggml.eot_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    else:
        assert "tokenizer.ggml.eot_token_id" not in fields
    assert (fields["general.sampling.temp"], fields["general.sampling.top_k"]) == (pytest.approx(0.7), 40)


def test_families_it_cannot_write_faithfully_are_refused_naming_the_supported_ones(tokenizers, tmp_path):
    raw = tokenizers["raw"]
    with pytest.raises(GGUFExportError, match=r"gemma model .*no GGUF reader for Gemma \(1\).*supports gpt2, llama"):
        write(tiny_model("gemma", raw), raw, tmp_path / "gemma.gguf", "f16")
    # The families test's own Gemma 2: 32-wide heads, but queries scaled by 1/sqrt(256), and an untied output.
    with pytest.raises(GGUFExportError, match=r"query_pre_attn_scalar=256 differs from head_dim=32.*untied output"):
        write(tiny_model("gemma2", raw, head_dim=None, tie_word_embeddings=False), raw, tmp_path / "g2.gguf", "f16")
    from tokenizers import pre_tokenizers

    words = tokenizers["raw"].__class__.from_pretrained(TINY_TOKENIZER_DIR)
    words.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(GGUFExportError, match="byte-level BPE tokenizers"):
        write(tiny_model("llama", words), words, tmp_path / "words.gguf", "f16")
    assert not any(tmp_path.glob("*.gguf"))


def test_transformers_misses_are_reported_not_hidden(tokenizers, tmp_path):
    """A config transformers' reader cannot rebuild (the tiny preset's 256-position GPT-2) still writes a file for
    llama.cpp, and the export says it cannot be checked by loading it back."""
    raw = tokenizers["raw"]
    model = tiny_model("gpt2", raw, n_positions=256)
    write(model, raw, tmp_path / "model.gguf", "f16")
    assert gguf_export.readback_differences(tmp_path / "model.gguf", model.config) == [
        "max_position_embeddings=1024 (the model has 256)", "n_positions=1024 (the model has 256)"]


def test_llama3_rope_factors_give_transformers_frequencies():
    """`rope_freqs.weight` (Llama 3.2's rope scaling, which the reader ignores): llama.cpp divides the plain
    frequencies by it; the result must be transformers' llama3 frequencies."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = AutoConfig.for_model("llama", hidden_size=2048, num_attention_heads=32, max_position_embeddings=131072,
                                  rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                   "original_max_position_embeddings": 8192})
    plain = 1.0 / (500000.0 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64))
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    factors = gguf_export.llama3_rope_factors(config)
    torch.testing.assert_close(plain / factors, expected, rtol=1e-5, atol=0)
    assert factors.min() == 1.0 and factors.max() == 32.0  # both ends of the scaling are exercised


# --- the Modelfile ------------------------------------------------------------------------------------------------

def parse_modelfile(text: str) -> dict:
    """The commands of a Modelfile as Ollama's parser reads them: no escapes, `"..."` or `\"\"\"...\"\"\"` values
    that may span lines (github.com/ollama/ollama parser/parser.go)."""
    commands: dict = {"stop": []}
    pattern = re.compile(r'^(FROM|TEMPLATE|SYSTEM|PARAMETER)[ \t]+(?:(\w+)[ \t]+)?("""(.*?)"""|"(.*?)"|(\S+))',
                         re.MULTILINE | re.DOTALL)
    for command, parameter, _, triple, double, bare in pattern.findall(text):
        value = triple or double or bare
        if parameter == "stop":
            commands["stop"].append(value)
        else:
            commands[parameter or command] = value
    return commands


def render_go_template(template: str, messages: list[dict]) -> str:
    """What Ollama renders with `template`, for the Go template subset `TurnTemplate.go_template` writes (range
    .Messages, if / else if eq .Role, .Content, quoted string literals, plain text); anything else fails."""
    tokens = re.split(r"({{.*?}})", template)

    def action(i: int) -> str | None:
        return tokens[i][2:-2].strip() if i < len(tokens) and tokens[i].startswith("{{") else None

    def parse(i: int) -> tuple[list, int]:
        nodes: list = []
        while i < len(tokens):
            act = action(i)
            if act is None:
                nodes.append(("text", tokens[i]))
            elif act == "end" or act.startswith("else"):
                return nodes, i
            elif act == "range .Messages":
                body, i = parse(i + 1)
                assert action(i) == "end"
                nodes.append(("range", body))
            elif act.startswith("if "):
                branches = []
                while True:
                    role = re.fullmatch(r'(?:if|else if) eq \.Role "(\w+)"', action(i)).group(1)
                    body, i = parse(i + 1)
                    branches.append((role, body))
                    if action(i) == "end":
                        break
                nodes.append(("if", branches))
            elif act == ".Content":
                nodes.append(("content",))
            else:
                nodes.append(("text", json.loads(act)))  # a string literal; anything else is a JSONDecodeError
            i += 1
        return nodes, i

    def run(nodes: list, message: dict | None) -> str:
        out = []
        for node in nodes:
            if node[0] == "text":
                out.append(node[1])
            elif node[0] == "content":
                out.append(message["content"])
            elif node[0] == "range":
                out += [run(node[1], m) for m in messages]
            else:
                out.append(next((run(body, message) for role, body in node[1] if message["role"] == role), ""))
        return "".join(out)

    nodes, end = parse(0)
    assert end == len(tokens), f"unbalanced template: {template!r}"
    return run(nodes, None)


QWEN_LIKE = ("{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}"
             "{% endif %}")
"""Qwen2.5's way: a default system prompt when the conversation has none (Ollama's SYSTEM)."""
FOLDS_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\n\n' %}"
                "{% set turns = messages[1:] %}{% else %}{% set first = '' %}{% set turns = messages %}{% endif %}"
                "{% for m in turns %}{{ '<turn>' + m['role'] + '\n' + (first if loop.first else '') + m['content'] + "
                "'<end>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<turn>assistant\n' }}{% endif %}")
"""Gemma's way: the system prompt goes inside the first user turn, which an Ollama template of turns cannot say."""


@pytest.mark.parametrize("template", ["chatml", "hh", "qwen-like", "folds-system"])
def test_the_modelfile_renders_what_the_chat_template_renders(tokenizers, template):
    """Ollama, given the Modelfile's TEMPLATE and SYSTEM, builds the same prompt as the model's chat template for
    every probe conversation; a template it cannot express gets no TEMPLATE (Ollama reads the GGUF's own)."""
    from edgerlhf.modelfile import modelfile

    jinja = {"chatml": CHATML, "hh": HH_CHAT_TEMPLATE, "qwen-like": QWEN_LIKE + CHATML,
             "folds-system": FOLDS_SYSTEM}[template]
    tokenizer = tokenizers["chatml"]

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=jinja, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    turns = turn_template(render)
    stops = ["<|im_end|>", "\n\nHuman:"]
    commands = parse_modelfile(modelfile("model-q8_0.gguf", turns, stops, {"temperature": 0.7, "top_k": 40,
                                                                            "top_p": 0.9}, 256))
    assert commands["FROM"] == "./model-q8_0.gguf" and commands["stop"] == stops
    assert (commands["temperature"], commands["top_k"], commands["top_p"], commands["num_ctx"]) == \
        ("0.7", "40", "0.9", "256")
    if template == "folds-system":
        assert turns is None and "TEMPLATE" not in commands
        return
    for messages in [*PROBES, *PROMPTS]:
        if messages[0]["role"] != "system" and "SYSTEM" in commands:  # Ollama puts the Modelfile's SYSTEM first
            messages = [{"role": "system", "content": commands["SYSTEM"]}, *messages]
        assert render_go_template(commands["TEMPLATE"], messages) == render(messages, True)
    assert ("SYSTEM" in commands) == (template == "qwen-like")


# --- edgerlhf export --format gguf --------------------------------------------------------------------------------

def _finished_run(run_dir, tokenizer):
    """A run directory whose policy is a tiny ChatML GPT-2 (`sft/merged`) plus a LoRA adapter with B != 0
    (`ppo/adapter`), and whose config samples at temperature 0.7, top_k 40, top_p 0.9."""
    from edgerlhf.config import load_config

    run_dir.mkdir()
    (run_dir / "config.json").write_text(load_config("tiny", {"ppo": {"temperature": 0.7, "top_k": 40,
                                                                       "top_p": 0.9}}).to_json())
    model = tiny_model("gpt2", tokenizer)
    model.save_pretrained(run_dir / "sft" / "merged")
    tokenizer.save_pretrained(run_dir / "sft" / "merged")
    save_policy_adapter(model, run_dir)
    return run_dir


def test_edgerlhf_export_gguf_writes_the_merged_policy_a_modelfile_and_reports_sizes(tokenizers, tmp_path, capsys,
                                                                                      monkeypatch):
    from edgerlhf.cli import main as cli
    from edgerlhf.export import merged_policy

    run_dir = _finished_run(tmp_path / "job-7", tokenizers["chatml"])
    assert cli(["export", str(run_dir), "--format", "gguf", "--quant", "q8_0"]) == 0
    out, err = capsys.readouterr()
    directory = run_dir / exported_gguf("q8_0")
    assert out.splitlines()[0] == str(directory)
    assert sorted(p.name for p in directory.iterdir()) == ["Modelfile", "README.md", "model-q8_0.gguf"]
    sizes = {p.name: p.stat().st_size for p in directory.iterdir()}
    for name, size in sizes.items():
        assert re.search(rf"^  {re.escape(name)}  [\d.,]+ (B|KB|MB)$", out, re.MULTILINE), out
    assert re.search(r"needs about [\d.,]+ MB of disk and [\d.,]+ MB of memory \(an estimate\)", err), err
    assert "note:" not in err  # this one transformers rebuilds exactly

    merged, tokenizer = merged_policy(run_dir)
    sft = tiny_model("gpt2", tokenizer)
    assert logit_error(merged, tokenizer, directory / "model-q8_0.gguf") < TOLERANCE["q8_0"]
    assert logit_error(sft, tokenizer, directory / "model-q8_0.gguf") > TOLERANCE["q8_0"], \
        "the file holds the SFT model, not the merged policy"
    commands = parse_modelfile((directory / "Modelfile").read_text())
    assert (commands["temperature"], commands["top_k"], commands["top_p"]) == ("0.7", "40", "0.9")
    assert commands["stop"] == ["<|endoftext|>", "<|im_end|>"]
    readme = (directory / "README.md").read_text()
    assert "ollama create edgerlhf-job-7 -f Modelfile" in readme and "llama-cli -m model-q8_0.gguf" in readme

    # A failed re-export leaves the finished one in place and nothing half-written beside it.
    def broken(*args, **kwargs):
        (args[2]).write_bytes(b"half a file")
        raise GGUFExportError("disk full")

    monkeypatch.setattr(gguf_export, "write_gguf", broken)
    assert cli(["export", str(run_dir), "--format", "gguf", "--quant", "q8_0"]) == 1
    assert "edgerlhf export: disk full" in capsys.readouterr().err
    assert {p.name: p.stat().st_size for p in directory.iterdir()} == sizes
    assert sorted(p.name for p in directory.parent.iterdir()) == ["gguf-q8_0"]


def test_the_estimate_counts_the_weights_of_the_model_directory(tokenizers, tmp_path):
    from edgerlhf.export import GGUF_BYTES_PER_WEIGHT, estimate_export

    run_dir = _finished_run(tmp_path / "job-8", tokenizers["chatml"])
    weights = sum(p.numel() for p in tiny_model("gpt2", tokenizers["chatml"]).state_dict().values()
                  if p.dtype.is_floating_point)
    hf, q8 = estimate_export(run_dir, "hf"), estimate_export(run_dir, "gguf", "q8_0")
    f16 = estimate_export(run_dir, "gguf", "f16")
    assert hf.parameters == q8.parameters == weights
    assert hf.disk_bytes == 4 * weights  # saved in float32
    assert f16.disk_bytes - q8.disk_bytes == int(weights * 2) - int(weights * GGUF_BYTES_PER_WEIGHT["q8_0"])
    assert q8.ram_bytes > hf.disk_bytes + q8.disk_bytes
    shutil.rmtree(run_dir / "sft")
    with pytest.raises(Exception, match="run the sft stage first"):
        estimate_export(run_dir, "gguf")
