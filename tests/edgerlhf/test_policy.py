"""The alignment stage's one network (`edgerlhf.align.policy`): what the optimizer is given is exactly the policy
adapter, whichever layers it adapts."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from edgerlhf.align.policy import POLICY, PolicyModels, add_policy_adapter, is_policy_lora
from edgerlhf.architectures import random_config
from edgerlhf.config import load_config


def test_the_policy_parameters_include_an_adapted_embedding():
    """`sft.target_modules` may name the token embedding: peft names its LoRA `...embed_tokens.lora_embedding_A.policy`
    (the adapter's name last), and those weights are trainable, so the optimizer must get them too."""
    config = load_config("tiny", {"model": {"architecture": "llama", "n_layer": 1, "n_head": 2, "n_embd": 32,
                                            "intermediate_size": 64},
                                  "sft": {"target_modules": ["q_proj", "v_proj", "embed_tokens"]}})
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(random_config(config.model, vocab_size=128))
    model = add_policy_adapter(base, config)
    models = PolicyModels(model, None, None, None, torch.device("cpu"), reward_shared=False)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    given = {id(p) for p in models.policy_parameters()}
    assert any("lora_embedding_A" in n for n in trainable)
    assert {n for n, p in model.named_parameters() if id(p) in given} == trainable
    assert is_policy_lora(f"base_model.model.model.embed_tokens.lora_embedding_B.{POLICY}")
    assert not is_policy_lora("base_model.model.model.embed_tokens.lora_embedding_B.reward")
    assert not is_policy_lora("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight")
