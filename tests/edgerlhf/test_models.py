"""Model loading: devices, the precision factory, random GPT-2s, offline hub ids, bitsandbytes int8/NF4 on
the CPU, and policies from a run directory."""

import math
import os

import pytest
import torch

from edgerlhf.config import TINY_TOKENIZER_DIR, ModelConfig
from edgerlhf.errors import MissingPrerequisite
from edgerlhf.models import (ModelLoadError, compute_dtype, head_logits, load_base_model, load_causal_lm,
                             load_policy, load_tokenizer, quantization_config, random_model, resolve_device)

TINY = ModelConfig(name_or_path="tiny", tokenizer=TINY_TOKENIZER_DIR, random_init=True,
                   n_layer=1, n_head=2, n_embd=32, n_positions=128)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_TOKENIZER_DIR)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-model")
    model = random_model(TINY, tokenizer, seed=0)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto") == torch.device(expected)
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA device"):
            resolve_device("cuda")
        assert compute_dtype("cpu") == torch.float32


def test_quantization_config_factory():
    assert quantization_config("bf16") is None
    int8 = quantization_config("int8")
    assert int8.load_in_8bit and not int8.load_in_4bit
    int4 = quantization_config("int4", torch.bfloat16)
    assert int4.load_in_4bit and int4.bnb_4bit_quant_type == "nf4"
    assert int4.bnb_4bit_compute_dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown precision"):
        quantization_config("fp8")


def test_tokenizer_pads_with_eos(tokenizer):
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.padding_side == "right"
    assert load_tokenizer(TINY_TOKENIZER_DIR, padding_side="left").padding_side == "left"


def test_random_base_model_shape_and_determinism(tokenizer):
    a = load_base_model(TINY, "cpu", tokenizer=tokenizer, seed=3)
    b = load_base_model(TINY, "cpu", tokenizer=tokenizer, seed=3)
    c = load_base_model(TINY, "cpu", tokenizer=tokenizer, seed=4)
    assert a.config.n_layer == 1 and a.config.n_embd == 32 and a.config.vocab_size == len(tokenizer)
    assert torch.equal(a.transformer.h[0].attn.c_attn.weight, b.transformer.h[0].attn.c_attn.weight)
    assert not torch.equal(a.transformer.h[0].attn.c_attn.weight, c.transformer.h[0].attn.c_attn.weight)
    # untied head; sinusoidal positions (position 0: sin 0 = 0, cos 0 = 1, times the init std)
    assert a.lm_head.weight.data_ptr() != a.transformer.wte.weight.data_ptr()
    wpe = a.transformer.wpe.weight
    assert torch.allclose(wpe[0, 0::2], torch.zeros(16)) and torch.allclose(wpe[0, 1::2], torch.full((16,), 0.1))
    assert math.isclose(wpe[1, 0].item(), 0.1 * math.sin(1.0), rel_tol=1e-5)


@pytest.mark.timeout(60)
def test_offline_hub_id_fails_at_once_with_advice():
    with pytest.raises(ModelLoadError) as info:
        load_base_model(ModelConfig(name_or_path="distilgpt2"))
    message = str(info.value)
    assert "'distilgpt2'" in message and "hub cannot be reached" in message
    assert "model.name_or_path" in message and "local directory" in message
    with pytest.raises(ModelLoadError, match="hub cannot be reached"):
        load_tokenizer("openai-community/gpt2")


@pytest.mark.timeout(90)
def test_gated_hub_model_asks_for_hf_token(tmp_path):
    """Against a stand-in hub (HF_ENDPOINT) that answers like huggingface.co does for a gated repository
    without a token (401 + `X-Error-Code: GatedRepo`), the real huggingface_hub client raises its
    GatedRepoError, and loading says what to do at once."""
    import http.server
    import subprocess
    import sys
    import threading

    class GatedHub(http.server.BaseHTTPRequestHandler):
        def _gated(self):
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("X-Error-Message", "Access to model meta-llama/Llama-3.2-1B-Instruct is restricted.")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = _gated

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), GatedHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    code = ("from edgerlhf.models import load_base_model\nfrom edgerlhf.config import ModelConfig\n"
            "load_base_model(ModelConfig(name_or_path='meta-llama/Llama-3.2-1B-Instruct'))")
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_HOME": str(tmp_path)}
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):  # the suite runs offline (conftest)
        env.pop(name, None)
    try:
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=80)
    finally:
        server.shutdown()
    assert out.returncode != 0
    assert "ModelLoadError" in out.stderr and "gated" in out.stderr and "HF_TOKEN" in out.stderr, out.stderr[-2000:]


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="is not a directory"):
        load_base_model(ModelConfig(name_or_path=str(tmp_path / "missing")))
    with pytest.raises(ModelLoadError, match="random_init model cannot be loaded quantized"):
        load_base_model(TINY, precision="int8")


@pytest.mark.parametrize("precision, layer", [("int8", "Linear8bitLt"), ("int4", "Linear4bit")])
def test_bitsandbytes_load_and_run_on_cpu(saved_tiny, precision, layer):
    full = load_causal_lm(saved_tiny, "cpu", "bf16")
    quant = load_causal_lm(saved_tiny, "cpu", precision)
    assert type(quant.transformer.h[0].attn.c_attn).__name__ == layer
    assert quant.get_memory_footprint() < full.get_memory_footprint()
    ids = torch.randint(0, 50000, (2, 12))
    with torch.no_grad():
        ref, out = full(ids).logits, quant(ids).logits  # (2, 12, V)
    assert torch.isfinite(out).all()
    # quantization perturbs the logits, but they must still track the full-precision model's
    corr = torch.corrcoef(torch.stack([ref.flatten(), out.flatten()]))[0, 1]
    assert corr > 0.9


def test_load_policy_sft_and_ppo(tmp_path, saved_tiny, tokenizer):
    from peft import LoraConfig, get_peft_model

    with pytest.raises(MissingPrerequisite, match="run the sft stage first"):
        load_policy(tmp_path, "sft")
    import shutil

    shutil.copytree(saved_tiny, tmp_path / "sft" / "merged")
    model, tok = load_policy(tmp_path, "sft", "cpu")
    assert tok.padding_side == "left" and not model.training
    enc = tok(["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: a longer question here\n\nAssistant:"],
              return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[0] == 2 and out.shape[1] <= enc["input_ids"].shape[1] + 4

    with pytest.raises(MissingPrerequisite, match="run the ppo stage first"):
        load_policy(tmp_path, "ppo")
    torch.manual_seed(0)
    peft = get_peft_model(random_model(TINY, tokenizer, seed=0),
                          LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True, task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_()
    peft.save_pretrained(tmp_path / "ppo" / "adapter")
    ppo, _ = load_policy(tmp_path, "ppo", "cpu")
    sft, _ = load_policy(tmp_path, "sft", "cpu")
    ids = enc["input_ids"][:1]
    with torch.no_grad():
        assert not torch.allclose(ppo(ids).logits, sft(ids).logits)  # the adapter is applied (merged)


def test_load_policy_base_for_random_init_needs_base_dir(tmp_path):
    from edgerlhf.config import load_config

    (tmp_path / "config.json").write_text(load_config("tiny").to_json())
    with pytest.raises(MissingPrerequisite, match="saved by the sft stage.*run the sft stage first"):
        load_policy(tmp_path, "base")


@pytest.mark.parametrize("family, transform", [
    ("gemma2", {"final_logit_softcapping": 0.5}),  # a cap the random logits reach
    ("cohere", {"logit_scale": 3.0}),
    ("granite", {"logits_scaling": 4.0}),
    ("llama", {}),
])
def test_head_logits_are_the_models_own(family, transform):
    """The losses computed from hidden states (SFT's, the warm-up's, DPO's CPU head) see the logits the model's
    forward gives: its output layer plus the family's scale and soft cap."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=8, **transform)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    input_ids = torch.randint(0, 64, (2, 7))
    with torch.no_grad():
        own = model(input_ids=input_ids).logits
        hidden = model.base_model(input_ids=input_ids).last_hidden_state
        torch.testing.assert_close(head_logits(model, hidden), own.float())
        if transform:  # the transform matters here: the bare output layer gives other logits
            assert not torch.allclose(model.get_output_embeddings()(hidden), own, atol=1e-3)
