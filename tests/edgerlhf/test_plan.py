"""The memory planner (`edgerlhf.plan`): its arithmetic against real models, its monotonicity, the one-copy
PPO design, the alignment stage per algorithm (PPO's value head, a reward function, DPO's own step), the
cheapest-change suggestions, and the `edgerlhf plan` command.

The architecture terms are checked against models built for real (parameter counts, LoRA sizes, the bytes
bitsandbytes holds for int8 and nf4 weights, what PPO's `build_models` holds); the measured-peak check of
whole stages is `test_plan_check.py`.
"""

from __future__ import annotations

import json

import pytest
import torch

from edgerlhf import cli, plan
from edgerlhf.architectures import random_config
from edgerlhf.config import TINY_TOKENIZER_DIR, ModelConfig, load_config
from edgerlhf.contract import ALGORITHMS, merge_overrides
from edgerlhf.plan import GiB, MiB, Architecture, MemoryPlan, lora_params, network_bytes

QWEN = "qwen2.5-0.5b-8gb"


def stage(result: MemoryPlan, name: str):
    return next(s for s in result.stages if s.stage == name)


def tensor_peak(preset: str, overrides: dict, name: str, device: str = "cuda") -> int:
    return stage(plan.plan(load_config(preset, overrides), device=device), name).tensor_bytes


def held(model) -> int:
    """Bytes of every parameter and buffer of `model`, each storage once."""
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


# --- the architecture, against real models -------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3"])
def test_parameter_and_lora_counts_match_the_real_model(family):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from edgerlhf.models import lora_config

    cfg = ModelConfig(random_init=True, architecture=family, n_layer=2, n_head=4, n_kv_head=2 if family != "gpt2" else None,
                      n_embd=64, intermediate_size=96, n_positions=128, vocab_size=1000)
    hf = random_config(cfg, 1000)
    arch = Architecture.of(hf)
    model = AutoModelForCausalLM.from_config(hf)
    assert arch.parameters() == sum(p.numel() for p in model.parameters()), family
    for targets in (["all-linear"], [arch.linears()[0].name.split(".")[-1]]):
        peft_model = get_peft_model(model, lora_config(model, 4, 8, targets))
        trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
        assert lora_params(arch, targets, 4) == trainable, (family, targets)
        model = peft_model.unload()


@pytest.mark.parametrize("precision", ["int8", "int4"])
def test_quantized_weight_bytes_are_what_bitsandbytes_holds(tmp_path, precision):
    from edgerlhf.models import load_causal_lm, load_tokenizer, random_model

    cfg = ModelConfig(random_init=True, architecture="llama", n_layer=2, n_head=4, n_embd=128, intermediate_size=256)
    model = random_model(cfg, load_tokenizer(TINY_TOKENIZER_DIR))
    model.save_pretrained(tmp_path)
    arch = Architecture.of(model.config)
    plain = held(model)
    assert network_bytes(arch, "bf16", 4) == pytest.approx(plain, rel=0.001)
    quantized = held(load_causal_lm(tmp_path, "cpu", precision))
    assert network_bytes(arch, precision, 4) == pytest.approx(quantized, rel=0.02), precision
    assert quantized < plain


def test_ppo_holds_what_build_models_holds_one_copy_shared_or_one_quantized_copy_more(tmp_path):
    """The planner's PPO weights are the network `align.policy.build_models` really loads: one copy with a bf16
    reward adapter, plus one int8 reward copy without `quantized_policy`."""
    from edgerlhf import memory
    from edgerlhf.align.policy import build_models
    from tests.support.tiny import make_tiny_run

    run_dir = make_tiny_run(tmp_path, precisions=("bf16", "int8"))
    for precision in ("bf16", "int8"):
        config = load_config("tiny", {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32},  # make_tiny_run's model
                                      "reward": {"precisions": ["bf16", "int8"], "lora_r": 4,
                                                 "adapt_embedding": False},  # make_tiny_run's adapter
                                      "ppo": {"reward_precision": precision, "lora_r": 4}})
        before = memory.tensor_bytes("cpu")
        models = build_models(config, run_dir, torch.device("cpu"))
        measured = memory.tensor_bytes("cpu") - before
        planned = stage(plan.plan(config, device="cpu"), "ppo")
        weights = sum(i.bytes for i in planned.items if "weights" in i.name or "LoRA" in i.name)
        adam = 12 * sum(p.numel() for p in models.policy_parameters())  # made by the first optimizer step
        assert weights - adam == pytest.approx(measured, rel=0.05), precision
        names = [i.name for i in planned.items if "weights" in i.name]
        assert len(names) == (1 if precision == "bf16" else 2), names
        del models


# --- the arithmetic ----------------------------------------------------------------------------------


def test_peaks_grow_with_batch_and_length():
    for name, section, key, values in [("sft", "sft", "batch_size", (1, 2, 4, 8)),
                                       ("sft", "sft", "max_length", (64, 128, 256)),
                                       ("reward/bf16", "reward", "batch_size", (1, 2, 4)),
                                       ("ppo", "ppo", "mini_batch_size", (1, 2, 4, 8)),
                                       ("ppo", "ppo", "response_length", (16, 32, 64, 128)),
                                       ("evaluate", "evaluate", "response_length", (16, 64, 256))]:
        peaks = [tensor_peak(QWEN, {section: {key: v}}, name) for v in values]
        assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks), (name, key, peaks)


def test_four_bit_below_eight_bit_below_bf16_and_the_cpu_counts_fp32():
    result = plan.plan(load_config(QWEN))
    weights = {p: next(i.bytes for i in stage(result, f"reward/{p}").items if "weights" in i.name)
               for p in ("bf16", "int8", "int4")}
    assert weights["int4"] < weights["int8"] < weights["bf16"]
    arch = plan.architecture(load_config(QWEN))
    assert weights["bf16"] == network_bytes(arch, "bf16", 2, lm_head=False)
    assert network_bytes(arch, "bf16", 4) == 2 * network_bytes(arch, "bf16", 2)
    assert tensor_peak(QWEN, {}, "ppo", device="cpu") > tensor_peak(QWEN, {}, "ppo", device="cuda")


def test_one_network_ppo_is_far_below_the_naive_layout_and_a_4bit_policy_lower_still():
    config = load_config(QWEN)
    arch = plan.architecture(config)
    ppo = stage(plan.plan(config), "ppo")
    network = network_bytes(arch, "bf16", 2)
    weights = [i for i in ppo.items if "weights" in i.name]
    assert [i.bytes for i in weights] == [network], "policy, reference and reward share one network"
    # Naive PPO holds policy, reference, value and reward networks: three more copies than ours.
    assert ppo.tensor_bytes + 3 * network > 1.5 * ppo.tensor_bytes
    separate = stage(plan.plan(load_config(QWEN, {"ppo": {"reward_precision": "int4"}})), "ppo")
    assert separate.tensor_bytes - ppo.tensor_bytes == pytest.approx(network_bytes(arch, "int4", 2, lm_head=False),
                                                                     rel=0.01), "one nf4 reward copy more"
    shared_4bit = stage(plan.plan(load_config(QWEN, {"ppo": {"reward_precision": "int4", "quantized_policy": True}})),
                        "ppo")
    assert shared_4bit.tensor_bytes < ppo.tensor_bytes < separate.tensor_bytes


def test_gradient_checkpointing_keeps_only_layer_inputs():
    """The what-if figure of every training stage is below its plan, and is the plan once the stage's
    `gradient_checkpointing` is on (for DPO too)."""
    result = plan.plan(load_config(QWEN))
    on = {section: {"gradient_checkpointing": True} for section in ("sft", "reward", "ppo", "dpo", "kto")}
    checkpointed = plan.plan(load_config(QWEN, on))
    for s, c in zip(result.stages, checkpointed.stages, strict=True):
        if s.stage != "evaluate":
            assert s.checkpointing_peak_bytes < s.peak_bytes, s.stage
            assert c.peak_bytes == c.checkpointing_peak_bytes == s.checkpointing_peak_bytes, s.stage
            assert any("checkpointed" in i.note for i in c.items if i.name == "activations"), s.stage
        else:
            assert c.peak_bytes == s.peak_bytes
    dpo = stage(plan.plan(load_config(QWEN, {"algorithm": "dpo"})), "ppo")
    dpo_on = stage(plan.plan(load_config(QWEN, {"algorithm": "dpo", **on})), "ppo")
    assert dpo_on.peak_bytes == dpo.checkpointing_peak_bytes < dpo.peak_bytes


def test_the_gpu_total_adds_the_cuda_context_and_slack_the_cpu_none():
    config = load_config(QWEN)
    gpu, cpu = plan.plan(config, 8 * GiB), plan.plan(config, 8 * GiB, device="cpu")
    s = stage(gpu, "ppo")
    assert s.peak_bytes == int(s.tensor_bytes * (1 + plan.ALLOCATOR_SLACK) + plan.CUDA_CONTEXT_BYTES)
    assert {i.name for i in s.items} >= {"CUDA context", "allocator slack"}
    assert all(c.fits is None and c.peak_bytes == c.tensor_bytes for c in cpu.stages)
    assert cpu.fits is None and "never refused" in cpu.note and gpu.fits is True


def test_a_stage_that_does_not_fit_names_the_cheapest_change_and_the_change_fits():
    config = load_config(QWEN, {"ppo": {"mini_batch_size": 8}})
    gpu = 4 * GiB
    result = plan.plan(config, gpu)
    ppo = stage(result, "ppo")
    assert result.fits is False and ppo.fits is False
    assert ppo.suggestion.change.startswith("ppo.mini_batch_size 8 -> ")  # the same maths, only slower
    assert ppo.suggestion.overrides["ppo"]["grad_accum"] * ppo.suggestion.overrides["ppo"]["mini_batch_size"] == 8
    fixed = load_config(QWEN, {"ppo": {"mini_batch_size": 8}, **ppo.suggestion.overrides})
    assert stage(plan.plan(fixed, gpu), "ppo").fits is True
    assert stage(plan.plan(fixed, gpu), "ppo").peak_bytes == ppo.suggestion.peak_bytes
    # Without a micro-batch left to halve: gradient checkpointing when it is enough, else a 4-bit network;
    # nothing when even that is too big.
    tight = {"ppo": {"mini_batch_size": 1, "grad_accum": 1, "batch_size": 16, "response_length": 16}}
    figures = stage(plan.plan(load_config(QWEN, tight)), "ppo")
    s = stage(plan.plan(load_config(QWEN, tight), figures.checkpointing_peak_bytes + MiB), "ppo")
    assert s.fits is False and s.suggestion.overrides == {"ppo": {"gradient_checkpointing": True}}
    fixed = load_config(QWEN, merge_overrides(tight, s.suggestion.overrides))
    assert stage(plan.plan(fixed, figures.checkpointing_peak_bytes + MiB), "ppo").fits is True
    short = load_config(QWEN, {**tight, "data": {"max_prompt_tokens": 32}})
    s = stage(plan.plan(short, int(1.5 * GiB)), "ppo")
    assert s.fits is False and s.suggestion is not None and "4-bit policy" in s.suggestion.change, s.suggestion
    assert s.suggestion.overrides["ppo"] == {"quantized_policy": True, "reward_precision": "int4"}
    assert "int4" in s.suggestion.overrides["reward"]["precisions"]
    nothing = stage(plan.plan(short, GiB // 2), "ppo")
    assert nothing.fits is False and nothing.suggestion is None


def test_parse_size():
    assert plan.parse_size("8GiB") == plan.parse_size("8 GB") == plan.parse_size("8g") == 8 * GiB
    assert plan.parse_size("12288MiB") == plan.parse_size("12288 MB") == 12 * GiB
    assert plan.parse_size("7.5GiB") == int(7.5 * GiB)
    for bad in ("8", "eight GB", "8TB", ""):
        with pytest.raises(ValueError):
            plan.parse_size(bad)


# --- the command -------------------------------------------------------------------------------


def test_edgerlhf_plan_prints_a_table_and_says_fits_per_stage(capsys):
    assert cli.main(["plan", "--preset", QWEN, "--gpu-memory", "8GiB"]) == 0
    out = capsys.readouterr().out
    assert "Checked against 8.00 GiB" in out
    for name in ("sft", "reward/bf16", "reward/int8", "reward/int4", "ppo", "evaluate"):
        row = next(line for line in out.splitlines() if line.startswith(name + " "))
        assert row.split()[4] == "yes", row
    assert "activations" in out and "logits" in out and "CUDA context" in out and "allocator slack" in out


def test_edgerlhf_plan_exits_1_and_suggests_a_change_when_a_stage_does_not_fit(capsys):
    assert cli.main(["plan", "--preset", QWEN, "--set", "ppo.mini_batch_size=8", "--gpu-memory", "4GiB"]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("ppo "))
    assert row.split()[4] == "NO", row
    assert "does not fit; cheapest change that fits: ppo.mini_batch_size 8 -> " in out


def test_edgerlhf_plan_json_and_cpu_and_bad_input(capsys):
    assert cli.main(["plan", "--preset", "tiny", "--json"]) == 0
    result = MemoryPlan.model_validate(json.loads(capsys.readouterr().out))
    assert result.device == "cpu" and result.compute_dtype == "float32" and result.fits is None
    assert [s.stage for s in result.stages] == ["sft", "reward/bf16", "reward/int8", "reward/int4", "ppo", "evaluate"]
    assert cli.main(["plan", "--preset", QWEN, "--gpu-memory", "lots"]) == 2
    assert cli.main(["plan", "--preset", QWEN, "--set", "ppo.mini_batch_size=0"]) == 2
    assert "mini_batch_size" in capsys.readouterr().err
    assert MiB * 1024 == GiB


# --- the alignment stage per algorithm ---------------------------------------------------------------


def test_grpo_and_rloo_plan_no_value_head_and_no_hidden_states_ppo_does():
    arch = plan.architecture(load_config(QWEN))
    trainable = {}
    for algorithm in ("ppo", "grpo", "rloo"):
        s = stage(plan.plan(load_config(QWEN, {"algorithm": algorithm})), "ppo")
        assert f"{algorithm.upper()} update" in s.phases and ("PPO update" in s.phases) == (algorithm == "ppo")
        trainable[algorithm] = next(i for i in s.items if "policy LoRA" in i.name)
        assert ("value head" in trainable[algorithm].name) == (algorithm == "ppo"), trainable[algorithm].name
    # The value head's parameters are the only trainable difference; PPO's log-prob pass also keeps the
    # hidden states of every layer, GRPO's does not.
    assert trainable["ppo"].bytes - trainable["grpo"].bytes == (arch.hidden + 1) * plan.TRAINABLE_BYTES
    cfg = load_config(QWEN, {"ppo": {"mini_batch_size": 4}})
    m, seq = 4, plan._lengths(cfg, arch)[0] + cfg.ppo.response_length
    hidden = (arch.n_layer + 1) * m * seq * arch.hidden * 2
    ppo = stage(plan.plan(cfg), "ppo").phases["policy log-probs"]
    grpo = stage(plan.plan(load_config(QWEN, {"algorithm": "grpo", "ppo": {"mini_batch_size": 4}})), "ppo")
    assert ppo - grpo.phases["policy log-probs"] == hidden + trainable["ppo"].bytes - trainable["grpo"].bytes
    # Rows per step are ppo.batch_size, however many samples per prompt.
    kv = [stage(plan.plan(load_config(QWEN, {"algorithm": "grpo", "ppo": {"samples_per_prompt": k}})),
                "ppo").phases["rollout generation"] for k in (2, 4, 8)]
    assert len(set(kv)) == 1


def test_a_reward_function_plans_no_reward_adapter_copy_or_scoring_pass():
    with_model = plan.plan(load_config(QWEN, {"ppo": {"reward_precision": "int8"}}))
    function = plan.plan(load_config(QWEN, {"ppo": {"reward_precision": "int8", "reward_function": "question"}}))
    for name in ("ppo", "evaluate"):
        before, after = stage(with_model, name), stage(function, name)
        assert "reward scoring" in before.phases and "reward scoring" not in after.phases, name
        assert any("reward copy" in i.name for i in before.items), name
        assert not any("reward" in i.name for i in after.items), [i.name for i in after.items]
        assert after.tensor_bytes < before.tensor_bytes


def test_dpo_plans_its_own_step_from_the_dpo_fields_not_ppos():
    def dpo_peak(overrides: dict) -> int:
        return tensor_peak(QWEN, merge_overrides({"algorithm": "dpo"}, overrides), "ppo")

    s = stage(plan.plan(load_config(QWEN, {"algorithm": "dpo"})), "ppo")
    assert s.phase.startswith("DPO ") and "rollout generation" not in s.phases and "probe generation" in s.phases
    assert not any("reward" in i.name or "value head" in i.name for i in s.items), [i.name for i in s.items]
    for key, values in (("batch_size", (1, 2, 4, 8)), ("max_length", (64, 128, 256))):
        peaks = [dpo_peak({"dpo": {key: v}}) for v in values]
        assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks), (key, peaks)
    assert dpo_peak({"dpo": {"lora_r": 64}}) > dpo_peak({"dpo": {"lora_r": 8}})
    # The sampling fields leave DPO's training step alone (ppo.response_length only sizes the probes).
    base = dpo_peak({})
    assert base == dpo_peak({"ppo": {"batch_size": 64, "mini_batch_size": 16}})
    assert base == dpo_peak({"ppo": {"response_length": 16}})


def test_a_dpo_stage_that_does_not_fit_is_offered_dpo_changes():
    too_big = {"algorithm": "dpo", "dpo": {"batch_size": 8, "grad_accum": 1}}  # 8 pairs at once
    s = stage(plan.plan(load_config(QWEN, too_big), 8 * GiB), "ppo")
    assert s.fits is False and s.suggestion.change.startswith("dpo.batch_size 8 -> "), s.suggestion
    fixed = load_config(QWEN, merge_overrides(too_big, s.suggestion.overrides))
    assert fixed.dpo.batch_size * fixed.dpo.grad_accum == 8
    assert stage(plan.plan(fixed, 8 * GiB), "ppo").fits is True


def test_a_dpo_run_without_a_reward_stage_is_evaluated_without_a_reward_model():
    stages = ["data", "sft", "ppo", "evaluate"]
    without = stage(plan.plan(load_config(QWEN, {"algorithm": "dpo", "stages": stages})), "evaluate")
    scored = stage(plan.plan(load_config(QWEN, {"algorithm": "dpo"})), "evaluate")
    assert "reward scoring" not in without.phases and "reward scoring" in scored.phases
    assert not any("value head" in i.name or "hidden states" in i.name for i in scored.items)


def test_the_dpo_chunk_is_the_one_the_stage_uses():
    from edgerlhf.align import dpo

    assert plan.KL_CHUNK == dpo.KL_CHUNK


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_8gb_preset_fits_8_gib_whatever_the_algorithm(algorithm):
    from edgerlhf.config import PRESETS

    for name in (n for n in PRESETS if n.endswith("-8gb")):
        result = plan.plan(load_config(name, {"algorithm": algorithm}), 8 * GiB)
        assert result.fits, (name, [(s.stage, round(s.peak_bytes / GiB, 2)) for s in result.stages if not s.fits])


def test_a_judge_served_on_the_same_gpu_counts_in_the_stages_that_ask_it():
    """A GRPO job judged by a finished job's model on the service's own /v1: that model's bf16 weights, its KV cache
    and the backend's CUDA context count in the alignment and the evaluation, not in SFT; a judge elsewhere adds
    nothing; a suggestion is checked with the judge counted."""
    judge = {"kind": "judge", "url": "http://127.0.0.1:8000/v1", "model": "job-7/ppo", "concurrency": 2}
    config = load_config(QWEN, {"algorithm": "grpo", "ppo": {"rewards": [judge]}})
    alone = plan.plan(config, 8 * GiB)
    judged = load_config(QWEN, {})  # the served job: the same 0.5B architecture
    served = plan.plan(config, 8 * GiB, served={"job-7/ppo": judged})
    weights = network_bytes(plan.architecture(judged), "bf16", 2)
    for name in ("ppo", "evaluate"):
        added = stage(served, name).tensor_bytes - stage(alone, name).tensor_bytes
        assert weights + plan.CUDA_CONTEXT_BYTES < added < weights + plan.CUDA_CONTEXT_BYTES + 256 * MiB, name
        assert any(i.name.startswith("judge job-7/ppo") for i in stage(served, name).items)
    assert stage(served, "sft").peak_bytes == stage(alone, "sft").peak_bytes
    elsewhere = plan.plan(config, 8 * GiB, served={"job-9/ppo": judged})  # another model is served: not this judge
    assert stage(elsewhere, "ppo").peak_bytes == stage(alone, "ppo").peak_bytes
    tight = stage(plan.plan(config, stage(served, "ppo").peak_bytes - MiB, served={"job-7/ppo": judged}), "ppo")
    assert tight.fits is False and tight.suggestion is not None
    fixed = load_config(QWEN, merge_overrides({"algorithm": "grpo", "ppo": {"rewards": [judge]}},
                                              tight.suggestion.overrides))
    assert tight.suggestion.peak_bytes == stage(plan.plan(fixed, served={"job-7/ppo": judged}), "ppo").peak_bytes
    assert tight.suggestion.peak_bytes > stage(plan.plan(fixed), "ppo").peak_bytes  # the judge still counted in it
