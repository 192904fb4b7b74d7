"""The best policy by the independent signal, and early stopping (issue 31): the rule on synthetic series, a tiny GRPO
run whose signal peaks before its last step (the written policy is that step's, tensor for tensor), early stop and
its re-run, resume, and the configurations that cannot have the signal they name."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from edgerlhf.align import grpo, loop, ppo
from edgerlhf.align.policy import VALUE_HEAD_FILE
from edgerlhf.config import ConfigError, best_signal
from edgerlhf.context import RunContext
from edgerlhf.contract import PPO_ADAPTER
from tests.support.tiny import make_tiny_run, tiny_config

# --- the rule -----------------------------------------------------------------------------------------------


def test_the_rule_smooths_then_keeps_the_highest_weighing():
    # A bias-corrected EMA: a constant series is its own average from the first step.
    rule = loop.BestPolicy("gold", alpha=0.5)
    for _ in range(3):
        rule.observe(2.0)
    assert rule.smoothed == pytest.approx(2.0)
    # By hand, alpha 0.5, weighed every 2 steps: (1, 3) -> (0.25 + 1.5) / 0.75 = 7/3; (3, 0) -> 1.1875 / 0.9375
    # = 1.27; (1, 1) -> 1.05 / 0.98 = 1.06.
    assert loop.pick_best([1, 3, 3, 0, 1, 1], every=2, alpha=0.5) == (2, pytest.approx(7 / 3), None)
    # One lucky step between weighings does not count by itself, and a dip that recovers is not the end.
    rising = [0.1 * i for i in range(12)]
    assert loop.pick_best(rising, every=3)[0] == 12  # the last weighing of a rising series
    assert loop.pick_best([0, 0, 5, 0, 0, 0, 1, 1, 1], every=3)[0] == 3
    # Non-finite values are skipped, not averaged in.
    assert loop.pick_best([1.0, float("nan"), 1.0], every=1)[1] == pytest.approx(1.0)


def test_patience_stops_after_that_many_weighings_without_improvement():
    peak = [1, 2, 3, 4, -10, -10, -10, -10, -10, -10]
    assert loop.pick_best(peak, every=2, patience=1) == (4, pytest.approx(loop.pick_best(peak[:4], 2)[1]), 6)
    assert loop.pick_best(peak, every=2, patience=2)[2] == 8
    assert loop.pick_best(peak, every=2, patience=0)[2] is None  # off
    assert loop.pick_best(peak, every=2, patience=5)[2] is None  # the steps end first
    assert loop.pick_best(peak[:6], every=2, patience=1)[2] is None  # stale at the last step: no early stop
    # Equal is no improvement: a flat signal stops the stage after `patience` weighings.
    assert loop.pick_best([1.0] * 10, every=2, patience=2) == (2, pytest.approx(1.0), 6)


def test_the_rules_state_resumes_only_for_the_same_signal():
    rule = loop.BestPolicy("gold", patience=2)
    for step, value in enumerate([1, 2, 0, 0], 1):
        rule.observe(value)
        rule.weigh(step)
    state = rule.state_dict()
    again = loop.BestPolicy("gold", patience=2)
    again.load_state_dict(state)
    assert (again.best_step, again.best_value, again.stale, again.smoothed) == \
        (rule.best_step, rule.best_value, rule.stale, rule.smoothed)
    other = loop.BestPolicy("validation", patience=2)
    other.load_state_dict(state)
    assert other.best_step is None and other.smoothed is None


# --- the configuration --------------------------------------------------------------------------------------


def test_a_signal_the_run_cannot_have_is_a_config_error():
    with pytest.raises(ConfigError, match="ppo.keep_best.*reward.validation"):
        tiny_config(ppo={"keep_best": "validation"})
    with pytest.raises(ConfigError, match="ppo.keep_best.*data.labels"):
        tiny_config(data={"labels": "human"}, ppo={"keep_best": "gold"})
    with pytest.raises(ConfigError, match="ppo.keep_best"):  # the gold is what it trains on: no independent gold
        tiny_config(ppo={"keep_best": "gold", "reward_function": tiny_config().data.gold_scorer})
    with pytest.raises(ConfigError, match="ppo.keep_best.*must be one of"):
        tiny_config(ppo={"keep_best": "best"})
    with pytest.raises(ConfigError, match="ppo.early_stop_patience"):  # nothing to stop on
        tiny_config(data={"labels": "human"}, ppo={"keep_best": "auto", "early_stop_patience": 2})
    assert best_signal(tiny_config()) is None  # off by default
    assert best_signal(tiny_config(ppo={"keep_best": "auto"})) == "gold"  # the tiny preset is the known-answer task
    assert best_signal(tiny_config(reward={"validation": True}, ppo={"keep_best": "auto"})) == "validation"
    assert best_signal(tiny_config(data={"labels": "human"}, ppo={"keep_best": "auto"})) is None
    assert tiny_config(algorithm="dpo", ppo={"keep_best": "validation"}).ppo.keep_best == "validation"  # unread


# --- the loop -----------------------------------------------------------------------------------------------

PEAK = [1.0, 2.0, 3.0, 4.0, -10.0, -10.0, -10.0, -10.0]
"""The gold of each step's rollouts (steps 1..8): best smoothed at the weighing of step 4."""


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("best-base"))


def _config(algorithm="grpo", **ppo):
    return tiny_config(algorithm=algorithm, ppo={"steps": 8, "checkpoint_every": 2, "sample_every": 100,
                                              "n_probe_prompts": 1, "keep_best": "gold", **ppo})


def _run(config, work, monkeypatch, sampled_by: dict[int, dict[str, torch.Tensor]], series=PEAK, heads=None):
    """The stage with the gold of step k's rollouts replaced by series[k-1]; `sampled_by[k]` records the adapter
    that sampled step k (before its update), `heads[k]` PPO's value head then."""
    current = {}
    train_step = {"grpo": grpo.grpo_step, "ppo": ppo.ppo_step}[config.algorithm]

    def step(models, optimizer, kl_ctl, batch_prompts, cfg, micro, k):
        current["step"] = k
        weights = loop.policy_weights(models)
        sampled_by[k] = weights["adapter"]
        if heads is not None:
            heads[k] = weights["value_head"]
        return train_step(models, optimizer, kl_ctl, batch_prompts, cfg, micro, k)

    def gold_of_the_step(algorithm, models, rollouts, scores, gold_scorer=None):
        assert gold_scorer == config.data.gold_scorer
        return {f"{algorithm}/gold_mean": series[current["step"] - 1]}

    monkeypatch.setattr(loop, "independent_metrics", gold_of_the_step)
    ctx = RunContext(work)
    ctx.begin_stage("ppo")
    return loop.run(config, ctx, step), ctx


def _adapter(path):
    return load_file(str(path / "adapter_model.safetensors"))


def _assert_same(saved: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]):
    assert saved.keys() == expected.keys()
    for key in saved:
        torch.testing.assert_close(saved[key], expected[key], rtol=0, atol=0)


def test_the_written_policy_is_the_best_steps_not_the_last(base_run, tmp_path, monkeypatch):
    work = tmp_path / "run"
    shutil.copytree(base_run, work)
    sampled_by: dict[int, dict] = {}
    report, ctx = _run(_config(), work, monkeypatch, sampled_by)
    best_step, best_value, _ = loop.pick_best(PEAK, every=2)
    assert best_step == 4 and sorted(sampled_by) == list(range(1, 9))
    assert (report.best_signal, report.best_step, report.stopped_early_at) == ("gold", 4, None)
    assert report.best_value == pytest.approx(best_value)
    _assert_same(_adapter(work / PPO_ADAPTER), sampled_by[4])
    _assert_same(_adapter(work / "ppo" / loop.BEST_DIR), sampled_by[4])
    # ... and not the policy the steps ended with (the checkpoint's), which trained on.
    last = torch.load(work / "ppo" / "checkpoint" / loop.CHECKPOINT_FILE, weights_only=True)["adapter"]
    assert any(not torch.equal(last[k], sampled_by[4][k]) for k in last)
    assert dict(ctx.metric_series("grpo/best_step")) == {2: 2, 4: 4, 6: 4, 8: 4}

    # Without keep_best the stage writes the last policy, and leaves no ppo/best/ of an earlier run behind.
    fresh = tmp_path / "plain"
    shutil.copytree(base_run, fresh)
    plain, _ = _run(_config(keep_best="none"), fresh, monkeypatch, {})
    assert plain.best_step is None and plain.best_signal is None
    last = torch.load(fresh / "ppo" / "checkpoint" / loop.CHECKPOINT_FILE, weights_only=True)["adapter"]
    _assert_same(_adapter(fresh / PPO_ADAPTER), last)
    shutil.copytree(work / "ppo" / loop.BEST_DIR, fresh / "ppo" / loop.BEST_DIR)
    shutil.rmtree(fresh / "ppo" / "checkpoint")
    _run(_config(keep_best="none", steps=2), fresh, monkeypatch, {})
    assert not (fresh / "ppo" / loop.BEST_DIR).exists()


def test_ppo_writes_the_best_steps_value_head_with_its_adapter(base_run, tmp_path, monkeypatch):
    work = tmp_path / "run"
    shutil.copytree(base_run, work)
    sampled_by: dict[int, dict] = {}
    heads: dict[int, dict] = {}
    report, _ = _run(_config("ppo", steps=4), work, monkeypatch, sampled_by, series=[1.0, 2.0, -10.0, -10.0],
                     heads=heads)
    assert report.best_step == 2
    _assert_same(_adapter(work / PPO_ADAPTER), sampled_by[2])
    _assert_same(torch.load(work / PPO_ADAPTER / VALUE_HEAD_FILE, weights_only=True), heads[2])
    assert any(not torch.equal(heads[2][k], heads[4][k]) for k in heads[2])  # the critic trained on after step 2


def test_early_stop_stops_and_a_rerun_does_not_train_on(base_run, tmp_path, monkeypatch):
    work = tmp_path / "run"
    shutil.copytree(base_run, work)
    sampled_by: dict[int, dict] = {}
    report, ctx = _run(_config(early_stop_patience=1), work, monkeypatch, sampled_by)
    assert sorted(sampled_by) == [1, 2, 3, 4, 5, 6]  # weighed at 6 without improvement: stopped there
    assert (report.best_step, report.stopped_early_at, report.steps) == (4, 6, 8)
    assert max(step for step, _ in ctx.metric_series("grpo/reward_mean")) == 6
    _assert_same(_adapter(work / PPO_ADAPTER), sampled_by[4])

    again: dict[int, dict] = {}
    rerun, ctx = _run(_config(early_stop_patience=1), work, monkeypatch, again)
    assert again == {} and ctx.metric_series("grpo/reward_mean") == []  # the stopped stage is done
    assert (rerun.best_step, rerun.stopped_early_at, rerun.resumed_from_step) == (4, 6, 6)
    _assert_same(_adapter(work / PPO_ADAPTER), sampled_by[4])


def test_a_resumed_run_keeps_the_best_so_far(base_run, tmp_path, monkeypatch):
    """Four steps, then the same run to eight: the best (step 4, in the first part) comes back from the checkpoint."""
    work = tmp_path / "run"
    shutil.copytree(base_run, work)
    first: dict[int, dict] = {}
    _run(_config(steps=4), work, monkeypatch, first)
    (work / "ppo" / loop.BEST_DIR / "adapter_model.safetensors").unlink()  # as if a crash had lost it
    rest: dict[int, dict] = {}
    report, _ = _run(_config(), work, monkeypatch, rest)
    assert sorted(rest) == [5, 6, 7, 8] and report.resumed_from_step == 4
    assert report.best_step == 4 and report.best_value == pytest.approx(loop.pick_best(PEAK, every=2)[1])
    _assert_same(_adapter(work / PPO_ADAPTER), first[4])
    _assert_same(_adapter(work / "ppo" / loop.BEST_DIR), first[4])


def test_the_job_page_says_which_policy_was_written():
    from edgerlhf.reports import PPOReport
    from frontend.reports import best_policy_line

    fields = {"steps": 8, "resumed_from_step": 0, "reward_precision": "bf16", "reward_model": "shared adapter",
              "compute_dtype": "float32", "device": "cpu", "trainable_parameters": 1, "network_bytes": 1,
              "held_bytes": 1, "network_copies": 1.0, "first": {}, "final": {}, "kl_coef_final": 0.1, "wall_s": 1.0,
              "peak_rss_mb": 1.0, "memory": {}}
    assert best_policy_line(PPOReport(**fields).model_dump(mode="json")) is None  # the last policy: nothing to say
    kept = PPOReport(**fields, best_signal="gold", best_step=4, best_value=2.5, stopped_early_at=6)
    assert best_policy_line(kept.model_dump(mode="json")) == \
        "best policy: step 4 by the gold (2.5 smoothed); stopped early at step 6 of 8"
    assert best_policy_line(None) is None


def test_the_validation_reward_model_picks_it_in_a_real_run(base_run, tmp_path):
    """No stand-in signal: a validation model (the reward model with its score head negated) scores the rollouts, and
    the best step is the rule's on the series the loop logged."""
    from edgerlhf import align
    from edgerlhf.contract import VALIDATION_REWARD

    work = tmp_path / "run"
    shutil.copytree(base_run, work)
    shutil.copytree(work / "reward" / "bf16", work / VALIDATION_REWARD)
    head = torch.load(work / VALIDATION_REWARD / "score_head.pt")
    torch.save({k: None if v is None else -v for k, v in head.items()}, work / VALIDATION_REWARD / "score_head.pt")
    config = tiny_config(algorithm="grpo", reward={"validation": True},
                         ppo={"steps": 4, "checkpoint_every": 1, "sample_every": 100, "n_probe_prompts": 1,
                              "keep_best": "auto"})
    ctx = RunContext(work)
    ctx.begin_stage("ppo")
    report = align.run(config, ctx)
    series = [value for _, value in sorted(ctx.metric_series("grpo/validation_reward_mean"))]
    assert len(series) == 4 and report.best_signal == "validation"
    assert (report.best_step, report.best_value) == (loop.pick_best(series, every=1)[0],
                                                     pytest.approx(loop.pick_best(series, every=1)[1]))
    _assert_same(_adapter(work / PPO_ADAPTER), _adapter(work / "ppo" / loop.BEST_DIR))
