"""The job's charts read without guessing (pure figures, no browser): every axis of every figure builder in
`frontend.charts` says what it shows and its unit, every trace has a name, a flat series gets a range around its
value and a non-negative quantity no negative range, the memory chart names each reading and marks where each
stage began, probe scores read as gold scores, a GRPO run reads GRPO, and smoothing is W&B's debiased moving
average over a faint raw series.

The pages that draw them (Streamlit's AppTest against a real backend process and SQLite file): the Compare page's
smoothing slider, and the Probes page's gold scores and checkpoints named after the job's algorithm."""

from __future__ import annotations

import inspect
import json
import re
import statistics
from datetime import datetime

import httpx
import pytest

from edgerlhf.config import load_config
from edgerlhf.reports import JobReports
from frontend import charts
from frontend.live import JobFeed
from tests.support.dashboard import APP, TIMEOUT
from tests.support.runs import JobWriter, ev_report

PROMPTS = ["\n\nHuman: Where do owls sleep?\n\nAssistant:", "\n\nHuman: Is tea good?\n\nAssistant:"]


def feed_of(job_id: int, algorithm: str, stages: dict[str, dict[str, list[float | None]]], **overrides) -> JobFeed:
    """A feed of a `tiny` job running `algorithm` whose stages logged `stages` (stage -> key -> values at steps
    1, 2, ...), stage after stage, one second apart."""
    config = load_config("tiny", {"algorithm": algorithm, **overrides}).to_dict()
    feed = JobFeed(job_id=job_id, job={"id": job_id, "name": f"{algorithm}-run", "preset": "tiny",
                                       "status": "succeeded", "config": config})
    rows = []
    for stage, metrics in stages.items():
        for key, values in metrics.items():
            for step, value in enumerate(values, start=1):
                rows.append({"id": len(rows) + 1, "stage": stage, "key": key, "step": step, "value": value,
                             "time": 1000.0 + len(rows)})
    feed.add_metrics(rows)
    return feed


def memory(n: int, start: float) -> dict[str, list[float]]:
    return {key: [start + 10 * i for i in range(n)] for key in charts.MEMORY_SERIES}


PRECISIONS = ("bf16", "int4")


def ppo_feed() -> JobFeed:
    n = 4
    feed = feed_of(1, "ppo", {
        "sft": {"sft/loss": [3.0, 2.5, 2.2, 2.0], "sft/eval_loss": [None, 2.6, None, 2.3], **memory(n, 500.0)},
        "reward": {**{f"reward/{p}/{m}": [0.7, 0.6, 0.5, 0.45] for p in PRECISIONS for m in ("loss", "eval_loss")},
                   **{f"reward/{p}/{m}": [0.5, 0.6, 0.7, 0.7] for p in PRECISIONS
                      for m in ("accuracy", "eval_accuracy")},
                   **memory(n, 600.0)},
        "ppo": {"ppo/reward_mean": [0.1, 0.3, None, 0.5], "ppo/reward_std": [0.2] * n, "ppo/kl": [0.0, 0.4, 0.9, 1.2],
                "ppo/kl_coef": [0.1] * n, "ppo/policy_loss": [0.02, -0.01, 0.0, 0.01], "ppo/value_loss": [0.3] * n,
                "ppo/response_length": [20.0, 18.0, 17.0, 15.0], "ppo/cap_hit_rate": [0.5, 0.25, 0.0, 0.0],
                "ppo/entropy": [2.0, 1.9, 1.8, 1.8], "ppo/clip_frac": [0.1] * n, "ppo/approx_kl": [0.01] * n,
                "ppo/tokens_per_s": [900.0, 950.0, 920.0, 940.0], **memory(n, 700.0)}})
    feed.report = JobReports(evaluate=ev_report("ppo", 1.1, -0.2, 0.5, PROMPTS))
    return feed


def grpo_feed() -> JobFeed:
    feed = feed_of(2, "grpo", {
        "sft": {"sft/loss": [3.0, 2.4], "sys/rss_mb": [500.0, 520.0]},
        "ppo": {"grpo/reward_mean": [0.2, 0.6], "grpo/kl": [0.05, 0.2], "grpo/kl_coef": [0.04] * 2,
                "grpo/response_length": [12.0, 11.0], "grpo/entropy": [1.5, 1.4], "sys/rss_mb": [600.0, 610.0]}})
    feed.report = JobReports(evaluate=ev_report("grpo", 0.4, -0.2, 0.6, PROMPTS))
    return feed


TERMS = [{"kind": "reference_answer", "column": "answer", "name": "correct"},
         {"kind": "regex", "pattern": "^Answer:", "weight": 0.2, "name": "format"}]


def terms_feed() -> JobFeed:
    """A GRPO job scored by two stated reward terms (`ppo.rewards`)."""
    logged = {"grpo/reward_mean": [0.3, 0.7], "grpo/rewards/correct_mean": [0.1, 0.5],
              "grpo/rewards/correct_std": [0.3, 0.5], "grpo/rewards/format_mean": [1.0, 1.0],
              "grpo/rewards/format_std": [0.0, 0.0]}
    feed = feed_of(4, "grpo", {"ppo": logged})
    feed.job["config"]["ppo"]["rewards"] = TERMS  # as a job with `ppo.rewards` stores it (config.to_dict)
    return feed


def dpo_feed() -> JobFeed:
    return feed_of(3, "dpo", {"ppo": {"dpo/loss": [0.69, 0.6], "dpo/eval_loss": [None, 0.65],
                                      "dpo/accuracy": [0.5, 0.75], "dpo/eval_accuracy": [None, 0.7],
                                      "dpo/margin": [0.0, 0.3], "dpo/eval_margin": [None, 0.2],
                                      "dpo/chosen_reward": [0.0, 0.1], "dpo/rejected_reward": [0.0, -0.2],
                                      "dpo/kl": [0.0, 0.02], "dpo/eval_kl": [None, 0.03]}})


def kto_feed() -> JobFeed:
    return feed_of(6, "kto", {"ppo": {"kto/loss": [0.5, 0.45], "kto/eval_loss": [None, 0.47],
                                      "kto/kl": [0.0, 0.1], "kto/eval_kl": [None, 0.2],
                                      "kto/margin": [0.0, 0.3], "kto/eval_margin": [None, 0.2],
                                      "kto/chosen_reward": [0.0, 0.2], "kto/rejected_reward": [0.0, -0.1]}})


def hacking_feed() -> JobFeed:
    """A GRPO job on the known-answer task with a validation reward model: the proxy climbs, the validation reward
    and the gold peak at step 3 and fall."""
    return feed_of(7, "grpo", {"ppo": {
        "grpo/reward_mean": [0.0, 0.5, 1.0, 1.5, 2.0], "grpo/reward_std": [0.5] * 5,
        "grpo/kl": [0.0, 1.0, 2.0, 4.0, 8.0],
        "grpo/validation_reward_mean": [0.0, 0.3, 0.4, 0.2, -0.1], "grpo/validation_reward_std": [0.4] * 5,
        "grpo/gold_mean": [0.1, 0.15, 0.2, 0.1, None], "grpo/gold_std": [0.0, 0.1, 0.1, 0.1, 0.1]}},
        reward={"validation": True})


def probes() -> tuple[list[dict], list[str]]:
    rows = [{"prompt": p, "checkpoint": ckpt, "stage": ckpt.split("/")[0], "step": 0, "reward": -1.0 + i + j}
            for i, ckpt in enumerate(["sft/step-30", "ppo/step-5", "ppo/step-10"]) for j, p in enumerate(PROMPTS)]
    return rows, ["sft/step-30", "ppo/step-5", "ppo/step-10"]


PRECISION_ROWS = [{"precision": "bf16", "accuracy": 0.8, "peak_train_mb": 900.0, "throughput_pairs_per_s": 480.0},
                  {"precision": "int4", "accuracy": 0.78, "peak_train_mb": 400.0, "throughput_pairs_per_s": 300.0}]


def chain() -> list[tuple[int, str, dict]]:
    """Three rounds of RLHF (round, job label, evaluate report), each gaining gold over its start."""
    return [(1, "#1 p", ev_report("ppo", 1.1, -0.2, 0.5, PROMPTS)),
            (2, "#5 g", ev_report("grpo", 0.4, 0.3, 0.6, PROMPTS)),
            (3, "#9 d", ev_report("dpo", 0.2, 0.5, 0.55, PROMPTS))]


def compared() -> dict[str, JobFeed]:
    return {"#1 p": ppo_feed(), "#2 g": grpo_feed(), "#3 d": dpo_feed()}


BUILDERS = {
    "reward_figure": lambda s: [charts.reward_figure(ppo_feed(), smoothing=s),
                                charts.reward_figure(grpo_feed(), smoothing=s)],
    "reward_terms_figure": lambda s: [charts.reward_terms_figure(terms_feed(), smoothing=s)],
    "proxy_figure": lambda s: [charts.proxy_figure(hacking_feed(), smoothing=s)],
    "kl_figure": lambda s: [charts.kl_figure(ppo_feed(), smoothing=s), charts.kl_figure(dpo_feed(), smoothing=s)],
    "keys_figure": lambda s: [charts.keys_figure(ppo_feed(), ["ppo/policy_loss"], "Policy loss", "ppo", smoothing=s),
                              charts.keys_figure(ppo_feed(), ["sft/loss", "sft/eval_loss"], "SFT loss", "sft", y="loss",
                                                 smoothing=s)],
    "diagnostics_figure": lambda s: [charts.diagnostics_figure(ppo_feed(), smoothing=s),
                                     charts.diagnostics_figure(grpo_feed(), smoothing=s)],
    "offline_figure": lambda s: [charts.offline_figure(dpo_feed(), smoothing=s),
                                 charts.offline_figure(kto_feed(), smoothing=s)],
    "reward_model_figure": lambda s: [charts.reward_model_figure(ppo_feed(), smoothing=s)],
    "precision_figure": lambda s: [charts.precision_figure(PRECISION_ROWS)],
    "eval_figure": lambda s: [charts.eval_figure(ev_report("rloo", 0.5, -0.2, 0.4, PROMPTS)),
                              charts.eval_figure(ev_report("dpo", 0.3, None, None, PROMPTS, gold=False))],
    "memory_figure": lambda s: [charts.memory_figure(ppo_feed(), 8188.0, smoothing=s),
                                charts.memory_figure(ppo_feed(), None, smoothing=s)],
    "compare_figure": lambda s: [charts.compare_figure(compared(), "reward_mean", smoothing=s),
                                 charts.compare_figure(compared(), "loss", "samples", smoothing=s),
                                 charts.compare_figure(compared(), "sft/loss", smoothing=s)],
    "frontier_figure": lambda s: [charts.frontier_figure(compared())],
    "rounds_figure": lambda s: [charts.rounds_figure(chain(), "gold"), charts.rounds_figure(chain(), "reward")],
    "probe_reward_figure": lambda s: [charts.probe_reward_figure(*probes(), scorer="concise", algorithm="grpo")],
    "histogram_figure": lambda s: [charts.histogram_figure({"edges": [0, 8, 16, 24], "counts": [3, 5, 1]},
                                                           "Prompt length (tokens)", 12)],
}
"""Each public figure builder of `frontend.charts`, built from small synthetic feeds and reports (smoothing `s`
where the builder takes it)."""

TIME_SERIES = ("reward_figure", "kl_figure", "keys_figure", "diagnostics_figure", "offline_figure",
               "reward_model_figure", "memory_figure", "compare_figure", "proxy_figure")
"""The builders of curves over steps or time: each takes `smoothing`."""


def figure_builders() -> set[str]:
    return {name for name, fn in inspect.getmembers(charts, inspect.isfunction)
            if name.endswith("_figure") and not name.startswith("_") and fn.__module__ == charts.__name__}


def axes(fig) -> list[str]:
    """The layout names of every axis a trace is drawn on or the layout defines (`xaxis`, `yaxis2` ...)."""
    names = {key for key in fig.layout.to_plotly_json() if re.fullmatch(r"[xy]axis\d*", key)}
    for t in fig.data:
        names |= {"xaxis" + (t.xaxis or "x")[1:], "yaxis" + (t.yaxis or "y")[1:]}
    return sorted(names)


UNITS = {m.unit for table in (charts.ALIGNMENT_MEASURES, charts.LM_MEASURES, charts.REWARD_MODEL_MEASURES,
                              charts.EVALUATE_MEASURES, *charts.ALGORITHM_MEASURES.values())
         for m in table.values()} | {m.unit for _, m in charts.PRECISION_PANELS}
"""The units the charts know; a y-axis reads `what (unit)` or, under a subplot title that says what, the unit."""


def unreadable(fig) -> list[str]:
    """What a person could not read off `fig`: an axis without a title, a y-axis without a unit, a trace without
    a name."""
    problems = []
    for name in axes(fig):
        title = (fig.layout[name].title.text or "").strip()
        if not title:
            problems.append(f"{name} has no title")
        elif name.startswith("y") and not (title.endswith(")") or title in UNITS):
            problems.append(f"{name} title {title!r} has no unit")
    problems += [f"trace {i} ({t.type}) has no name" for i, t in enumerate(fig.data) if not (t.name or "").strip()]
    return problems


@pytest.mark.parametrize("smoothing", [0.0, 0.6])
def test_every_figure_builder_titles_every_axis_with_its_unit_and_names_every_trace(smoothing):
    assert figure_builders() == set(BUILDERS), "a new figure builder must be listed in BUILDERS (and read well)"
    for name, build in BUILDERS.items():
        for i, fig in enumerate(build(smoothing)):
            assert fig.data, f"{name} #{i} drew nothing from the synthetic feed"
            assert unreadable(fig) == [], f"{name} #{i} ({fig.layout.title.text})"


def test_time_series_builders_smooth_on_request_and_draw_raw_by_default():
    for name in TIME_SERIES:
        parameter = inspect.signature(getattr(charts, name)).parameters.get("smoothing")
        assert parameter is not None and parameter.default == 0.0, name
        assert parameter.kind == parameter.POSITIONAL_OR_KEYWORD, name
    for name in TIME_SERIES:
        raw, smooth = BUILDERS[name](0.0)[0], BUILDERS[name](0.6)[0]
        assert not any(t.name.endswith("(smoothed)") for t in raw.data), name
        smoothed = [t for t in smooth.data if t.name.endswith("(smoothed)")]
        assert smoothed, f"{name} has no smoothed series"
        for t in smoothed:  # drawn over its raw series, faint, under the same legend entry
            under = next(r for r in smooth.data if r.name == t.name.removesuffix(" (smoothed)")
                         and r.legendgroup == t.legendgroup and r.yaxis == t.yaxis)
            assert under.opacity < 1 and t.line.width > under.line.width and list(under.x) == list(t.x), name
            assert [v is None for v in t.y] == [v is None for v in under.y], f"{name}: a gap stays a gap"


def test_ema_is_the_debiased_moving_average_and_keeps_gaps():
    assert charts.ema([1.0, 2.0, None, 4.0], 0.0) == [1.0, 2.0, None, 4.0]
    # last = w * last + (1 - w) * v, divided by 1 - w^n: 0.5 / 0.5, 1.25 / 0.75, (gap), 2.625 / 0.875
    assert charts.ema([1.0, 2.0, None, 4.0], 0.5) == pytest.approx([1.0, 5 / 3, None, 3.0])
    assert charts.ema([float("nan"), 2.0, 2.0], 0.9) == pytest.approx([None, 2.0, 2.0]), "no pull towards 0"
    assert charts.ema([], 0.5) == []
    with pytest.raises(ValueError):
        charts.ema([1.0], 1.0)


def test_a_flat_series_gets_a_range_around_its_value_and_kl_never_a_negative_one():
    assert charts.flat_range([0.1, 0.1, None], low=0.0) == pytest.approx([0.05, 0.15])
    assert charts.flat_range([0.0, 0.0], low=0.0) == [0.0, 1.0]
    assert charts.flat_range([-2.0, -2.0]) == [-3.0, -1.0]
    assert charts.flat_range([1.0, 1.0], low=0.0, high=1.0) == pytest.approx([0.5, 1.05])
    assert charts.flat_range([0.1, 0.2]) is None and charts.flat_range([None]) is None

    # The chart: a constant KL coefficient of 0.1 on an axis from -0.765 to 1.04.
    fig = charts.kl_figure(ppo_feed())
    assert fig.layout.yaxis2.range == pytest.approx((0.05, 0.15))
    assert fig.layout.yaxis2.title.text == "KL coefficient β (reward per nat)"
    assert fig.layout.yaxis.title.text == "KL to the reference (nats per answer)"
    assert fig.layout.yaxis.rangemode == "nonnegative"
    assert [t.name for t in fig.data] == ["kl", "kl_coef"], "the update size (approx_kl) has its own unit: diagnostics"
    flat = charts.kl_figure(feed_of(9, "grpo", {"ppo": {"grpo/kl": [0.0, 0.0, 0.0]}}))
    assert flat.layout.yaxis.range == (0.0, 1.0) and "yaxis2" not in flat.layout.to_plotly_json()


def test_the_memory_chart_names_each_reading_draws_it_by_the_clock_and_marks_the_stages():
    feed = feed_of(4, "grpo", {"sft": {"sys/rss_mb": [500.0, 520.0, 510.0], "mem/rss_mb": [505.0, 515.0, 512.0]},
                               "reward": {"sys/rss_mb": [600.0, 610.0]},
                               "ppo": {"sys/rss_mb": [700.0, 720.0], "mem/rss_mb": [705.0, 722.0]}})
    # A reading that arrived late (a new row id) but was taken earlier is drawn where its clock time puts it.
    late = feed.metrics[("sft", "sys/rss_mb", 2)]
    feed.add_metrics([{**late, "id": 99}])
    fig = charts.memory_figure(feed, None)
    assert [t.name for t in fig.data] == ["job process RSS (at steps)", "job process RSS (sampled)"]
    sampled = fig.data[1]
    assert list(sampled.x) == sorted(sampled.x) and list(sampled.y) == [500.0, 520.0, 510.0, 600.0, 610.0, 700.0, 720.0]
    assert sampled.text[-1] == "GRPO step 2", "the alignment stage reads as the job's algorithm"
    starts = {a.text: a.x for a in fig.layout.annotations}
    assert list(starts) == ["SFT", "reward model", "GRPO"]
    stages = ("sft", "reward", "ppo")
    first = {stage: min(r["time"] for k, r in feed.metrics.items() if k[0] == stage) for stage in stages}
    assert list(starts.values()) == [datetime.fromtimestamp(first[s]) for s in stages]
    assert [s.x0 for s in fig.layout.shapes] == list(starts.values()), "a vertical line where each stage began"
    assert fig.layout.yaxis.rangemode == "nonnegative"

    gpu = charts.memory_figure(ppo_feed(), 8188.0)
    assert len({t.name for t in gpu.data}) == len(gpu.data) == len(charts.MEMORY_SERIES)


def test_probe_scores_read_as_gold_and_checkpoints_after_the_algorithm():
    fig = charts.probe_reward_figure(*probes(), scorer="concise", algorithm="grpo")
    assert fig.layout.yaxis.title.text == "gold score (concise)" and "reward" not in fig.layout.title.text.lower()
    assert list(fig.layout.xaxis.categoryarray) == ["sft/step-30", "grpo/step-5", "grpo/step-10"]
    assert list(fig.data[0].x) == ["sft/step-30", "grpo/step-5", "grpo/step-10"]
    assert charts.checkpoint_name("ppo", "rloo") == "rloo" and charts.checkpoint_name("base", "grpo") == "base"


def test_figures_name_the_jobs_algorithm_and_its_units():
    grpo = grpo_feed()
    assert charts.reward_figure(grpo).layout.title.text.startswith("Reward (GRPO")
    assert charts.diagnostics_figure(grpo).layout.title.text == "GRPO diagnostics"
    rloo = charts.eval_figure(ev_report("rloo", 0.5, -0.2, 0.4, PROMPTS))
    assert [t.name for t in rloo.data] == ["SFT", "RLOO", "SFT", "RLOO"]
    assert rloo.layout.yaxis.title.text == "reward (RM score)"
    assert rloo.layout.yaxis2.title.text == "gold score (question)"
    scored = feed_of(5, "grpo", {"ppo": {"grpo/reward_mean": [0.1, 0.2]}}, ppo={"reward_function": "concise"})
    assert charts.reward_figure(scored).layout.yaxis.title.text == "reward (function concise)"
    assert charts.measure(grpo, "grpo/response_length").title == "response length (tokens)"
    assert charts.measure(grpo, "sft/loss").title == "cross-entropy (nats per token)"
    assert charts.measure(grpo, "reward/int4/eval_accuracy").unit == "share of pairs"
    assert charts.measure(dpo_feed(), "dpo/loss").title == "preference loss (nats per pair)"
    assert charts.measure(grpo, "sys/gpu_used_mb").title == "memory (MB)"
    assert charts.measure(grpo, "custom/thing").title == "thing (as logged)"
    frontier = charts.frontier_figure(compared())
    assert frontier.layout.yaxis.title.text == "reward (RM score)" and frontier.layout.xaxis.rangemode == "nonnegative"


def charts_on(at) -> dict[str, dict]:
    """The page's plotly figures (as JSON) by title."""
    specs = [json.loads(el.proto.spec) for el in at.get("plotly_chart")]
    return {spec["layout"]["title"]["text"]: spec for spec in specs}


def test_compare_smooths_on_request_and_probes_read_as_gold_after_the_algorithm(backend, dashboard_env):
    from streamlit.testing.v1 import AppTest

    dashboard_env(backend.url)
    job = httpx.post(f"{backend.url}/api/jobs", timeout=30, json={
        "preset": "tiny", "name": "grpo-run", "overrides": {"algorithm": "grpo"}}).json()
    writer = JobWriter(backend.db_url, job["id"])
    writer.claim()
    writer.begin("ppo")
    rewards = [0.1, 0.5, 0.2, 0.6]
    writer.metrics("ppo", {"grpo/reward_mean": rewards, "grpo/kl": [0.1, 0.2, 0.3, 0.4]}, start=1)
    writer.samples("ppo", [{"kind": "probe", "checkpoint": ckpt, "step": step, "seq": 0, "prompt": PROMPTS[0],
                            "response": f"{ckpt} answer", "reward": score}
                           for ckpt, step, score in (("sft/step-30", 30, -1.0), ("ppo/step-4", 4, -0.5))])
    writer.close()

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception, at.exception
    reward = charts_on(at)["reward_mean (grpo)"]
    assert [t["name"] for t in reward["data"]] == [f"#{job['id']} grpo-run (grpo)"]
    assert reward["layout"]["yaxis"]["title"]["text"] == "reward (RM score)"
    at.slider(key="compare_smoothing").set_value(0.5).run()
    assert not at.exception, at.exception
    raw, smooth = charts_on(at)["reward_mean (grpo)"]["data"]
    assert raw["y"] == rewards and smooth["name"] == f"#{job['id']} grpo-run (grpo) (smoothed)"
    assert smooth["y"] == pytest.approx(charts.ema(rewards, 0.5))

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["job"] = str(job["id"])
    at.run()
    at.switch_page("app_pages/probes.py").run()
    assert not at.exception, at.exception
    (probe,) = charts_on(at).values()
    assert probe["layout"]["yaxis"]["title"]["text"] == "gold score (concise)"  # the tiny preset's gold scorer
    assert probe["layout"]["xaxis"]["categoryarray"] == ["sft/step-30", "grpo/step-4"]
    labels = [m.value for m in at.markdown if m.value.startswith("`")]
    assert labels == ["`sft/step-30` · gold (concise) **-1**", "`grpo/step-4` · gold (concise) **-0.5**"]


def test_the_stated_reward_terms_are_drawn_each_by_name_with_its_weight():
    fig = charts.reward_terms_figure(terms_feed())
    assert charts.reward_terms(terms_feed()) == ["correct", "format"]
    assert [t.name for t in fig.data] == ["correct (× 1)", "format (× 0.2)"]
    assert list(fig.data[0].y) == [0.1, 0.5] and list(fig.data[1].y) == [1.0, 1.0]
    assert charts.reward_terms(grpo_feed()) == []  # scored by the reward model alone: no terms


def test_the_proxy_chart_puts_each_signal_on_one_scale_against_kl_and_step():
    """Proxy, validation reward and gold, each as its change since step 1 in step 1's batch std, drawn against the
    KL (left) and the step (right); a gold whose first batch was all alike is scaled by the spread of its means."""
    fig = charts.proxy_figure(hacking_feed())
    names = [t.name for t in fig.data]
    assert names == ["proxy reward (RM score)", "proxy reward (RM score)", "validation reward model",
                     "validation reward model", "gold (concise)", "gold (concise)"]
    left = {t.name: t for t in fig.data if t.xaxis in (None, "x")}
    right = {t.name: t for t in fig.data if t.xaxis == "x2"}
    assert list(left["proxy reward (RM score)"].x) == [0.0, 1.0, 2.0, 4.0, 8.0]
    assert list(left["proxy reward (RM score)"].y) == pytest.approx([0.0, 1.0, 2.0, 3.0, 4.0])  # (r - 0) / 0.5
    assert list(right["validation reward model"].x) == [1, 2, 3, 4, 5]
    assert list(right["validation reward model"].y) == pytest.approx([0.0, 0.75, 1.0, 0.5, -0.25])  # (v - 0) / 0.4
    gold = list(right["gold (concise)"].y)
    spread = statistics.pstdev([0.1, 0.15, 0.2, 0.1])
    assert gold[:4] == pytest.approx([0.0, 0.05 / spread, 0.1 / spread, 0.0]) and gold[4] is None
    assert fig.layout.xaxis.title.text == charts.KL.title and fig.layout.xaxis2.title.text == "step"
    assert charts.independent_signals(hacking_feed()) == ["validation reward model", "gold"]
    assert charts.independent_signals(grpo_feed()) == []
    assert charts.measure(hacking_feed(), "grpo/gold_mean").title == "gold score (concise)"
