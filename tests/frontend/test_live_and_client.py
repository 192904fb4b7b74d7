"""Pure parts of the dashboard: the session's job history (merge, replace on resume, views), the API
client's error parsing, checkpoint ordering, and the figures built from a history."""

from __future__ import annotations

import math

from frontend import charts
from frontend.api_client import ApiClient, BackendDown, parse_error
from frontend.live import JobFeed, finished_stages
from frontend.reports import eval_pairs, eval_scalars, precision_rows
from frontend.ui import checkpoint_order


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


def test_finished_stages_from_either_job_shape():
    assert finished_stages({"stages": [{"name": "data", "status": "succeeded"}, {"name": "sft", "status": "running"}]}) == ("data",)
    assert finished_stages({"stages": {"data": "succeeded", "sft": {"status": "succeeded"}}}) == ("data", "sft")
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
    from tests.frontend.conftest import free_port

    client = ApiClient(f"http://127.0.0.1:{free_port()}")
    try:
        client.health()
    except BackendDown as exc:
        assert "127.0.0.1" in str(exc)
    else:
        raise AssertionError("expected BackendDown")


def test_checkpoints_sort_sft_then_ppo_steps_numerically():
    names = ["ppo/step-20", "ppo/step-5", "sft/step-30", "ppo/step-10", "base"]
    assert sorted(names, key=checkpoint_order) == ["base", "sft/step-30", "ppo/step-5", "ppo/step-10", "ppo/step-20"]


def test_reports_to_rows():
    study = {"precisions": {"bf16": {"accuracy": 0.8, "peak_mb": 900.0, "nested": {"x": 1}},
                            "int4": {"accuracy": 0.78, "peak_mb": 400.0}}}
    assert precision_rows(study) == [{"precision": "bf16", "accuracy": 0.8, "peak_mb": 900.0},
                                     {"precision": "int4", "accuracy": 0.78, "peak_mb": 400.0}]
    assert precision_rows([{"precision": "int8", "accuracy": 0.7}]) == []  # not a dict: nothing
    ev = {"win_rate": 0.6, "sft": {"reward_mean": 0.1}, "ppo": {"reward_mean": 0.4},
          "samples": [{"prompt": "p", "sft_response": "a", "ppo_response": "b"}]}
    assert eval_scalars(ev) == {"win_rate": 0.6, "sft/reward_mean": 0.1, "ppo/reward_mean": 0.4}
    assert eval_pairs(ev)[0]["ppo_response"] == "b"


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
