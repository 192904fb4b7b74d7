"""Unit tests of the dashboard's warnings (frontend/alerts.py): each check fires on the pattern it is
named after and stays quiet on a healthy run."""

from __future__ import annotations

import math

import pytest

from frontend.alerts import (check_all, check_job, kl_collapse, memory_near_limit, nan_values, out_of_memory_retries,
                             proxy_divergence, reward_hacking, trend)


def ser(values):
    return [(i, v) for i, v in enumerate(values)]


HEALTHY = {
    "ppo/reward_mean": ser([0.0, 0.1, 0.15, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5]),
    "ppo/kl": ser([0.0, 0.5, 1.0, 1.2, 1.1, 1.3, 1.2, 1.25, 1.3]),
    "ppo/response_length": ser([20, 21, 19, 22, 20, 21, 22, 20, 21]),
    "ppo/policy_loss": ser([0.1] * 9),
    "sft/loss": ser([3.0, 2.5, 2.0]),
}


def test_healthy_run_has_no_alerts():
    assert check_all(HEALTHY, gpu_total_mb=8192.0, target_kl=6.0, max_response_length=64) == []


def test_reward_rising_while_kl_runs_away():
    s = dict(HEALTHY, **{"ppo/kl": ser([0.5, 0.6, 0.8, 1.5, 3.0, 5.0, 8.0, 12.0, 20.0])})
    found = reward_hacking(s)
    assert [a.code for a in found] == ["reward_hacking"]
    assert "KL" in found[0].message


def test_kl_over_twice_target_counts_as_runaway_even_when_it_started_high():
    s = dict(HEALTHY, **{"ppo/kl": ser([10.0, 11, 12, 13, 13, 14, 14, 15, 15])})
    assert reward_hacking(s) == []  # grew by less than 3x
    assert [a.code for a in reward_hacking(s, kl_limit=12.0)] == ["reward_hacking"]


def test_reward_rising_while_length_runs_away_or_hits_the_limit():
    s = dict(HEALTHY, **{"ppo/response_length": ser([10, 12, 14, 18, 25, 30, 40, 48, 60])})
    found = reward_hacking(s)
    assert len(found) == 1 and "responses grow" in found[0].message
    capped = dict(HEALTHY, **{"ppo/response_length": ser([50, 52, 55, 58, 60, 62, 63, 64, 64])})
    assert reward_hacking(capped) == []
    assert len(reward_hacking(capped, max_response_length=64)) == 1


def test_no_hacking_alert_when_reward_is_flat_or_falling():
    falling = dict(HEALTHY, **{"ppo/reward_mean": ser([0.5, 0.45, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2]),
                               "ppo/kl": ser([0.5, 1, 2, 4, 8, 16, 20, 25, 30])})
    assert reward_hacking(falling) == []
    flat = dict(falling, **{"ppo/reward_mean": ser([0.3] * 9)})
    assert reward_hacking(flat) == []


def test_too_few_points_do_not_fire():
    s = {"ppo/reward_mean": ser([0, 1, 2]), "ppo/kl": ser([0, 10, 100])}
    assert reward_hacking(s) == []
    assert kl_collapse({"ppo/kl": ser([0.0, 0.0, 0.0])}) == []


def test_kl_collapse():
    collapsed = {"ppo/kl": ser([0.0, 0.4, 0.8, 0.5, 0.0001, 0.0, -0.0002])}
    found = kl_collapse(collapsed)
    assert [a.code for a in found] == ["kl_collapse"]
    assert "earlier" in found[0].message
    assert kl_collapse({"ppo/kl": ser([0.0, 0.4, 0.8, 0.5, 0.3, 0.2, 0.1])}) == []


def test_nan_losses_are_errors_with_the_first_bad_step():
    s = {"ppo/value_loss": [(0, 1.0), (1, 0.9), (2, math.nan), (3, None)],
         "sft/loss": ser([2.0, 1.0]),
         "ppo/tokens_per_s": [(0, math.nan)]}  # not a loss: ignored
    found = nan_values(s)
    assert len(found) == 1
    assert found[0].level == "error" and "ppo/value_loss" in found[0].message and "step 2" in found[0].message
    assert nan_values({"sft/loss": [(0, math.inf)]})[0].code == "nan"


def test_memory_near_the_gpu_total():
    s = {"mem/peak_mb": ser([1000, 7000, 7500]), "mem/allocated_mb": ser([900, 6000, 6100])}
    assert memory_near_limit(s, gpu_total_mb=None) == []  # CPU run: nothing to compare with
    assert memory_near_limit(s, gpu_total_mb=16000) == []
    warn = memory_near_limit(s, gpu_total_mb=8188)
    assert warn[0].level == "warning" and "8,188" in warn[0].message
    assert memory_near_limit(s, gpu_total_mb=7600)[0].level == "error"


def test_out_of_memory_retries_are_shown():
    assert out_of_memory_retries(HEALTHY) == []
    (alert,) = out_of_memory_retries({"mem/micro_batch": [(3, 4.0), (7, 2.0)]})
    assert alert.level == "warning" and "2 time(s)" in alert.message and "since step 7" in alert.message
    assert "2 rows" in alert.message
    assert [a.code for a in check_all({**HEALTHY, "mem/micro_batch": [(3, 4.0)]})] == ["out_of_memory"]


def test_check_all_puts_errors_first():
    s = dict(HEALTHY, **{"ppo/kl": ser([0.5, 0.6, 0.8, 1.5, 3.0, 5.0, 8.0, 12.0, 20.0]),
                         "sft/loss": [(0, math.nan)]})
    found = check_all(s)
    assert [a.code for a in found] == ["nan", "reward_hacking"]


# --- the proxy against the independent signals (reward.validation, the known-answer gold) -------------------

NOISE = [0.08, -0.05, 0.02, -0.09, 0.06, -0.01, 0.04, -0.07, 0.09, -0.03, 0.0, 0.05, -0.06, 0.03, -0.08, 0.07,
         -0.02, 0.01, -0.04, 0.06]
"""Fixed noise of a batch mean, about 0.05 on either side."""


def noisy(start: float, slope: float, n: int = 20, shift: int = 0) -> list[float]:
    return [start + slope * i + NOISE[(i + shift) % len(NOISE)] for i in range(n)]


def run_of(proxy: list[float], **independent: list[float]) -> dict:
    return {"grpo/reward_mean": ser(proxy), **{f"grpo/{name}": ser(values) for name, values in independent.items()}}


def test_trend_is_the_change_between_thirds_against_the_step_to_step_noise():
    change, error = trend([1.0, 1.0, 1.0, 2.0, 2.0, 2.0])  # thirds of 2: 1.0 and 2.0; one jump among five steps
    diffs = [0, 0, 1, 0, 0]
    sigma = math.sqrt(sum((d - 0.2) ** 2 for d in diffs) / 4 / 2)
    assert change == 1.0 and error == pytest.approx(sigma * math.sqrt(2 / 2))
    assert trend([0.0, 1.0, 2.0, 3.0, 4.0, 5.0]) == (4.0, 0.0)  # a steady line has no noise


def test_proxy_rising_while_the_validation_reward_is_flat_or_falling_warns():
    flat = proxy_divergence(run_of(noisy(0.0, 0.1), validation_reward_mean=noisy(0.2, 0.0, shift=7)),
                            algorithm="grpo")
    assert [a.code for a in flat] == ["proxy_divergence"]
    assert "validation reward model" in flat[0].message and "steps 10–19" in flat[0].message
    assert "Stop early" in flat[0].message and "KL coefficient" in flat[0].message
    # Rising first, then falling (Gao et al.'s over-optimisation): the later half falls.
    peaked = [0.1 * min(i, 10) - 0.08 * max(0, i - 10) + NOISE[(i + 3) % 20] for i in range(20)]
    found = proxy_divergence(run_of(noisy(0.0, 0.1), gold_mean=peaked), algorithm="grpo")
    assert [a.code for a in found] == ["proxy_divergence"] and "gold" in found[0].message
    # Each signal that parts from the proxy has its own warning.
    both = proxy_divergence(run_of(noisy(0.0, 0.1), validation_reward_mean=noisy(0.2, 0.0, shift=7),
                                   gold_mean=peaked), algorithm="grpo")
    assert len(both) == 2


def test_no_divergence_warning_on_a_healthy_run_a_flat_run_or_too_few_steps():
    healthy = run_of(noisy(0.0, 0.1), validation_reward_mean=noisy(0.0, 0.05, shift=5),
                     gold_mean=noisy(1.0, 0.03, shift=11))
    assert proxy_divergence(healthy, algorithm="grpo") == []
    flat = run_of(noisy(0.5, 0.0), validation_reward_mean=noisy(0.2, 0.0, shift=7), gold_mean=noisy(0.0, -0.01))
    assert proxy_divergence(flat, algorithm="grpo") == []  # the proxy does not rise: nothing to part from
    short = run_of(noisy(0.0, 0.1, n=7), validation_reward_mean=noisy(0.2, -0.1, n=7))
    assert proxy_divergence(short, algorithm="grpo") == []
    # Without an independent signal there is nothing to compare: the other checks speak for such runs.
    assert proxy_divergence(run_of(noisy(0.0, 0.1)), algorithm="grpo") == []


def test_the_job_check_reads_the_divergence_in_the_jobs_algorithm():
    diverging = run_of(noisy(0.0, 0.1), validation_reward_mean=noisy(0.2, 0.0, shift=7))
    job = {"config": {"algorithm": "grpo", "ppo": {"target_kl": 6.0, "response_length": 64}}}
    assert [a.code for a in check_job(job, diverging)] == ["proxy_divergence"]
    assert check_job({"config": {"algorithm": "ppo", "ppo": {}}}, diverging) == []  # a PPO job reads ppo/*
