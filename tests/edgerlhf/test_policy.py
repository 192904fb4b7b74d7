"""The alignment stage's one network (`edgerlhf.align.policy`): what the optimizer is given is exactly the policy
adapter, whichever layers it adapts."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from edgerlhf.align.policy import POLICY, PolicyModels, add_policy_adapter, is_policy_lora
from edgerlhf.architectures import random_config
from edgerlhf.config import load_config
from tests.support.policies import ScaledPolicy


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


def test_the_evaluation_kl_of_a_sharpening_policy_rises_with_the_sharpening():
    """The KL the evaluation reports (`sequence_kl`) on a fixed set of rollouts, with the preset's top-k 50 and
    top-p 0.95: 0 for the unchanged policy, then rising with alpha. On the sampler's support it peaked and fell
    once most positions had one token above top_p (issue 27: 2.2, then 0.9, as the true KL rose)."""
    from edgerlhf.align.policy import sequence_kl
    from edgerlhf.config import TINY_TOKENIZER_DIR
    from edgerlhf.generation import Sampling, generate
    from edgerlhf.models import load_tokenizer, random_model

    config = load_config("tiny", {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32, "n_positions": 64}})
    tokenizer = load_tokenizer(TINY_TOKENIZER_DIR)
    base = random_model(config.model, tokenizer, seed=0).eval()
    with torch.no_grad():
        base.lm_head.weight.mul_(40.0)  # logits with a std of a few units, as a trained LM has
    model = add_policy_adapter(base, config).eval()
    torch.manual_seed(0)
    rollouts = generate(model, tokenizer, ["\n\nHuman: Hi\n\nAssistant:", "\n\nHuman: Why?\n\nAssistant:"] * 2, 12,
                        Sampling.of(config.ppo))
    models = PolicyModels(model, None, None, tokenizer, torch.device("cpu"), reward_shared=False)
    kls = [sequence_kl(ScaledPolicy.of(models, alpha), rollouts, config.ppo, 2).mean().item()
           for alpha in (1.0, 1.5, 2.0, 3.0, 5.0, 8.0)]
    assert kls[0] == 0.0 and all(b > a for a, b in zip(kls, kls[1:])), kls
