"""The dashboard follows a job's algorithm (pure parts, no browser): curves and warnings read the job's own
namespace (`grpo/kl` for a GRPO job), the Compare page's figures overlay runs of different algorithms on a
common x-axis (steps, or samples from each job's config), its frontier puts training steps and held-out points
on one reward-vs-KL plane, and its table and side-by-side answers come from the reports field by field."""

from __future__ import annotations

import math

import pytest

from edgerlhf.config import load_config
from edgerlhf.reports import JobReports, PPOReport
from frontend import alerts, charts
from frontend.live import JobFeed
from frontend.reports import eval_headline, eval_rows, run_row, side_by_side
from frontend.ui import job_label
from tests.support.runs import ev_report


def job(job_id: int, algorithm: str, **overrides) -> dict:
    """A `JobPublic` as the backend serves it: the config a job stores (`PipelineConfig.to_dict`)."""
    config = load_config("tiny", {"algorithm": algorithm, **overrides}).to_dict()
    return {"id": job_id, "name": f"{algorithm}-run", "preset": "tiny", "status": "succeeded", "config": config}


def feed_of(job_id: int, algorithm: str, metrics: dict[str, list[float | None]], stage: str = "ppo",
            **overrides) -> JobFeed:
    """A feed holding `metrics` (key -> values at steps 1, 2, ...) of a job running `algorithm`."""
    feed = JobFeed(job_id=job_id, job=job(job_id, algorithm, **overrides))
    rows, i = [], 0
    for key, values in metrics.items():
        for step, value in enumerate(values, start=1):
            i += 1
            rows.append({"id": i, "stage": stage, "key": key, "step": step, "value": value, "time": 1000.0 + i})
    feed.add_metrics(rows)
    return feed


def rising(n: int, start: float, growth: float) -> list[float]:
    return [start * growth ** i for i in range(n)]


def test_a_feed_reads_its_jobs_algorithm_namespace_and_samples_per_step_from_its_config():
    grpo = feed_of(1, "grpo", {"grpo/reward_mean": [0.1, 0.2], "sft/loss": [3.0]}, ppo={"batch_size": 16})
    assert grpo.algorithm == "grpo" and grpo.key("reward_mean") == "grpo/reward_mean"
    assert grpo.key("sft/loss") == "sft/loss"
    assert grpo.names() == ["reward_mean", "sft/loss"]
    assert grpo.samples_per_step("reward_mean") == 16  # the rollout batch, in responses
    config = grpo.job["config"]
    assert grpo.samples_per_step("sft/loss") == config["sft"]["batch_size"] * config["sft"]["grad_accum"]
    assert grpo.samples_per_step("mem/peak_mb") is None
    dpo = feed_of(2, "dpo", {}, dpo={"batch_size": 4, "grad_accum": 3})
    assert dpo.samples_per_step("loss") == 12  # preference pairs per optimizer step
    kto = feed_of(2, "kto", {}, kto={"batch_size": 6, "grad_accum": 2})
    assert kto.samples_per_step("loss") == 12  # labelled answers per optimizer step
    legacy = JobFeed(job_id=3, job={"id": 3, "name": "old", "preset": "tiny", "config": {"ppo": {"batch_size": 8}}})
    assert legacy.algorithm == "ppo" and legacy.samples_per_step("kl") == 8  # stored before the field existed
    assert job_label(grpo.job) == "#1 grpo-run (tiny, grpo)"


def test_the_job_figures_read_the_algorithms_metrics():
    grpo = feed_of(1, "grpo", {"grpo/reward_mean": [0.1, 0.3, 0.5], "grpo/reward_std": [0.2] * 3,
                               "grpo/kl": [0.0, 0.5, 1.0], "grpo/kl_coef": [0.04] * 3,
                               "grpo/response_length": [9.0, 8.0, 7.0], "grpo/entropy": [2.0, 1.9, 1.8],
                               "ppo/reward_mean": [9.0, 9.0, 9.0]})  # not this job's: must not be drawn
    reward = charts.reward_figure(grpo)
    assert reward.layout.title.text.startswith("Reward (GRPO")
    assert list(next(t for t in reward.data if t.name == "reward mean").y) == [0.1, 0.3, 0.5]
    kl = charts.kl_figure(grpo)
    assert [(t.name, list(t.y)) for t in kl.data] == [("kl", [0.0, 0.5, 1.0]), ("kl_coef", [0.04] * 3)]
    diag = charts.diagnostics_figure(grpo)
    assert [t.name for t in diag.data] == ["grpo/response_length", "grpo/entropy"]  # what GRPO logs, no clip_frac
    assert diag.layout.title.text == "GRPO diagnostics"

    dpo = feed_of(2, "dpo", {"dpo/loss": [0.69, 0.6], "dpo/accuracy": [0.5, 0.75], "dpo/margin": [0.0, 0.3],
                             "dpo/chosen_reward": [0.0, 0.1], "dpo/rejected_reward": [0.0, -0.2],
                             "dpo/eval_loss": [None, 0.65], "dpo/kl": [0.0, 0.02]})
    fig = charts.offline_figure(dpo)
    drawn = {t.name: list(t.y) for t in fig.data}
    assert drawn == {"loss": [0.69, 0.6], "eval_loss": [None, 0.65], "accuracy": [0.5, 0.75], "margin": [0.0, 0.3],
                     "chosen_reward": [0.0, 0.1], "rejected_reward": [0.0, -0.2]}
    assert next(t for t in fig.data if t.name == "eval_loss").line.dash == "dot"
    assert fig.layout.title.text == "DPO on the preference pairs"
    assert [list(t.y) for t in charts.kl_figure(dpo).data] == [[0.0, 0.02]]

    # KTO: its loss per answer, its KL estimate z beside the margin and the implicit rewards; no accuracy.
    kto = feed_of(3, "kto", {"kto/loss": [0.5, 0.45], "kto/kl": [0.0, 0.1], "kto/eval_kl": [None, 0.2],
                             "kto/margin": [0.0, 0.4], "kto/chosen_reward": [0.0, 0.3],
                             "kto/rejected_reward": [0.0, -0.1], "dpo/loss": [9.0, 9.0]})  # not this job's
    fig = charts.offline_figure(kto)
    assert {t.name: list(t.y) for t in fig.data} == {
        "loss": [0.5, 0.45], "kl": [0.0, 0.1], "eval_kl": [None, 0.2], "margin": [0.0, 0.4],
        "chosen_reward": [0.0, 0.3], "rejected_reward": [0.0, -0.1]}
    assert fig.layout.title.text == "KTO on desirable and undesirable answers"
    assert [a.text for a in fig.layout.annotations] == ["loss", "KL estimate z", "margin", "implicit rewards"]
    assert charts.measure(kto, "kto/loss").title == "KTO loss (per answer)"
    assert charts.measure(kto, "kto/kl").what.startswith("KL estimate z")


def test_a_reward_ensembles_disagreement_is_a_diagnostic_in_the_reward_models_unit():
    rloo = feed_of(1, "rloo", {"rloo/response_length": [9.0, 8.0], "rloo/ensemble_std_mean": [0.05, 0.4]},
                   reward={"ensemble": 3})
    diag = charts.diagnostics_figure(rloo)
    drawn = {t.name: list(t.y) for t in diag.data}
    assert drawn == {"rloo/response_length": [9.0, 8.0], "rloo/ensemble_std_mean": [0.05, 0.4]}
    assert "reward ensemble disagreement (std)" in [a.text for a in diag.layout.annotations]
    assert charts.measure(rloo, "rloo/ensemble_std_mean").unit == "RM score"
    assert [t.name for t in charts.diagnostics_figure(feed_of(2, "rloo", {"rloo/entropy": [1.0]})).data] == [
        "rloo/entropy"]  # one reward model: no such panel


def test_the_rewards_slope_on_length_is_a_diagnostic_per_token_of_the_reward():
    grpo = feed_of(1, "grpo", {"grpo/response_length": [9.0, 8.0], "grpo/length_slope": [0.01, -0.04]},
                   ppo={"rewards": [{"kind": "length", "target": 20}, {"kind": "reward_model"}]})
    diag = charts.diagnostics_figure(grpo)
    assert {t.name: list(t.y) for t in diag.data} == {"grpo/response_length": [9.0, 8.0],
                                                      "grpo/length_slope": [0.01, -0.04]}
    assert charts.measure(grpo, "grpo/length_slope").unit == "weighted sum of 2 terms per token"


def test_compare_overlays_a_metric_by_name_across_algorithms_on_steps_or_samples():
    feeds = {"#1 a": feed_of(1, "ppo", {"ppo/reward_mean": [0.1, 0.2, 0.3], "sft/eval_loss": [2.0]},
                             ppo={"batch_size": 8, "samples_per_prompt": 1}),
             "#2 b": feed_of(2, "grpo", {"grpo/reward_mean": [0.5, 0.7], "ppo/reward_mean": [9.0, 9.0]},
                             ppo={"batch_size": 16}),
             "#3 c": feed_of(3, "dpo", {"dpo/loss": [0.7, 0.6]}, dpo={"batch_size": 4, "grad_accum": 2})}
    steps = charts.compare_figure(feeds, "reward_mean")
    assert [(t.name, list(t.x), list(t.y)) for t in steps.data] == [
        ("#1 a (ppo)", [1, 2, 3], [0.1, 0.2, 0.3]), ("#2 b (grpo)", [1, 2], [0.5, 0.7])]  # DPO has no reward_mean
    assert steps.layout.title.text == "reward_mean (ppo, grpo)" and steps.layout.xaxis.title.text == "step"
    samples = charts.compare_figure(feeds, "reward_mean", x="samples")
    assert [list(t.x) for t in samples.data] == [[8, 16, 24], [16, 32]]
    assert samples.layout.xaxis.title.text == "samples seen"
    assert [list(t.x) for t in charts.compare_figure(feeds, "loss", x="samples").data] == [[8, 16]]
    full = charts.compare_figure(feeds, "sft/eval_loss")
    assert [(t.name, list(t.y)) for t in full.data] == [("#1 a", [2.0])]
    with pytest.raises(ValueError):
        charts.compare_figure(feeds, "kl", x="tokens")


def test_the_frontier_has_each_sampling_runs_trajectory_and_every_runs_held_out_point():
    prompts = ["\n\nHuman: a?\n\nAssistant:", "\n\nHuman: b?\n\nAssistant:"]
    ppo = feed_of(1, "ppo", {"ppo/kl": [0.1, 0.4, math.nan, 0.9], "ppo/reward_mean": [0.0, 0.2, 0.3, 0.5]})
    ppo.report = JobReports(evaluate=ev_report("ppo", 0.8, -0.1, 0.45, prompts))
    dpo = feed_of(2, "dpo", {"dpo/kl": [0.01, 0.02], "dpo/loss": [0.7, 0.6]})
    dpo.report = JobReports(evaluate=ev_report("dpo", 0.3, -0.1, 0.2, prompts))
    unscored = feed_of(3, "dpo", {"dpo/loss": [0.7]})
    unscored.report = JobReports(evaluate=ev_report("dpo", 0.2, None, None, prompts))
    fig = charts.frontier_figure({"#1 p": ppo, "#2 d": dpo, "#3 u": unscored})
    traces = {t.name: t for t in fig.data}
    assert set(traces) == {"#1 p (ppo) training", "#1 p (ppo) held-out: SFT → PPO", "#2 d (dpo) held-out: SFT → DPO"}
    path = traces["#1 p (ppo) training"]
    assert list(zip(path.x, path.y, path.text)) == [(0.1, 0.0, "step 1"), (0.4, 0.2, "step 2"), (0.9, 0.5, "step 4")]
    held = traces["#2 d (dpo) held-out: SFT → DPO"]
    assert list(held.x) == [0.0, 0.3] and list(held.y) == [-0.1, 0.2]
    assert fig.layout.xaxis.title.text.startswith("KL") and fig.layout.yaxis.title.text == "reward (RM score)"


def test_run_rows_and_side_by_side_answers_come_from_the_reports():
    prompts = ["\n\nHuman: shared?\n\nAssistant:", "\n\nHuman: only ppo?\n\nAssistant:"]
    ppo = feed_of(1, "ppo", {"ppo/reward_mean": [0.1, 0.4], "ppo/step_s": [2.0, 4.0]})
    ppo.report = JobReports(
        ppo=PPOReport(algorithm="ppo", steps=2, resumed_from_step=0, reward_precision="bf16",
                      reward_model="shared adapter", compute_dtype="float32", device="cpu", trainable_parameters=10,
                      network_bytes=100, held_bytes=100, network_copies=1.0, first={"ppo/reward_mean": 0.1},
                      final={"ppo/reward_mean": 0.25}, kl_coef_final=0.1, wall_s=7.0, peak_rss_mb=812.5,
                      memory={"mem/rss_mb": 700.0}),
        evaluate=ev_report("ppo", 0.8, -0.1, 0.45, prompts))
    dpo = feed_of(2, "dpo", {"dpo/loss": [0.7, 0.6], "dpo/step_s": [1.0, 1.0]})
    dpo.report = JobReports(evaluate=ev_report("dpo", 0.3, None, None, prompts[:1], gold=False))
    row = run_row("#1 p", ppo)
    assert row == {"job": "#1 p", "algorithm": "ppo", "steps": 2, "final reward (training)": 0.25,
                   "reward (held-out)": 0.45, "reward gain": pytest.approx(0.55), "gold gain": 0.4,
                   "KL (held-out)": 0.8, "response tokens": 17.0, "peak memory (MB)": 812.5, "peak of": "RSS",
                   "s / step": 3.0}
    row = run_row("#2 d", dpo)  # running: no alignment report yet; no reward model, no gold scorer
    assert (row["algorithm"], row["steps"], row["final reward (training)"], row["reward (held-out)"],
            row["gold gain"], row["KL (held-out)"], row["peak memory (MB)"]) == ("dpo", 2, None, None, None, 0.3, None)

    rows = side_by_side({"#1 p": ppo.report.evaluate, "#2 d": dpo.report.evaluate, "#3 none": None})
    assert [r["prompt"] for r in rows] == prompts  # the prompt both runs answered first
    assert {label: a["ppo"] for label, a in rows[0]["answers"].items()} == {"#1 p": "ppo answer 0", "#2 d": "dpo answer 0"}
    assert rows[1]["answers"]["#2 d"] is None and rows[1]["answers"]["#1 p"]["ppo_reward"] == 1.45


def test_reports_without_a_reward_model_read_without_reward_rows():
    ev = ev_report("dpo", 0.3, None, None, ["p"])
    assert [r["measure"] for r in eval_rows(ev)][0] == "gold score (question)"
    head = eval_headline(ev)
    assert "reward PPO" not in head and head["KL"] == 0.3 and head["gold PPO−SFT"] == 0.4
    fig = charts.eval_figure(ev)
    assert [(t.name, t.y[0]) for t in fig.data] == [("SFT", -1.0), ("DPO", -0.6)]
    assert fig.layout.title.text == "SFT vs DPO (mean ± std)"


def test_the_warnings_follow_the_jobs_algorithm():
    n = 9
    hacking = {"grpo/reward_mean": [0.1 * i for i in range(n)], "grpo/kl": rising(n, 0.5, 1.6),
               "grpo/response_length": [20.0] * n}
    series = feed_of(1, "grpo", hacking).all_series()
    assert [a.code for a in alerts.reward_hacking(series, algorithm="grpo")] == ["reward_hacking"]
    assert alerts.reward_hacking(series) == [], "a PPO job's check reads ppo/*"
    grpo_job = job(1, "grpo")
    assert [a.code for a in alerts.check_job(grpo_job, series)] == ["reward_hacking"]

    # KL far over twice the target while the reward stays flat: a blow-up, not hacking.
    flat = feed_of(2, "grpo", {"grpo/reward_mean": [0.2] * n, "grpo/kl": [1.0, 2, 4, 8, 12, 14, 15, 15, 16],
                               "grpo/response_length": [20.0] * n}).all_series()
    # (the limit is twice the job's `ppo.target_kl`; the last third's KL is 15.3)
    assert [a.code for a in alerts.check_job(job(2, "grpo", ppo={"target_kl": 5.0}), flat)] == ["kl_blowup"]
    assert alerts.check_job(job(2, "grpo", ppo={"target_kl": 8.0}), flat) == []

    # Responses shrinking to almost nothing.
    shrinking = feed_of(3, "rloo", {"rloo/response_length": [20.0, 19, 17, 12, 8, 5, 3, 2, 1]}).all_series()
    (collapse,) = alerts.check_job(job(3, "rloo"), shrinking)
    assert collapse.code == "length_collapse" and "from 18.7 to 2 tokens" in collapse.message
    assert alerts.length_collapse(feed_of(4, "rloo", {"rloo/response_length": [20.0] * n}).all_series(),
                                  algorithm="rloo") == []

    # DPO: no sampling limits; its KL stuck at zero is still the policy not moving, a NaN loss still an error.
    dpo = feed_of(5, "dpo", {"dpo/kl": [0.0] * 6, "dpo/loss": [0.69, 0.69, None, 0.6, 0.6, 0.6]}).all_series()
    assert [a.code for a in alerts.check_job(job(5, "dpo"), dpo)] == ["nan", "kl_collapse"]
    # KTO's KL is an estimate clamped at 0, which stays there while the policy moves: no KL-collapse warning.
    kto = feed_of(6, "kto", {"kto/kl": [0.0] * 6, "kto/loss": [0.5, 0.5, None, 0.4, 0.4, 0.4]}).all_series()
    assert [a.code for a in alerts.check_job(job(6, "kto"), kto)] == ["nan"]
