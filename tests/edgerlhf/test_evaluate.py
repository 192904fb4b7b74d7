"""The evaluation stage: bootstrap intervals, win rate, and SFT-vs-PPO reports on a tiny run."""

import json
import math

import numpy as np
import pytest
import torch

from edgerlhf import evaluate
from edgerlhf.align import loop, policy
from edgerlhf.pipeline import run_stage
from edgerlhf.config import EvalConfig
from edgerlhf.context import RunContext
from edgerlhf.generation import capped_responses
from tests.support.tiny import make_tiny_run, tiny_config


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
    models = policy.build_models(config, run_dir, torch.device("cpu"))
    loop.save_adapter(run_dir / "ppo" / "adapter", models)

    ctx = RunContext(run_dir)
    ctx.begin_stage("evaluate")
    report = evaluate.run(config, ctx).model_dump()
    assert report["kl"] == pytest.approx(0.0, abs=1e-5)
    assert report["win_rate"] == 0.5
    assert report["reward_diff"]["mean"] == pytest.approx(0.0, abs=1e-5)
    assert report["gold_diff"]["low"] == report["gold_diff"]["high"] == 0.0
    assert all(s["sft"] == s["ppo"] for s in report["samples"])


def test_evaluate_report_after_ppo(tmp_path, trained_run):
    """The session's trained run (its PPO stage trained with a large learning rate), evaluated again in a copy."""
    config = trained_run.config
    ctx = RunContext(trained_run.copy_to(tmp_path / "run"))
    run_dir = ctx.run_dir
    report = run_stage("evaluate", config, ctx).model_dump()  # the stage, as the pipeline runs it

    assert report["n_prompts"] == config.evaluate.n_prompts
    assert math.isfinite(report["kl"]) and report["kl"] > 0.0  # a large learning rate moved the policy
    for side in ("sft", "ppo"):
        assert math.isfinite(report[side]["reward"]["mean"]) and math.isfinite(report[side]["gold"]["mean"])
    diff = report["gold_diff"]
    assert diff["low"] <= diff["mean"] <= diff["high"] and diff["n"] == config.evaluate.n_prompts
    assert len(report["samples"]) == config.evaluate.n_show
    assert {"prompt", "sft", "ppo", "sft_reward", "ppo_reward", "sft_gold", "ppo_gold"} <= set(report["samples"][0])
    # length, cap and empty answers, and the gold at equal length, computed again from the samples' own lengths
    for side in ("sft", "ppo"):
        assert 0.0 <= report[side]["cap_hit_rate"] <= 1.0 and 0.0 <= report[side]["empty_rate"] <= 1.0
    length = report["length_diff"]
    assert length["mean"] == pytest.approx(report["ppo"]["response_tokens"]["mean"]
                                           - report["sft"]["response_tokens"]["mean"])
    equal = report["gold_diff_equal_length"]
    assert equal["n"] == config.evaluate.n_prompts and equal["low"] <= equal["high"]
    assert report["response_length"] == config.evaluate.response_length
    assert json.loads((run_dir / "evaluate" / "report.json").read_text())["win_rate"] == report["win_rate"]
    assert "gold at equal length" in (run_dir / "evaluate" / "report.md").read_text()
    assert "SFT vs PPO" in (run_dir / "evaluate" / "report.md").read_text()
    evals = [s for s in ctx.samples if s.kind == "eval"]
    assert {s.checkpoint for s in evals} == {"sft", "ppo"} and len(evals) == 2 * config.evaluate.n_show
    assert dict(ctx.metric_series("evaluate/kl"))[0] == pytest.approx(report["kl"])


EVALUATED_STRATA = EvalConfig().length_strata
"""The strata the evaluation uses by default: the simulations below test that setting."""


def test_length_strata_put_empty_answers_apart_and_equal_lengths_together():
    empty = [True] + [False] * 7
    lengths = [1, 2, 2, 3, 10, 11, 12, 1]
    strata = evaluate.length_strata(lengths, empty, EVALUATED_STRATA)
    assert strata[0] == 0 and strata[-1] != 0  # empty vs a one-token answer
    assert strata[1] == strata[2] and len(set(strata[1:])) == 6  # one stratum per length
    binned = evaluate.length_strata(lengths, empty, 2)  # quantile bins, if asked
    assert binned[1] == binned[2] and len(set(binned[1:4])) <= 2 and binned[4] == binned[5] == binned[6] > binned[1]
    assert len(set(evaluate.length_strata([5, 5, 5], [False] * 3, 8))) == 1


def _pure_length_draw(seed: int, n_strata: int) -> dict[str, float]:
    """The gain at equal length of one simulated evaluation (48 prompts x 4 answers) where the aligned policy
    answers longer and the gold is length plus noise: nothing but length, so the true gain at equal length is 0."""
    rng = np.random.default_rng(seed)
    n_prompts, k = 48, 4
    sft_len = rng.integers(2, 30, n_prompts * k)
    ppo_len = np.minimum(sft_len + rng.integers(0, 10, n_prompts * k), 48)
    sft_gold = 0.1 * sft_len + rng.normal(0, 0.2, sft_len.size)
    ppo_gold = 0.1 * ppo_len + rng.normal(0, 0.2, ppo_len.size)
    strata = evaluate.length_strata(np.r_[sft_len, ppo_len], np.zeros(2 * sft_len.size, bool), n_strata)
    return evaluate.stratified_difference(sft_gold, ppo_gold, strata[:sft_len.size], strata[sft_len.size:], k,
                                          n_resamples=500, seed=seed)


def test_a_pure_length_effect_does_not_leak_through_the_evaluated_strata():
    """Over 50 simulated evaluations the 95 % interval of the gain at equal length covers 0 about 95 % of the time
    with the evaluation's strata (47 of 50 measured), where 8 quantile bins of length let the effect through (30)."""
    def covered(n_strata: int) -> int:
        return sum(d["low"] <= 0.0 <= d["high"] for d in (_pure_length_draw(seed, n_strata) for seed in range(50)))

    assert covered(EVALUATED_STRATA) >= 44
    assert covered(8) < 40  # the simulation can tell a leaking stratification


def test_gold_at_equal_length_removes_a_pure_length_effect_and_keeps_a_content_effect():
    """PPO answers longer; gold = length + content. Within strata of equal length only content remains."""
    rng = np.random.default_rng(0)
    n_prompts, k = 60, 4
    sft_len = rng.integers(2, 30, n_prompts * k)
    ppo_len = np.minimum(sft_len + rng.integers(0, 10, n_prompts * k), 40)  # longer

    def run(content):
        sft_gold = 0.1 * sft_len + rng.normal(0, 0.2, sft_len.size)
        ppo_gold = 0.1 * ppo_len + content + rng.normal(0, 0.2, ppo_len.size)
        # the evaluation's strata, one per length: nothing of the length effect is left inside a stratum
        strata = evaluate.length_strata(np.r_[sft_len, ppo_len], np.zeros(2 * sft_len.size, bool), EVALUATED_STRATA)
        return (evaluate.bootstrap_ci((ppo_gold - sft_gold).reshape(-1, k).mean(1), n_resamples=500),
                evaluate.stratified_difference(sft_gold, ppo_gold, strata[:sft_len.size], strata[sft_len.size:], k,
                                               n_resamples=500))

    plain, equal = run(content=0.0)
    assert plain["low"] > 0.2  # the length effect alone makes PPO look better
    assert equal["low"] < 0.0 < equal["high"]  # at equal length: nothing
    plain, equal = run(content=0.3)
    assert equal["mean"] == pytest.approx(0.3, abs=0.1) and equal["low"] > 0.0
    assert equal["n"] == n_prompts


def test_one_stratum_is_the_plain_difference_and_no_overlap_is_nan():
    sft, ppo = [1.0, 2.0, 3.0, 4.0], [2.0, 2.0, 5.0, 4.0]
    one = evaluate.stratified_difference(sft, ppo, [1] * 4, [1] * 4, k=2, n_resamples=200)
    assert one["mean"] == pytest.approx(np.mean(ppo) - np.mean(sft))
    apart = evaluate.stratified_difference(sft, ppo, [1] * 4, [2] * 4, k=2, n_resamples=50)
    assert math.isnan(apart["mean"]) and math.isnan(apart["low"])


def test_capped_responses_tell_a_cut_answer_from_one_that_ended():
    from edgerlhf.config import TINY_TOKENIZER_DIR
    from edgerlhf.models import load_tokenizer

    tok = load_tokenizer(TINY_TOKENIZER_DIR)
    words = tok(" one two three four", add_special_tokens=False)["input_ids"]  # 4 tokens
    marker = tok(" Hi\n\nHuman:", add_special_tokens=False)["input_ids"]  # the model opened the next turn
    eos = tok.eos_token_id

    def capped(ids, n, cap):
        mask = [[1] * n + [0] * (len(ids) - n)]
        return capped_responses(tok, torch.tensor([ids]), torch.tensor(mask), cap)[0]

    assert capped(words, 4, cap=4)  # ran into the cap
    assert not capped(words[:3] + [eos], 4, cap=4)  # ended with EOS on the last allowed token
    assert not capped(words[:2] + [eos, eos], 3, cap=4)  # ended early
    assert not capped(marker, len(marker), cap=len(marker))  # ended with a stop marker on the last token
