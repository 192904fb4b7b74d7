"""The evaluation stage: bootstrap intervals, win rate, and SFT-vs-PPO reports on a tiny run."""

import json
import math

import numpy as np
import pytest
import torch

from edgerlhf import evaluate, ppo
from edgerlhf.pipeline import run_stage
from edgerlhf.context import RunContext
from tests.edgerlhf.tiny_run import make_tiny_run, tiny_config


def test_win_rate_counts_ties_as_half():
    assert evaluate.win_rate([1, 2, 3], [0, 2, 4]) == pytest.approx(0.5)
    assert evaluate.win_rate([1, 1], [0, 0]) == 1.0


def test_bootstrap_ci():
    constant = evaluate.bootstrap_ci([2.0] * 10, n_resamples=100)
    assert (constant["mean"], constant["low"], constant["high"]) == (2.0, 2.0, 2.0)
    rng = np.random.default_rng(0)
    shifted = evaluate.bootstrap_ci(rng.normal(1.0, 1.0, 400), n_resamples=1000, confidence=0.95)
    assert shifted["low"] < shifted["mean"] < shifted["high"]
    assert 0.0 < shifted["low"] and shifted["high"] < 2.0  # the mean is 1 +- 2 standard errors (0.05)
    # Standard error of the mean of 400 N(0, 1) draws is 0.05: a 95 % interval is about 0.2 wide.
    assert shifted["high"] - shifted["low"] == pytest.approx(2 * 1.96 * 0.05, rel=0.25)
    noise = evaluate.bootstrap_ci(rng.normal(0.0, 1.0, 400), n_resamples=1000)
    assert noise["low"] < 0.0 < noise["high"]
    assert evaluate.bootstrap_ci([1.0, 3.0], seed=1) == evaluate.bootstrap_ci([1.0, 3.0], seed=1)
    assert evaluate.bootstrap_ci([])["n"] == 0


def test_an_unchanged_policy_evaluates_as_a_tie(tmp_path):
    """PPO adapter == reference (a fresh LoRA, B = 0): same samples, zero KL, zero differences, win rate 1/2."""
    config = tiny_config()
    run_dir = make_tiny_run(tmp_path / "run", config)
    models = ppo.build_models(config, run_dir, torch.device("cpu"))
    ppo.save_adapter(run_dir / "ppo" / "adapter", models)

    ctx = RunContext(run_dir)
    ctx.begin_stage("evaluate")
    report = evaluate.run(config, ctx).model_dump()
    assert report["kl"] == pytest.approx(0.0, abs=1e-5)
    assert report["win_rate"] == 0.5
    assert report["reward_diff"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert report["gold_diff"]["low"] == report["gold_diff"]["high"] == 0.0
    assert all(s["sft"] == s["ppo"] for s in report["samples"])


def test_evaluate_report_after_ppo(tmp_path):
    config = tiny_config(steps=2, learning_rate=0.05)
    run_dir = make_tiny_run(tmp_path / "run", config)
    ctx = RunContext(run_dir)
    run_stage("ppo", config, ctx)
    report = run_stage("evaluate", config, ctx).model_dump()  # the stage, as the pipeline runs it

    assert report["n_prompts"] == config.evaluate.n_prompts
    assert math.isfinite(report["kl"]) and report["kl"] > 0.0  # a large learning rate moved the policy
    for side in ("sft", "ppo"):
        assert math.isfinite(report[side]["reward"]["mean"]) and math.isfinite(report[side]["gold"]["mean"])
    diff = report["gold_diff"]
    assert diff["low"] <= diff["mean"] <= diff["high"] and diff["n"] == config.evaluate.n_prompts
    assert len(report["samples"]) == config.evaluate.n_show
    assert {"prompt", "sft", "ppo", "sft_reward", "ppo_reward", "sft_gold", "ppo_gold"} <= set(report["samples"][0])
    assert json.loads((run_dir / "evaluate" / "report.json").read_text())["win_rate"] == report["win_rate"]
    assert "SFT vs PPO" in (run_dir / "evaluate" / "report.md").read_text()
    evals = [s for s in ctx.samples if s.kind == "eval"]
    assert {s.checkpoint for s in evals} == {"sft", "ppo"} and len(evals) == 2 * config.evaluate.n_show
    assert dict(ctx.metric_series("evaluate/kl"))[0] == pytest.approx(report["kl"])
