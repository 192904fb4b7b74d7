"""Seeing reward hacking (issue 31): the validation reward model the reward stage trains on the other half of the pairs,
the alignment loop scoring every step's rollouts with it (one more adapter on the one network) and with the gold,
and the planner counting it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from edgerlhf import align, evaluate, gold, memory, models, plan, reward
from edgerlhf.align import policy
from edgerlhf.config import ConfigError, load_config
from edgerlhf.context import RunContext
from edgerlhf.contract import VALIDATION_REWARD, merge_overrides
from edgerlhf.data import read_prefs
from edgerlhf.errors import MissingPrerequisite
from tests.support.tiny import REWARD_STUDY, data_and_random_sft, make_tiny_run, tiny_config

# --- the reward stage ---------------------------------------------------------------------------------


def test_the_halves_are_disjoint_cover_every_pair_and_keep_a_prompts_pairs_together():
    pairs = [{"prompt": f"p{i % 7}", "chosen": str(i), "rejected": ""} for i in range(30)]
    main, validation = reward.split_for_validation(pairs, seed=0)
    assert set(main).isdisjoint(validation) and sorted(main + validation) == list(range(30))
    assert {pairs[i]["prompt"] for i in main}.isdisjoint({pairs[i]["prompt"] for i in validation})
    assert abs(len(main) - len(validation)) <= 5  # a prompt has 4 or 5 pairs here
    assert reward.split_for_validation(pairs, seed=0) == (main, validation)  # seeded
    with pytest.raises(ValueError, match="at least two prompts"):
        reward.split_for_validation([{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3, seed=0)


@pytest.mark.parametrize("share", [0.1, 0.2, 0.35, 0.8])
def test_the_validation_share_sets_the_validation_models_part_to_within_a_prompts_pairs(share):
    pairs = [{"prompt": f"p{i % 40}", "chosen": str(i), "rejected": ""} for i in range(200)]  # 5 pairs a prompt
    main, validation = reward.split_for_validation(pairs, seed=3, share=share)
    assert set(main).isdisjoint(validation) and sorted(main + validation) == list(range(200))
    assert {pairs[i]["prompt"] for i in main}.isdisjoint({pairs[i]["prompt"] for i in validation})
    assert abs(len(validation) - share * 200) <= 5, (share, len(validation))
    with pytest.raises(ConfigError, match="reward.validation_share"):
        tiny_config(reward={"validation": True, "validation_share": 1.0})


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """data/ (gold labels) and an sft/merged random model, as the earlier stages leave them."""
    return data_and_random_sft(tmp_path_factory.mktemp("validation-base"))


def test_the_reward_stage_trains_a_validation_model_on_the_other_half(tmp_path, base_run, monkeypatch):
    shutil.copytree(base_run, tmp_path, dirs_exist_ok=True)
    ctx = RunContext(tmp_path)
    ctx.begin_stage("reward")
    config = tiny_config(REWARD_STUDY, reward={"precisions": ["bf16"], "max_steps": 3, "validation": True})
    trained_on: list[list[dict]] = []  # the training pairs of each model, in the order they trained
    real = reward.preference_dataset

    def recording(pairs, tokenizer, max_length):
        if not isinstance(pairs, Path) or pairs.name != "test_prefs.jsonl":
            trained_on.append(list(pairs))
        return real(pairs, tokenizer, max_length)

    monkeypatch.setattr(reward, "preference_dataset", recording)
    report = reward.run(config, ctx)

    train = read_prefs(ctx.run_dir / "data" / "train_prefs.jsonl")
    main, validation = trained_on
    as_keys = lambda rows: [json.dumps(r, sort_keys=True) for r in rows]  # noqa: E731
    assert set(as_keys(main)).isdisjoint(as_keys(validation))
    assert sorted(as_keys(main) + as_keys(validation)) == sorted(as_keys(train))
    assert {r["prompt"] for r in main}.isdisjoint({r["prompt"] for r in validation})
    assert report.train_pairs == len(main) and report.validation.train_pairs == len(validation)

    for where in ("reward/bf16", VALIDATION_REWARD):
        for name in ("adapter/adapter_model.safetensors", "score_head.pt", "reward_model.json"):
            assert (ctx.run_dir / where / name).exists(), (where, name)
    # Two different models: different weights, scores that differ on the test pairs.
    assert not torch.equal(torch.load(ctx.run_dir / "reward/bf16/score_head.pt")["weight"],
                           torch.load(ctx.run_dir / VALIDATION_REWARD / "score_head.pt")["weight"])
    v = report.validation
    assert 0.0 <= v.accuracy <= 1.0 and v.precision == "bf16" and v.main_precision == "bf16"
    assert v.spearman_vs_main is not None and -1.0 <= v.spearman_vs_main < 1.0
    assert v.normalization.samples == 2 * len(validation)  # normalised on its own training responses
    keys = {k for _, k, _, _ in ctx.metrics}
    assert {"reward/validation/loss", "reward/validation/test_accuracy", "reward/bf16/test_accuracy"} <= keys
    assert ctx.progress_by_stage["reward"] == 1.0
    loaded = models.load_reward_model(ctx.run_dir, "bf16", "cpu", VALIDATION_REWARD)
    test = read_prefs(ctx.run_dir / "data" / "test_prefs.jsonl")
    chosen = loaded.score([r["prompt"] for r in test], [r["chosen"] for r in test])
    rejected = loaded.score([r["prompt"] for r in test], [r["rejected"] for r in test])
    assert (chosen > rejected).float().mean().item() == pytest.approx(v.accuracy)  # what the report says it is

    # Re-run with validation off: the main model now trains on every pair, and the old validation model, which saw
    # some of them, is gone rather than left to pass for independent.
    trained_on.clear()
    off = reward.run(tiny_config(REWARD_STUDY, reward={"precisions": ["bf16"], "max_steps": 1}), ctx)
    assert off.validation is None and off.train_pairs == len(train) and len(trained_on) == 1
    assert not (ctx.run_dir / VALIDATION_REWARD).exists()


# --- the alignment loop ----------------------------------------------------------------------------------


def with_validation(run_dir, sign: float = -1.0):
    """A validation reward model in `run_dir`: the bf16 reward model's adapter with its score head times `sign` (-1:
    a validation model that ranks every rollout exactly the other way round)."""
    shutil.copytree(run_dir / "reward" / "bf16", run_dir / VALIDATION_REWARD)
    head = torch.load(run_dir / VALIDATION_REWARD / "score_head.pt")
    torch.save({k: None if v is None else sign * v for k, v in head.items()},
               run_dir / VALIDATION_REWARD / "score_head.pt")
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return with_validation(make_tiny_run(tmp_path_factory.mktemp("validation-run"), precisions=("bf16", "int8")))


def _network_bytes(run_dir) -> int:
    sft_model, _ = models.load_policy(run_dir, "sft")
    return sum({p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in sft_model.parameters()}.values())


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_the_validation_model_is_one_more_adapter_on_the_one_network(run_dir, precision):
    """Whatever the reward precision, the validation adapter rides on the one network: bf16 adds nothing but the
    adapter, int8 adds only its own quantized reward copy, as without validation."""
    config = tiny_config(reward={"precisions": ["bf16", "int8"], "validation": True},
                         ppo={"reward_precision": precision})
    base_bytes = _network_bytes(run_dir)
    built = policy.build_models(config, run_dir, torch.device("cpu"), validation=True)
    assert built.validation_model.model is built.model
    held = policy.base_weight_storages(built.modules())
    without_reward = policy.base_weight_storages([m for m in built.modules() if m is not built.reward_model])
    assert sum(without_reward.values()) == base_bytes
    if precision == "bf16":
        assert sum(held.values()) == base_bytes
    prompts = ["\n\nHuman: How far can spiders jump?\n\nAssistant:"] * 3
    responses = ["About a metre.", "", "They can jump many times their body length, often more than a metre."]
    standalone = models.load_reward_model(run_dir, "bf16", "cpu", VALIDATION_REWARD).score(prompts, responses)
    torch.testing.assert_close(built.validation_score(prompts, responses), standalone, rtol=1e-5, atol=1e-5)
    # Scoring hands the network back to the policy, whose LoRA trains; the validation LoRA stays frozen.
    named = dict(built.model.named_parameters())
    assert all(p.requires_grad for n, p in named.items() if "lora_" in n and ".policy." in n)
    assert not any(p.requires_grad for n, p in named.items() if "lora_" in n and f".{policy.VALIDATION}." in n)
    assert built.model.active_adapter == policy.POLICY


def test_without_a_validation_model_the_stage_says_which_stage_to_run(tmp_path):
    bare = make_tiny_run(tmp_path / "run")
    with pytest.raises(MissingPrerequisite, match="validation"):
        policy.build_models(tiny_config(reward={"validation": True}), bare, torch.device("cpu"), validation=True)


def test_the_loop_logs_the_independent_signals_of_every_steps_rollouts(run_dir, tmp_path):
    """A GRPO run with the validation model that ranks everything the other way round: its scores are the proxy's
    negated at every step, their rank correlation -1; the gold of the same rollouts and its agreement are logged
    too (the tiny preset is the known-answer task), and the network is still one copy."""
    work = tmp_path / "run"
    shutil.copytree(run_dir, work)
    config = load_config("tiny", {**tiny_config(reward={"validation": True}, ppo={"steps": 2}).to_dict(),
                                  "algorithm": "grpo"})
    assert config.data.labels == "gold"
    ctx = RunContext(work)
    ctx.begin_stage("ppo")
    report = align.run(config, ctx)
    series = {key: dict(ctx.metric_series(f"grpo/{key}")) for key in
              ("reward_mean", "validation_reward_mean", "validation_reward_std", "proxy_validation_spearman",
               "gold_mean", "gold_std")}
    assert all(sorted(s) == [1, 2] for s in series.values()), series
    for step in (1, 2):
        assert series["validation_reward_mean"][step] == pytest.approx(-series["reward_mean"][step], abs=1e-5)
        assert series["proxy_validation_spearman"][step] == pytest.approx(-1.0)
    assert report.validation_reward and report.gold_scorer == config.data.gold_scorer
    assert "grpo/validation_reward_mean" in report.final
    assert 0.9 < report.network_copies < 1.5  # the validation adapter is no copy of the network


    # The evaluation scores both policies' held-out answers with it too: again the proxy's negation.
    config = load_config("tiny", {**config.to_dict(), "evaluate": {"n_prompts": 4, "samples_per_prompt": 2,
                                                                    "response_length": 8, "n_bootstrap": 200}})
    ctx.begin_stage("evaluate")
    ev = evaluate.run(config, ctx)
    for side in (ev.sft, ev.ppo):
        assert side.validation_reward.mean == pytest.approx(-side.reward.mean, abs=1e-4)
    assert ev.validation_reward_diff.mean == pytest.approx(-ev.reward_diff.mean, abs=1e-4)
    assert "| validation reward model |" in (work / "evaluate" / "report.md").read_text()


def test_the_independent_metrics_of_some_rollouts_by_hand():
    """The gold's mean and std of the rollouts, and Spearman's rho of the proxy against it; a step where one side is
    constant logs no agreement (rho is undefined there)."""
    from edgerlhf.align.rollout import independent_metrics

    prompts = ["\n\nHuman: Hi\n\nAssistant:"] * 4
    responses = ["Hello.", "Hello there, friend.", "", "Hi, how can I help you today?"]
    rollouts = SimpleNamespace(prompts=prompts, responses=responses)
    no_validation = SimpleNamespace(validation_model=None)
    golds = gold.score_batch(prompts, responses, "concise")  # -2, -5, -40 (empty), -9
    proxy = torch.tensor([0.3, 0.1, 0.5, -1.0])
    got = independent_metrics("rloo", no_validation, rollouts, proxy, "concise")
    assert got["rloo/gold_mean"] == pytest.approx(sum(golds) / 4)
    assert got["rloo/gold_std"] == pytest.approx(torch.tensor(golds).std().item())
    # gold ranks (1-based, ascending): 4, 3, 1, 2; proxy ranks: 3, 2, 4, 1 -> d = 1, 1, -3, 1; rho = 1 - 6 * 12 / 60
    assert got["rloo/proxy_gold_spearman"] == pytest.approx(1 - 6 * 12 / (4 * 15))
    assert "rloo/validation_reward_mean" not in got
    flat = independent_metrics("rloo", no_validation, rollouts, torch.zeros(4), "concise")
    assert "rloo/proxy_gold_spearman" not in flat and "rloo/gold_mean" in flat
    assert independent_metrics("rloo", no_validation, rollouts, proxy, None) == {}


def test_the_gold_is_no_independent_signal_when_it_is_the_reward():
    from edgerlhf.align.rollout import independent_gold

    assert independent_gold(tiny_config()) == tiny_config().data.gold_scorer
    assert independent_gold(tiny_config(ppo={"reward_function": tiny_config().data.gold_scorer})) is None
    assert independent_gold(tiny_config(data={"labels": "human"})) is None


# --- the planner ------------------------------------------------------------------------------------------


def test_the_planner_counts_the_validation_model_and_its_training(run_dir):
    """The alignment stage's planned weights are what `build_models(validation=True)` holds (the policy, reference and
    reward on one network plus two frozen adapters), and the reward stage plans the validation model's training."""
    config = load_config("tiny", {"model": {"n_layer": 1, "n_head": 2, "n_embd": 32},  # make_tiny_run's model
                                  "reward": {"precisions": ["bf16"], "lora_r": 4, "adapt_embedding": False,
                                             "validation": True},  # make_tiny_run's adapter
                                  "ppo": {"lora_r": 4}})
    before = memory.tensor_bytes("cpu")
    built = policy.build_models(config, run_dir, torch.device("cpu"), validation=True)
    measured = memory.tensor_bytes("cpu") - before
    planned = plan.plan(config, device="cpu")
    ppo = next(s for s in planned.stages if s.stage == "ppo")
    weights = sum(i.bytes for i in ppo.items if "weights" in i.name or "LoRA" in i.name)
    adam = 12 * sum(p.numel() for p in built.policy_parameters())  # made by the first optimizer step
    assert weights - adam == pytest.approx(measured, rel=0.05)
    assert "validation scoring" in ppo.phases
    (item,) = [i for i in ppo.items if i.name.startswith("validation LoRA")]  # fp32 adapter + score head, exactly
    frozen = [p for n, p in built.model.named_parameters() if f".{policy.VALIDATION}." in n]
    head = built.validation_model.head.parameters()
    assert item.bytes == 4 * (sum(p.numel() for p in frozen) + sum(p.numel() for p in head))
    without = plan.plan(load_config("tiny", merge_overrides(config.to_dict(), {"reward": {"validation": False}})),
                        device="cpu")
    assert [s.stage for s in planned.stages] == ["sft", "reward/bf16", "reward/validation", "ppo", "evaluate"]
    assert [s.stage for s in without.stages] == ["sft", "reward/bf16", "ppo", "evaluate"]
    stage = {s.stage: s for s in planned.stages}
    assert stage["reward/validation"].tensor_bytes == stage["reward/bf16"].tensor_bytes  # the same model, other pairs
    assert next(s for s in without.stages if s.stage == "ppo").tensor_bytes < ppo.tensor_bytes

