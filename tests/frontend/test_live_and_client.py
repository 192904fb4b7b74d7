"""Pure parts of the dashboard: the session's job history (merge, replace on resume, views), the API
client's error parsing, checkpoint ordering, the figures built from a history, each stage's time left
(`live.job_clock`), the verdict and the result columns (`reports.verdict`, `result_columns`), how numbers and model
text are shown (`ui.fmt`, `ui.table`, `ui.clean_text`) and which texts are flagged (`frontend.flagged`)."""

from __future__ import annotations

import codecs
import math
from datetime import datetime, timedelta, timezone

import pytest

from edgerlhf.reports import EvalReport, Interval
from frontend import charts, ui
from frontend.api_client import ApiClient, BackendDown, ContractError, parse_error
from frontend.flagged import flagged_sample, is_flagged
from frontend.live import JobFeed, finished_stages, job_clock
from frontend.reports import (eval_headline, eval_pairs, eval_rows, eval_scalars, override_rows, precision_rows,
                              reading, result_columns, verdict)
from frontend.ui import checkpoint_order
from tests.support.dashboard import answering
from tests.support.procs import free_port
from tests.support.runs import ev_report


def metric(i, stage, key, step, value, t=None):
    return {"id": i, "stage": stage, "key": key, "step": step, "value": value, "time": t or 1000.0 + i}


def test_feed_merges_and_a_relogged_step_replaces_the_old_value():
    feed = JobFeed(job_id=1)
    feed.add_metrics([metric(1, "ppo", "ppo/kl", 0, 0.1), metric(2, "ppo", "ppo/kl", 1, 0.2),
                      metric(3, "sft", "sft/loss", 0, 3.0)])
    # A resumed stage re-logs step 1 (the backend gives the row a new id); the newer value wins.
    feed.add_metrics([metric(7, "ppo", "ppo/kl", 1, 0.25), metric(8, "ppo", "ppo/kl", 2, None)])
    assert feed.series("ppo/kl") == [(0, 0.1), (1, 0.25), (2, None)]
    assert feed.series("sft/loss", "sft") == [(0, 3.0)] and feed.series("sft/loss", "ppo") == []
    assert feed.last("ppo/kl") == 0.25  # the NaN (None) point is skipped
    assert feed.keys() == ["ppo/kl", "sft/loss"]
    assert feed.rows_downloaded == 5


def test_memory_series_spans_stages_in_logging_order():
    feed = JobFeed(job_id=1)
    feed.add_metrics([metric(1, "sft", "mem/rss_mb", 0, 100.0), metric(2, "sft", "mem/rss_mb", 1, 110.0),
                      metric(3, "ppo", "mem/rss_mb", 0, 300.0)])
    assert [(stage, v) for _, _, stage, v in feed.timed("mem/rss_mb")] == [("sft", 100.0), ("sft", 110.0), ("ppo", 300.0)]


def test_samples_are_not_duplicated_by_id_and_filter_by_kind():
    feed = JobFeed(job_id=1)
    feed.add_samples([{"id": 1, "kind": "sample"}, {"id": 2, "kind": "probe"}])
    feed.add_samples([{"id": 2, "kind": "probe"}, {"id": 3, "kind": "probe"}])
    assert [s["id"] for s in feed.samples_of("probe")] == [2, 3]


def stage(name, status, progress=0.0):
    """One of `JobPublic.stages` (`StagePublic`)."""
    return {"stage": name, "status": status, "progress": progress, "started_at": None, "finished_at": None}


def test_finished_stages_from_the_jobs_stages():
    assert finished_stages({"stages": [stage("data", "succeeded", 1.0), stage("sft", "running", 0.3)]}) == ("data",)
    assert finished_stages({"stages": [stage("data", "succeeded", 1.0), stage("sft", "succeeded", 1.0),
                                       stage("reward", "pending")]}) == ("data", "sft")
    assert finished_stages(None) == ()


def test_parse_error_names_fields():
    fastapi = parse_error(422, {"detail": [{"loc": ["body", "overrides", "ppo", "steps"], "msg": "must be > 0"}]})
    assert fastapi.field_errors == {"ppo.steps": "must be > 0"}
    config = parse_error(422, {"detail": {"field": "ppo.mini_batch_size", "message": "must divide batch_size=6"}})
    assert config.field_errors == {"ppo.mini_batch_size": "must divide batch_size=6"}
    assert "must divide" in config.message
    plain = parse_error(404, {"detail": "job 9 not found"})
    assert plain.status == 404 and plain.message == "job 9 not found" and plain.field_errors == {}


def test_client_raises_backend_down_when_nothing_listens():
    client = ApiClient(f"http://127.0.0.1:{free_port()}")
    try:
        client.health()
    except BackendDown as exc:
        assert "127.0.0.1" in str(exc)
    else:
        raise AssertionError("expected BackendDown")


def test_client_reads_the_page_and_list_fields_and_refuses_other_names():
    page = {"items": [metric(4, "ppo", "ppo/kl", 0, 0.1)], "cursor": 4, "more": True}
    client = answering({"/api/jobs/1/metrics": page, "/api/jobs": {"items": [{"id": 1}], "total": 1, "limit": 100,
                                                                    "offset": 0}})
    got = client.metrics(1)
    assert (got.items, got.cursor, got.more) == (page["items"], 4, True)
    assert client.list_jobs() == [{"id": 1}]

    # Yesterday's guesses (a cursor under another name, rows under `data`, a bare list) now fail loudly.
    renamed = [{"items": [], "next_cursor": 4, "more": False}, {"data": [], "cursor": 0, "more": False},
               {"items": [], "cursor": 0}]
    for body in renamed:
        with pytest.raises(ContractError):
            answering({"/api/jobs/1/metrics": body}).metrics(1)
    for body in ({"jobs": [{"id": 1}]}, [{"id": 1}]):
        with pytest.raises(ContractError, match="items"):
            answering({"/api/jobs": body}).list_jobs()


def test_checkpoints_sort_sft_then_ppo_steps_numerically():
    names = ["ppo/step-20", "ppo/step-5", "sft/step-30", "ppo/step-10", "base"]
    assert sorted(names, key=checkpoint_order) == ["base", "sft/step-30", "ppo/step-5", "ppo/step-10", "ppo/step-20"]


def precision_result(precision, **fields):
    """One row of the reward stage's precision study (`PrecisionResult`), every field present."""
    return {"precision": precision, "compute_dtype": "float32", "quantization": None, "trainable_parameters": 2848,
            "train_seconds": 0.3, "train_loss": 0.69, "final_train_accuracy": 0.75, "peak_train_mb": 650.0,
            "peak_source": "process_rss", "peak_train_delta_mb": 13.1, "rss_before_train_mb": 635.5,
            "normalization": {"mean": 0.3, "std": 0.37, "samples": 30}, "accuracy": 0.7, "mean_margin": 0.44,
            "memory_footprint_bytes": 6528132, "memory_footprint_mb": 6.23, "throughput_pairs_per_s": 480.0,
            "reward_mean": -0.07, "reward_std": 1.58, "spearman_vs_bf16": 1.0, **fields}


# The columns of `precision_result`'s row that the old hand-made study left out.
OTHER_COLUMNS = {"mean_margin": 0.44, "throughput_pairs_per_s": 480.0, "quantization": None,
                 "trainable_parameters": 2848, "train_seconds": 0.3, "train_loss": 0.69, "final_train_accuracy": 0.75,
                 "peak_source": "process_rss", "peak_train_delta_mb": 13.1, "rss_before_train_mb": 635.5,
                 "reward_mean": -0.07, "reward_std": 1.58}


def test_reports_to_rows():
    # Shapes of reward/report.json and evaluate/report.json as the stages write them.
    study = {"seconds": 5.0, "device": "cpu", "test_pairs": 120, "labels": "gold",
             "precisions": {"bf16": precision_result("bf16", accuracy=0.8, peak_train_mb=900.0,
                                                     memory_footprint_bytes=2 * 1024 * 1024, compute_dtype="float32",
                                                     spearman_vs_bf16=1.0),
                            "int4": precision_result("int4", accuracy=0.78, peak_train_mb=400.0,
                                                     memory_footprint_bytes=1024 * 1024, compute_dtype="bfloat16",
                                                     spearman_vs_bf16=None)},
             "note": "bf16 computes in fp32 on the CPU"}
    assert precision_rows(study) == [
        {"precision": "bf16", "accuracy": 0.8, "peak_train_mb": 900.0, "memory_footprint_mb": 2.0,
         "compute_dtype": "float32", "spearman_vs_bf16": 1.0, **OTHER_COLUMNS},
        {"precision": "int4", "accuracy": 0.78, "peak_train_mb": 400.0, "memory_footprint_mb": 1.0,
         "compute_dtype": "bfloat16", "spearman_vs_bf16": None, **OTHER_COLUMNS}]
    assert precision_rows(None) == []
    ev = {"n_prompts": 4, "samples_per_prompt": 1, "reward_precision": "bf16", "confidence": 0.95,
          "sft": {"reward": {"mean": 0.1, "std": 0.2}, "response_tokens": {"mean": 20.0, "std": 1.0},
                  "gold": {"mean": -3.0, "std": 1.0}},
          "ppo": {"reward": {"mean": 0.4, "std": 0.2}, "response_tokens": {"mean": 24.0, "std": 1.0},
                  "kl": {"mean": 0.3, "std": 0.1}, "gold": {"mean": -2.0, "std": 1.0}},
          "win_rate": 0.75, "kl": 0.3, "gold_scorer": "concise", "gold_win_rate": 0.5,
          "reward_diff": {"mean": 0.3, "low": 0.1, "high": 0.5, "confidence": 0.95, "n": 4},
          "gold_diff": {"mean": 1.0, "low": -0.5, "high": 2.0, "confidence": 0.95, "n": 4},
          "samples": [{"prompt": "p", "sft": "a", "ppo": "b", "sft_reward": 0.1, "ppo_reward": 0.4}]}
    assert eval_headline(ev) == {"reward SFT": 0.1, "reward PPO": 0.4, "reward PPO−SFT": 0.3, "win rate": 0.75,
                                 "KL": 0.3, "gold PPO−SFT": 1.0, "gold win rate": 0.5}
    rows = eval_rows(ev)
    assert [r["measure"] for r in rows] == ["reward (RM bf16)", "gold score (concise)", "response tokens"]
    assert rows[0]["PPO − SFT"] == 0.3 and rows[0]["interval"] == "[+0.1, +0.5] (95%)"
    assert rows[2]["PPO − SFT"] == 4.0 and "interval" not in rows[2]
    assert eval_scalars(ev)["sft/reward/mean"] == 0.1 and not any(k.startswith("samples/") for k in eval_scalars(ev))
    assert eval_pairs(ev)[0]["ppo"] == "b"
    fig = charts.eval_figure(ev)
    assert [(t.name, t.y[0]) for t in fig.data] == [("SFT", 0.1), ("PPO", 0.4), ("SFT", -3.0), ("PPO", -2.0)]
    # With `reward.validation`: the validation reward model's row follows the proxy's.
    ev["sft"]["validation_reward"], ev["ppo"]["validation_reward"] = {"mean": 0.2, "std": 0.1}, {"mean": 0.1, "std": 0.1}
    ev["validation_reward_diff"] = {"mean": -0.1, "low": -0.3, "high": 0.1, "confidence": 0.95, "n": 4}
    rows = eval_rows(ev)
    assert rows[1] == {"measure": "validation reward (RM never trained against)", "SFT": 0.2, "PPO": 0.1,
                       "PPO − SFT": -0.1, "interval": "[-0.3, +0.1] (95%)"}


def test_reward_figure_has_mean_points_and_a_std_band_with_gaps_at_nan():
    feed = JobFeed(job_id=1)
    feed.add_metrics([metric(i, "ppo", "ppo/reward_mean", i, v) for i, v in enumerate([0.1, 0.2, math.nan, 0.4])])
    feed.add_metrics([metric(10 + i, "ppo", "ppo/reward_std", i, 0.05) for i in range(4)])
    fig = charts.reward_figure(feed)
    mean = next(t for t in fig.data if t.name == "reward mean")
    assert list(mean.x) == [0, 1, 2, 3] and mean.y[2] is None
    band = next(t for t in fig.data if t.name == "± std")
    assert len(band.x) == 2 * 3  # the NaN step has no band
    assert fig.layout.yaxis.title.text == "reward (RM score)" and fig.layout.xaxis.title.text == "step"
    smooth = charts.reward_figure(feed, smoothing=0.5)  # the raw mean stays, faint, beside its average
    raw, ema = (next(t for t in smooth.data if t.name == n) for n in ("reward mean", "reward mean (smoothed)"))
    assert raw.y[2] is None and raw.opacity < 1 and ema.y[2] is None
    assert list(ema.y[:2]) == pytest.approx([0.1, (0.25 * 0.1 + 0.5 * 0.2) / 0.75])


def test_memory_figure_draws_the_gpu_total_or_says_there_is_none():
    feed = JobFeed(job_id=1)
    feed.add_metrics([metric(1, "ppo", "mem/peak_mb", 0, 900.0), metric(2, "ppo", "mem/rss_mb", 0, 900.0),
                      metric(3, "ppo", "sys/rss_mb", 0, 900.0)])
    gpu = charts.memory_figure(feed, 8188.0)
    assert any(s.y0 == 8188.0 for s in gpu.layout.shapes)
    span = gpu.layout.yaxis.range  # None: Plotly's autorange, which takes the line in
    assert span is None or span[1] > 8188.0, "the range of a flat series still shows the GPU's total"
    cpu = charts.memory_figure(feed, None)
    assert "no GPU" in cpu.layout.title.text
    # Each reading named for what it is: the stage's own at its steps, the worker's sampled between them.
    assert [t.name for t in cpu.data] == ["job process RSS (at steps)", "job process RSS (sampled)"]
    assert cpu.layout.yaxis.title.text == "memory (MB)" and cpu.layout.xaxis.title.text == "clock time"


# --- progress and time left (`live.job_clock`) --------------------------------------------------------

T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=timezone.utc)


def at(seconds: float) -> str:
    """A `StagePublic` time `seconds` after T0, as the API sends it."""
    return (T0 + timedelta(seconds=seconds)).isoformat()


def timed_stage(name, status, done=None, total=None, first_done=None, started=None, first=None, latest=None):
    return {**stage(name, status), "done": done, "total": total, "first_done": first_done, "started_at": started,
            "first_progress_at": first, "progress_at": latest}


def test_time_left_counts_each_stage_from_its_own_first_step_and_sums_only_what_is_known():
    job = {"status": "running", "stages": [
        timed_stage("data", "succeeded", 3, 3),
        # Began at 0, loaded for 100 s, first report (step 2) at 100, step 12 at 150: 10 steps in 50 s, 5 s a step.
        timed_stage("sft", "running", 12, 40, 2, started=at(0), first=at(100), latest=at(150)),
        timed_stage("reward", "pending"), timed_stage("ppo", "pending")]}
    clock = job_clock(job, T0 + timedelta(seconds=160))
    data, sft, reward, ppo = clock.stages
    assert (data.phase, data.remaining_s) == ("done", 0.0)
    # 28 steps at 5 s = 140 s from the last report, 10 s of which have passed; the 100 s of loading do not count.
    assert (sft.phase, sft.done, sft.total, sft.remaining_s, sft.elapsed_s) == ("stepping", 12, 40, 130.0, 60.0)
    assert (reward.phase, reward.remaining_s) == ("pending", None)
    assert clock.remaining_s == 130.0 and clock.untimed == ["reward", "ppo"], "a lower bound, not a guess"
    assert ui.eta_text(clock, "grpo") == "≥ 2m 10s (+ reward model, GRPO: not timed yet)"
    assert ui.eta_text(clock, "grpo", short=True) == "≥ 2m 10s"
    assert ui.stage_text(sft, "grpo") == "SFT · step 12 of 40 · 2m 10s left"

    late = job_clock(job, T0 + timedelta(seconds=400))  # overdue: never below 0
    assert late.stages[1].remaining_s == 0.0


def test_a_loading_stage_and_a_single_step_have_no_time_left_and_the_job_says_so():
    loading = {"status": "running", "stages": [timed_stage("ppo", "running", started=at(0))]}
    clock = job_clock(loading, T0 + timedelta(seconds=35))
    assert (clock.stages[0].phase, clock.stages[0].elapsed_s, clock.stages[0].remaining_s) == ("loading", 35.0, None)
    assert clock.remaining_s is None and ui.eta_text(clock, "rloo") == ui.DASH == "—"
    assert ui.stage_text(clock.stages[0], "rloo") == "RLOO · loading / warm-up… 0m 35s"

    one_step = {"status": "running", "stages": [timed_stage("ppo", "running", 1, 20, 1, at(0), at(30), at(30))]}
    only = job_clock(one_step, T0 + timedelta(seconds=31)).stages[0]
    assert (only.phase, only.remaining_s) == ("stepping", None), "one step gives no rate"
    assert ui.stage_text(only, "ppo") == "PPO · step 1 of 20 · timing…"

    # The last stage timed: the job's time left is known, without a bound.
    last = {"status": "running", "stages": [timed_stage("sft", "succeeded", 40, 40),
                                            timed_stage("evaluate", "running", 2, 4, 0, at(0), at(10), at(30))]}
    clock = job_clock(last, T0 + timedelta(seconds=30))
    assert (clock.remaining_s, clock.untimed) == (20.0, []) and ui.eta_text(clock, "ppo") == "0m 20s"

    finished = {**last, "status": "cancelled"}
    assert job_clock(finished, T0).remaining_s is None and job_clock(finished, T0).stages[1].phase == "stopped"


# --- the verdict and the result columns (`reports.verdict`) --------------------------------------------


def interval(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "confidence": 0.9, "n": 48}


def test_reading_says_whether_the_interval_excludes_no_change():
    assert reading(interval(0.3, 0.1, 0.5)) == "better, significant"
    assert reading(interval(-0.3, -0.5, -0.01)) == "worse, significant"
    assert reading(interval(0.1, -0.1, 0.3)) == "no detectable change"
    assert reading(interval(0.1, 0.0, 0.3)) == "no detectable change", "an interval touching 0 does not exclude it"
    assert reading(interval(0.6, 0.55, 0.7), null=0.5) == "better, significant"
    assert reading(interval(0.1, None, None)) is None and reading(None) is None


def test_verdict_reads_every_measure_the_report_has():
    report = EvalReport.model_validate(ev_report("grpo", 0.8, -0.2, 0.3, ["\n\nHuman: a\n\nAssistant:"]))
    report.gold_diff = Interval.model_validate(interval(0.05, -0.1, 0.2))
    report.judge_win_rate = Interval.model_validate(interval(0.4, 0.3, 0.45))
    v = verdict(report)
    assert v.algorithm == "grpo" and v.kl == 0.8 and v.confidence == 0.95
    found = {f.measure: f for f in v.findings}
    assert list(found) == ["reward", "gold score", "judge preference"]
    assert (found["reward"].sft, found["reward"].aligned, found["reward"].change.mean) == (-0.2, 0.3, 0.5)
    assert found["reward"].reading == "better, significant" and "standard deviations" in found["reward"].unit
    assert found["gold score"].reading == "no detectable change" and "question" in found["gold score"].unit
    assert found["judge preference"].reading == "worse, significant" and found["judge preference"].null == 0.5
    assert (v.length.change.mean, v.length.reading) == (-3.0, "shorter, significant")

    no_reward = verdict(ev_report("dpo", 0.2, None, None, ["p"]))  # DPO without a reward model: gold, length, KL
    assert [f.measure for f in no_reward.findings] == ["gold score"] and no_reward.length is not None
    assert verdict(None) is None


def test_result_columns_come_from_the_compact_job_result():
    result = {"reward_diff": interval(-0.4, -0.6, -0.2), "gold_diff": interval(0.1, -0.1, 0.3), "kl": 1.5,
              "judge_win_rate": None, "length_diff": None}
    assert result_columns(result) == {"reward Δ": -0.4, "reading": "worse, significant", "gold Δ": 0.1, "KL": 1.5}
    gold_only = {**result, "reward_diff": None, "gold_diff": interval(0.3, 0.1, 0.5)}
    assert result_columns(gold_only)["reading"] == "better, significant (gold)"
    assert result_columns(None) == {"reward Δ": None, "reading": None, "gold Δ": None, "KL": None}


# --- numbers and text as shown -------------------------------------------------------------------------


def test_numbers_are_rounded_and_missing_values_are_a_dash_in_tables_too():
    assert [ui.fmt(v) for v in (None, math.nan, 0.123456, -0.000123456, 999.96, 123456.7, 12345, math.inf)] == \
        ["—", "—", "0.123", "-0.000123", "1,000", "123,457", "12,345", "∞"]
    assert ui.signed(0.31) == "+0.31" and ui.signed(-1.2) == "-1.2" and ui.signed(None) == "—"
    shown = ui.table([{"reward": 0.123456, "note": None}, {"reward": None, "note": "x"}]).to_string()
    assert "0.123 —" in shown and "— x" in shown and "None" not in shown and "nan" not in shown


def test_sample_text_drops_a_cut_character_and_never_shows_replacement_characters():
    assert ui.clean_text("café au l\ufffd") == "café au l"  # a multibyte character cut at the length cap
    assert ui.clean_text("a\ufffd\ufffdb") == "a[…]b"
    assert "\ufffd" not in ui.clean_text("\ufffd\ufffdx\ufffd y \ufffd") and ui.clean_text(None) == ""


def test_flagged_words_are_found_as_words_in_any_disguise_and_ordinary_text_is_not():
    slur = codecs.decode("avttre", "rot13")  # kept out of the source as flagged.py keeps its list
    assert is_flagged(f"why are {slur}s like that") and is_flagged(slur.upper())
    assert is_flagged(slur.replace("i", "1").replace("e", "3"))
    assert is_flagged(codecs.decode("jung gur shpx", "rot13"))
    assert not any(is_flagged(t) for t in ("a spicy dish", "Scunthorpe", "fire retardant", "", None,
                                          "\n\nHuman: Where do owls sleep?\n\nAssistant:"))
    assert flagged_sample({"prompt": "hi", "response": f"you {slur}"}) and not flagged_sample({"prompt": "hi"})


def test_override_rows_list_each_changed_field_with_the_presets_value():
    preset = {"algorithm": "ppo", "ppo": {"steps": 20, "lr": 1e-5}, "stages": ["data", "sft"], "seed": 0}
    config = {"algorithm": "grpo", "ppo": {"steps": 7, "lr": 1e-5, "samples_per_prompt": 4},
              "stages": ["data", "sft", "ppo"], "seed": 0}
    assert override_rows(config, preset) == [
        {"field": "algorithm", "this job": "grpo", "preset": "ppo"},
        {"field": "ppo.steps", "this job": "7", "preset": "20"},
        {"field": "ppo.samples_per_prompt", "this job": "4", "preset": None},
        {"field": "stages", "this job": '["data", "sft", "ppo"]', "preset": '["data", "sft"]'}]
    assert override_rows(preset, preset) == []
