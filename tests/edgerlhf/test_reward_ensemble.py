"""A reward-model ensemble on one network (issue 31): the conservative score of its members (Coste et al. 2023), the
reward stage training the extra members on bootstrap resamples, the alignment loop scoring with them as frozen adapters
on the one network and logging their disagreement, the planner counting them, and the configuration's checks."""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from edgerlhf import align, memory, models, plan, reward
from edgerlhf.align import policy
from edgerlhf.config import ConfigError, load_config
from edgerlhf.context import RunContext
from edgerlhf.contract import ENSEMBLE_REWARD, ensemble_reward_dir, merge_overrides
from edgerlhf.data import read_prefs
from edgerlhf.errors import MissingPrerequisite
from tests.support.tiny import REWARD_STUDY, data_and_random_sft, make_tiny_run, tiny_config

# --- the conservative score -------------------------------------------------------------------------------


def test_the_conservative_score_of_known_member_scores():
    scores = torch.tensor([[0.0, 1.0, 3.0],
                           [1.0, 1.0, 3.0],
                           [2.0, 1.0, -3.0]])  # (k=3, N=3)
    # Column 0: mean 1, population std sqrt(2/3); column 1: all agree; column 2: mean 1, std sqrt(8).
    std = torch.tensor([math.sqrt(2 / 3), 0.0, math.sqrt(8)])
    score, got_std = policy.conservative_score(scores, "mean_minus_std", 1.0)
    torch.testing.assert_close(got_std, std)
    torch.testing.assert_close(score, torch.tensor([1.0, 1.0, 1.0]) - std)
    half, _ = policy.conservative_score(scores, "mean_minus_std", 0.5)
    torch.testing.assert_close(half, torch.tensor([1.0, 1.0, 1.0]) - 0.5 * std)
    mean, _ = policy.conservative_score(scores, "mean_minus_std", 0.0)
    torch.testing.assert_close(mean, torch.tensor([1.0, 1.0, 1.0]))
    worst, _ = policy.conservative_score(scores, "min")
    torch.testing.assert_close(worst, torch.tensor([0.0, 1.0, -3.0]))
    with pytest.raises(ValueError, match="unknown ensemble score"):
        policy.conservative_score(scores, "max")


def test_a_bootstrap_resample_is_seeded_and_drawn_with_replacement():
    a = reward.bootstrap(200, seed=1)
    assert len(a) == 200 and all(0 <= i < 200 for i in a) and a == sorted(a)
    assert a == reward.bootstrap(200, seed=1) and a != reward.bootstrap(200, seed=2)
    assert 100 < len(set(a)) < 160  # about 1 - 1/e of the pairs, some of them repeated


# --- the configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, field", [
    ({"reward": {"ensemble": 0}}, "reward.ensemble"),
    ({"reward": {"ensemble": 2.5}}, "reward.ensemble"),
    ({"reward": {"ensemble": 17}}, "reward.ensemble"),
    ({"ppo": {"ensemble_penalty": -0.5}}, "ppo.ensemble_penalty"),
    ({"ppo": {"ensemble_score": "max"}}, "ppo.ensemble_score"),
])
def test_bad_ensemble_settings_name_their_field(overrides, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config("tiny", overrides)


def test_the_ensemble_is_off_by_default():
    config = load_config("tiny")
    assert config.reward.ensemble == 1 and config.ppo.ensemble_score == "mean_minus_std"
    assert config.ppo.ensemble_penalty == 1.0


# --- the reward stage -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """data/ and an sft/merged random model, as the earlier stages leave them."""
    return data_and_random_sft(tmp_path_factory.mktemp("ensemble-base"))


def test_the_reward_stage_trains_the_extra_members_on_bootstrap_resamples(tmp_path, base_run, monkeypatch):
    shutil.copytree(base_run, tmp_path, dirs_exist_ok=True)
    ctx = RunContext(tmp_path)
    ctx.begin_stage("reward")
    config = tiny_config(REWARD_STUDY, reward={"precisions": ["bf16"], "max_steps": 2, "ensemble": 2})
    trained_on: list[list[dict]] = []  # the training pairs of each model, in the order they trained
    real = reward.preference_dataset

    def recording(pairs, tokenizer, max_length):
        if not isinstance(pairs, Path) or pairs.name != "test_prefs.jsonl":
            trained_on.append(list(pairs))
        return real(pairs, tokenizer, max_length)

    monkeypatch.setattr(reward, "preference_dataset", recording)
    report = reward.run(config, ctx)

    train = read_prefs(ctx.run_dir / "data" / "train_prefs.jsonl")
    as_keys = lambda rows: [json.dumps(r, sort_keys=True) for r in rows]  # noqa: E731
    main, member = trained_on  # member 0 is the main reward model, on every pair; member 1 on a resample of them
    assert as_keys(main) == as_keys(train)
    resample = Counter(as_keys(member))
    assert len(member) == len(train) and set(resample) < set(as_keys(train)) and max(resample.values()) > 1
    (row,) = report.ensemble
    assert row.member == 1 and row.seed == config.seed + 1 and row.precision == "bf16"
    assert row.train_pairs == len(train) and row.unique_pairs == len(resample)
    assert 0.0 <= row.accuracy <= 1.0 and row.normalization.samples == 2 * len(member)
    for where in ("reward/bf16", ensemble_reward_dir(1)):
        for name in ("adapter/adapter_model.safetensors", "score_head.pt", "reward_model.json"):
            assert (ctx.run_dir / where / name).exists(), (where, name)
    assert not torch.equal(torch.load(ctx.run_dir / "reward/bf16/score_head.pt")["weight"],
                           torch.load(ctx.run_dir / ensemble_reward_dir(1) / "score_head.pt")["weight"])
    keys = {k for _, k, _, _ in ctx.metrics}
    assert {"reward/ensemble/1/loss", "reward/ensemble/1/test_accuracy"} <= keys
    assert ctx.progress_by_stage["reward"] == 1.0

    # Off again: the old members are gone rather than left for a later alignment stage to pick up.
    trained_on.clear()
    off = reward.run(tiny_config(REWARD_STUDY, reward={"precisions": ["bf16"], "max_steps": 1}), ctx)
    assert off.ensemble == [] and len(trained_on) == 1 and not (ctx.run_dir / ENSEMBLE_REWARD).exists()


# --- the alignment loop -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny run whose ensemble member 1 is the bf16 reward model with its score head negated: it ranks every rollout
    the other way round, so the members' mean is 0 and their std the reward model's |score|."""
    run = make_tiny_run(tmp_path_factory.mktemp("ensemble-run"))
    member = run / ensemble_reward_dir(1)
    shutil.copytree(run / "reward" / "bf16", member)
    head = torch.load(member / "score_head.pt")
    torch.save({k: None if v is None else -v for k, v in head.items()}, member / "score_head.pt")
    return run


def test_the_members_are_frozen_adapters_on_the_one_network(run_dir):
    config = tiny_config(reward={"ensemble": 2}, ppo={"ensemble_score": "mean_minus_std", "ensemble_penalty": 0.5})
    built = policy.build_models(config, run_dir, torch.device("cpu"), ensemble=2)
    (member,) = built.ensemble_models
    assert member.model is built.model and built.reward_model.model is built.model
    prompts = ["\n\nHuman: How far can spiders jump?\n\nAssistant:"] * 3
    responses = ["About a metre.", "", "They can jump many times their body length, often more than a metre."]
    alone = models.load_reward_model(run_dir, "bf16", "cpu").score(prompts, responses)  # (3,)
    score = built.score(prompts, responses)
    torch.testing.assert_close(score, -0.5 * alone.abs(), rtol=1e-5, atol=1e-5)  # mean 0, std |score|
    torch.testing.assert_close(built.last_ensemble_std, alone.abs(), rtol=1e-5, atol=1e-5)
    assert built.reward_diagnostics()["ensemble_std_mean"] == pytest.approx(alone.abs().mean().item(), abs=1e-5)
    named = dict(built.model.named_parameters())
    assert not any(p.requires_grad for n, p in named.items() if "lora_" in n and ".ensemble_1." in n)
    assert all(p.requires_grad for n, p in named.items() if "lora_" in n and ".policy." in n)
    assert built.model.active_adapter == policy.POLICY
    worst = policy.build_models(tiny_config(reward={"ensemble": 2}, ppo={"ensemble_score": "min"}), run_dir,
                                torch.device("cpu"), ensemble=2)
    torch.testing.assert_close(worst.score(prompts, responses), -alone.abs(), rtol=1e-5, atol=1e-5)
    with pytest.raises(MissingPrerequisite, match="ensemble member 2"):
        policy.build_models(tiny_config(reward={"ensemble": 3}), run_dir, torch.device("cpu"), ensemble=3)


def test_a_grpo_loop_trains_on_the_conservative_score_and_logs_the_disagreement(run_dir, tmp_path):
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    config = load_config("tiny", {**tiny_config(reward={"ensemble": 2}, ppo={"steps": 2}).to_dict(),
                                  "algorithm": "grpo"})
    ctx = RunContext(work)
    ctx.begin_stage("ppo")
    report = align.run(config, ctx)
    disagreement = dict(ctx.metric_series("grpo/ensemble_std_mean"))
    proxy = dict(ctx.metric_series("grpo/reward_mean"))
    assert sorted(disagreement) == [1, 2] and all(v > 0 for v in disagreement.values())
    for step in (1, 2):  # the members' mean is 0, so the proxy is -std: the conservative score is what it trains on
        assert proxy[step] == pytest.approx(-disagreement[step], abs=1e-5)
    assert report.ensemble_members == 2 and "grpo/ensemble_std_mean" in report.final
    assert 0.9 < report.network_copies < 1.5  # the member's adapter is no copy of the network


# --- the planner --------------------------------------------------------------------------------------------


def test_the_planner_counts_the_members_and_their_training(run_dir):
    config = load_config("tiny", {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32},  # make_tiny_run's model
                                  "reward": {"precisions": ["bf16"], "lora_r": 4, "adapt_embedding": False,
                                             "ensemble": 2},  # make_tiny_run's adapter
                                  "ppo": {"lora_r": 4}})
    before = memory.tensor_bytes("cpu")
    built = policy.build_models(config, run_dir, torch.device("cpu"), ensemble=2)
    measured = memory.tensor_bytes("cpu") - before
    planned = plan.plan(config, device="cpu")
    ppo = next(s for s in planned.stages if s.stage == "ppo")
    weights = sum(i.bytes for i in ppo.items if "weights" in i.name or "LoRA" in i.name)
    adam = 12 * sum(p.numel() for p in built.policy_parameters())  # made by the first optimizer step
    assert weights - adam == pytest.approx(measured, rel=0.05)
    (item,) = [i for i in ppo.items if "ensemble LoRA" in i.name]  # fp32 adapter + score head, exactly
    frozen = [p for n, p in built.model.named_parameters() if ".ensemble_1." in n]
    head = built.ensemble_models[0].head.parameters()
    assert item.bytes == 4 * (sum(p.numel() for p in frozen) + sum(p.numel() for p in head))
    without = plan.plan(load_config("tiny", merge_overrides(config.to_dict(), {"reward": {"ensemble": 1}})),
                        device="cpu")
    assert [s.stage for s in planned.stages] == ["sft", "reward/bf16", "reward/ensemble", "ppo", "evaluate"]
    assert [s.stage for s in without.stages] == ["sft", "reward/bf16", "ppo", "evaluate"]
    stage = {s.stage: s for s in planned.stages}
    assert stage["reward/ensemble"].tensor_bytes == stage["reward/bf16"].tensor_bytes
    assert next(s for s in without.stages if s.stage == "ppo").tensor_bytes < ppo.tensor_bytes
