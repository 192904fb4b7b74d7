"""The planner against measured memory: the real stages (`pipeline.run_stage` of sft, reward, ppo) run on
tiny random models with the planner's worst-case data, their peak of live tensor storage measured by
`plan_check.TensorPeak`, each within +-20 % of the plan; the alignment stage as PPO, as DPO and as GRPO with a
reward function. The full table is `python -m edgerlhf.lab.plan_check`.
"""

from __future__ import annotations

import pytest
import torch

from edgerlhf import plan
from edgerlhf.lab import plan_check
from edgerlhf.config import load_config
from edgerlhf.contract import merge_overrides

TINY_RUNS = {
    # GPT-2 with the tiny preset's untied output layer trained in full beside LoRA on c_attn + c_proj; enough
    # labelled and response positions that the vocabulary-sized logits outweigh the weights.
    "gpt2": {"model": {"architecture": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128},
             "data": {"max_prompt_tokens": 48, "max_response_tokens": 16},
             "sft": {"batch_size": 8, "max_length": 96},
             "reward": {"precisions": ["bf16"], "batch_size": 2, "max_length": 96},
             "ppo": {"batch_size": 8, "mini_batch_size": 4, "response_length": 16}},
    # Llama with LoRA on every linear, deep and long enough that activations outweigh the weights in training.
    "llama": {"model": {"architecture": "llama", "n_layer": 4, "n_head": 4, "n_embd": 128, "intermediate_size": 384,
                        "n_positions": 192, "tie_word_embeddings": True},
              "data": {"max_prompt_tokens": 96, "max_response_tokens": 16},
              "sft": {"batch_size": 4, "max_length": 128, "target_modules": ["all-linear"],
                      "modules_to_save": []},
              "reward": {"precisions": ["bf16"], "batch_size": 4, "max_length": 128},
              "ppo": {"batch_size": 4, "mini_batch_size": 4, "response_length": 16}},
    # DPO (TRL's DPOTrainer, the CPU's answer-only log-prob head, `chosen_kl`) after SFT, with no reward stage: the
    # answer positions' log-softmax of policy and reference dominate its step.
    "dpo": {"algorithm": "dpo", "stages": ["data", "sft", "ppo"],
            "model": {"architecture": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128},
            "data": {"max_prompt_tokens": 48, "max_response_tokens": 16},
            "sft": {"batch_size": 4, "max_length": 96},
            "dpo": {"batch_size": 4, "max_length": 96, "lora_r": 8}},
    # GRPO scored by a gold function: no value head, no reward model. Short responses keep the logits small, so a
    # plan that still counted the int4 reward copy `reward.precisions` names (a third of the peak) falls outside.
    "grpo-function": {"algorithm": "grpo", "stages": ["data", "sft", "ppo"],
                      "model": {"architecture": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "n_positions": 128},
                      "data": {"max_prompt_tokens": 48, "max_response_tokens": 16},
                      "sft": {"batch_size": 4, "max_length": 96},
                      "reward": {"precisions": ["int4"]},
                      "ppo": {"batch_size": 8, "samples_per_prompt": 4, "mini_batch_size": 2, "response_length": 8,
                              "reward_function": "question"}},
}
TINY_RUNS["llama-checkpointing"] = merge_overrides(TINY_RUNS["llama"], plan_check.CHECKPOINTING)
"""Small configurations of the real stages (two optimizer steps, as `plan_check.SMALL`: AdamW's moments
exist from the first step on): seconds each on a CPU core, and in each stage the terms other than the
weights (activations, logits, passes) are about half the peak or more, so a planning error in them shows
beyond the +-20 % tolerance."""


def test_tensor_peak_counts_live_storages_once():
    a = torch.zeros(1000)  # alive before: counted at entry, not in the stage's peak
    with plan_check.TensorPeak() as meter:
        b = torch.ones(2000)
        view = b[:10]  # a view adds no storage
        c = b * 2  # 8,000 more bytes: the peak
        del b, c
        d = torch.ones(500)
    assert meter.stage_peak == 8_000 + 8_000  # b and c
    assert meter.current - meter.start == 8_000 + 2_000  # the view keeps b's storage alive; d
    assert a.numel() and view.numel() and d.numel()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """`tiny_run(name)`: (run directory, config, planned and measured tensor bytes per stage) of
    `TINY_RUNS[name]`, each configuration run once for the module."""
    runs = {}

    def run(name: str):
        if name not in runs:
            torch.set_num_threads(1)
            config = load_config("tiny", merge_overrides(plan_check.SMALL, TINY_RUNS[name]))
            planned = {s.stage: s.tensor_bytes for s in plan.plan(config, device="cpu").stages}
            run_dir = tmp_path_factory.mktemp(name)
            measured = plan_check.measure(config, run_dir, [s for s in ("sft", "reward", "ppo") if s in config.stages])
            runs[name] = run_dir, config, planned, measured
        return runs[name]

    return run


@pytest.mark.parametrize("name", sorted(TINY_RUNS))
def test_measured_stage_peaks_are_within_20_percent_of_the_plan(tiny_run, name):
    _, config, planned, measured = tiny_run(name)
    assert set(measured) == {"sft", "ppo"} | ({"reward/bf16"} if "reward" in config.stages else set())
    ratios = {stage: planned[stage] / value for stage, value in measured.items()}
    assert all(abs(r - 1) <= plan_check.TOLERANCE for r in ratios.values()), ratios


def test_gradient_checkpointing_saves_memory_in_every_training_stage_and_changes_no_result(tiny_run):
    """The same Llama runs with `gradient_checkpointing` in SFT, reward and PPO: each stage's measured peak drops,
    and what each stage trained (the merged SFT weights, the reward adapter and score head, the PPO adapter and
    value head) is the run without it's, to float rounding."""
    from safetensors.torch import load_file

    plain_dir, _, _, plain = tiny_run("llama")
    ckpt_dir, _, _, ckpt = tiny_run("llama-checkpointing")
    assert all(ckpt[stage] < 0.9 * plain[stage] for stage in plain), (plain, ckpt)
    for part in ("sft/merged/model.safetensors", "reward/bf16/adapter/adapter_model.safetensors",
                 "ppo/adapter/adapter_model.safetensors"):
        a, b = load_file(plain_dir / part), load_file(ckpt_dir / part)
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"{part}: {key}")
    for part in ("reward/bf16/score_head.pt", "ppo/adapter/value_head.pt"):
        a, b = torch.load(plain_dir / part), torch.load(ckpt_dir / part)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6, msg=f"{part}: {key}")
