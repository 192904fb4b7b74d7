"""Pure parts of the dashboard: the session's job history (merge, replace on resume, views), the API
client's error parsing, checkpoint ordering, and the figures built from a history."""

from __future__ import annotations

import math

import pytest

from frontend import charts
from frontend.api_client import ApiClient, BackendDown, ContractError, parse_error
from frontend.live import JobFeed, finished_stages
from frontend.reports import eval_headline, eval_pairs, eval_rows, eval_scalars, precision_rows
from frontend.ui import checkpoint_order
from tests.support.dashboard import answering
from tests.support.procs import free_port


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


def test_reward_figure_has_mean_points_and_a_std_band_with_gaps_at_nan():
    feed = JobFeed(job_id=1)
    feed.add_metrics([metric(i, "ppo", "ppo/reward_mean", i, v) for i, v in enumerate([0.1, 0.2, math.nan, 0.4])])
    feed.add_metrics([metric(10 + i, "ppo", "ppo/reward_std", i, 0.05) for i in range(4)])
    fig = charts.reward_figure(feed)
    mean = next(t for t in fig.data if t.name == "reward mean")
    assert list(mean.x) == [0, 1, 2, 3] and mean.y[2] is None
    band = next(t for t in fig.data if t.name == "± std")
    assert len(band.x) == 2 * 3  # the NaN step has no band


def test_memory_figure_draws_the_gpu_total_or_says_there_is_none():
    feed = JobFeed(job_id=1)
    feed.add_metrics([metric(1, "ppo", "mem/peak_mb", 0, 5000.0), metric(2, "ppo", "mem/rss_mb", 0, 900.0)])
    gpu = charts.memory_figure(feed, 8188.0)
    assert any(s.y0 == 8188.0 for s in gpu.layout.shapes)
    cpu = charts.memory_figure(feed, None)
    assert "no GPU" in cpu.layout.title.text and [t.name for t in cpu.data] == ["rss_mb"]
