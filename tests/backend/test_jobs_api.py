"""The jobs API in-process (TestClient on a real SQLite file): validation, queue order, state rules.

Every rejected request is checked to leave the database exactly as it was.
"""

from __future__ import annotations

import pytest
from sqlalchemy import text

from db import queue
from edgerlhf.config import HH_PREFS_SAMPLE, TINY_TOKENIZER_DIR

from tests.support.db import row_counts

TINY = {"preset": "tiny", "overrides": {"stages": ["data"], "data": {"max_pairs": 20}}}


def field_of(response) -> list:
    return response.json()["detail"][0]["loc"]


@pytest.mark.parametrize("body, status, loc, words", [
    ({"preset": "no-such-preset"}, 422, ["body", "preset"], "unknown preset"),
    ({"preset": "tiny", "overrides": {"ppo": {"batch_size": "eight"}}}, 422,
     ["body", "overrides", "ppo", "batch_size"], "must be an integer"),
    ({"preset": "tiny", "overrides": {"sft": {"learning_rate": True}}}, 422,
     ["body", "overrides", "sft", "learning_rate"], "must be a number"),
    ({"preset": "tiny", "overrides": {"ppo": {"batch_size": -4}}}, 422,
     ["body", "overrides", "ppo", "batch_size"], "must be in [1, 4096]"),
    ({"preset": "tiny", "overrides": {"data": {"max_pairs": 0}}}, 422,
     ["body", "overrides", "data", "max_pairs"], "must be in [2, 10000000]"),
    ({"preset": "tiny", "overrides": {"ppo": {"steps": 10**12}}}, 422,
     ["body", "overrides", "ppo", "steps"], "must be in [1, 1000000]"),
    ({"preset": "tiny", "overrides": {"seed": 10**19}}, 422, ["body", "overrides", "seed"], "must be in [0, "),
    ({"preset": "tiny", "overrides": {"ppo": {"no_such_field": 1}}}, 422,
     ["body", "overrides", "ppo", "no_such_field"], "unknown field"),
    ({"preset": "tiny", "overrides": {"stages": ["data", "train"]}}, 422, ["body", "overrides", "stages"], "unknown stage"),
    ({"preset": "tiny", "overrides": {"data": {"source": "/etc/passwd"}}}, 422,
     ["body", "overrides", "data", "source"], "outside the allowed roots"),
    ({"preset": "tiny", "overrides": {"data": {"source": HH_PREFS_SAMPLE + "/../../../../../etc/passwd"}}}, 422,
     ["body", "overrides", "data", "source"], "outside the allowed roots"),
    ({"preset": "tiny", "overrides": {"data": {"source": "../../etc/passwd"}}}, 422,
     ["body", "overrides", "data", "source"], "absolute local path"),
    ({"preset": "tiny", "overrides": {"model": {"tokenizer": "~/.ssh/id_rsa"}}}, 422,
     ["body", "overrides", "model", "tokenizer"], "outside the allowed roots"),
    ({"preset": "tiny", "overrides": {"model": {"name_or_path": "org/../../etc"}}}, 422,
     ["body", "overrides", "model", "name_or_path"], "absolute local path"),
    ({"preset": "tiny", "overrides": {"ppo": {"reward_function": "os:system"}}}, 422,
     ["body", "overrides", "ppo", "reward_function"], "command line only"),
    ({"preset": "tiny", "overrides": {"ppo": {"reward_function": "rm -rf /"}}}, 422,
     ["body", "overrides", "ppo", "reward_function"], "must be a gold scorer"),
    ({"preset": "tiny", "overrides": "ppo.steps=5"}, 422, ["body", "overrides"], "dictionary"),
    ({"preset": "tiny", "surprise": 1}, 422, ["body", "surprise"], "not permitted"),
    ({"overrides": {}}, 422, ["body", "preset"], "required"),
])
def test_bad_job_bodies_get_422_naming_the_field_and_store_nothing(client, app, body, status, loc, words):
    before = row_counts(app)
    response = client.post("/api/jobs", json=body)
    assert response.status_code == status, response.text
    assert field_of(response) == loc
    assert words in response.json()["detail"][0]["msg"]
    assert row_counts(app) == before


def test_oversized_and_malformed_bodies_are_rejected_and_store_nothing(client, app, settings):
    before = row_counts(app)
    big = b'{"preset": "tiny", "name": "' + b"x" * (settings.max_body_bytes + 10) + b'"}'
    response = client.post("/api/jobs", content=big, headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "larger than" in response.json()["detail"]

    def chunks():  # no Content-Length: the limit must hold for streamed bodies too
        for _ in range(settings.max_body_bytes // 1000 + 5):
            yield b" " * 1000

    response = client.post("/api/jobs", content=chunks(), headers={"content-type": "application/json"})
    assert response.status_code == 413
    response = client.post("/api/jobs", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert row_counts(app) == before


def test_unknown_job_id_is_404_everywhere(client, app):
    before = row_counts(app)
    for method, path in [("GET", "/api/jobs/4242"), ("POST", "/api/jobs/4242/cancel"), ("POST", "/api/jobs/4242/retry"),
                         ("DELETE", "/api/jobs/4242"), ("GET", "/api/jobs/4242/metrics"), ("GET", "/api/jobs/4242/samples"),
                         ("GET", "/api/jobs/4242/logs"), ("GET", "/api/jobs/4242/artifacts"),
                         ("GET", "/api/jobs/4242/report"), ("GET", "/api/jobs/4242/events")]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["detail"] == "job 4242 not found"
    assert client.get("/api/jobs/not-a-number").status_code == 422
    assert row_counts(app) == before


BEYOND_64_BITS = [str(2**63), str(-(2**63) - 1), "9" * 40]
"""Integers SQLite cannot bind (it raised OverflowError, a 500, before the bound)."""


@pytest.mark.parametrize("big", BEYOND_64_BITS)
def test_ids_beyond_64_bits_are_404_and_cursors_beyond_are_422(client, app, big):
    from backend.api.routes.metrics import _Cursors

    job_id = client.post("/api/jobs", json=TINY).json()["id"]
    before = row_counts(app)
    for method, path in [("GET", f"/api/jobs/{big}"), ("POST", f"/api/jobs/{big}/cancel"),
                         ("POST", f"/api/jobs/{big}/retry"), ("DELETE", f"/api/jobs/{big}"),
                         ("GET", f"/api/jobs/{big}/metrics"), ("GET", f"/api/jobs/{big}/samples"),
                         ("GET", f"/api/jobs/{big}/logs"), ("GET", f"/api/jobs/{big}/artifacts"),
                         ("GET", f"/api/jobs/{big}/report"), ("GET", f"/api/jobs/{big}/events")]:
        response = client.request(method, path)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["detail"] == f"job {big} not found"
    for path, param in [("/api/jobs", "offset"), (f"/api/jobs/{job_id}/metrics", "after"),
                        (f"/api/jobs/{job_id}/samples", "after"), (f"/api/jobs/{job_id}/logs", "after"),
                        (f"/api/jobs/{job_id}/events", "after"), (f"/api/jobs/{job_id}/events", "after_sample"),
                        (f"/api/jobs/{job_id}/events", "after_log")]:
        response = client.get(path, params={param: big})
        assert response.status_code == 422, (path, param, response.text)
        assert response.json()["detail"][0]["loc"] == ["query", param]
    assert _Cursors.parse(f"0.{big}.0") is None  # a reconnecting stream's Last-Event-ID: ignored, as a bad one is
    # The chat API reads the job id out of the model name: no such model, in OpenAI's shape.
    for response in (client.get(f"/v1/models/job-{big}/sft"),
                     client.post("/v1/chat/completions", json={"model": f"job-{big}/sft",
                                                               "messages": [{"role": "user", "content": "Hi"}]})):
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"
    assert row_counts(app) == before


def test_the_64_bit_extremes_are_ordinary_values(client):
    job_id = client.post("/api/jobs", json=TINY).json()["id"]
    for big in (2**63 - 1, -(2**63)):
        assert client.get(f"/api/jobs/{big}").status_code == 404
    assert client.get("/api/jobs", params={"offset": 2**63 - 1}).json()["items"] == []
    page = client.get(f"/api/jobs/{job_id}/logs", params={"after": 2**63 - 1}).json()
    assert page == {"items": [], "cursor": 2**63 - 1, "more": False}


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"preset": "\xc3\x28"}', b"[" * 5_000 + b"]" * 5_000,
                                  b'{"overrides":' * 5_000 + b"{}" + b"}" * 5_000, b"plain garbage"])
def test_unparseable_bodies_are_4xx_and_store_nothing(client, app, body):
    before = row_counts(app)
    response = client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert 400 <= response.status_code < 500, response.text
    assert "detail" in response.json()
    assert row_counts(app) == before


def test_create_list_filter_paginate_and_queue_position(client):
    created = [client.post("/api/jobs", json={**TINY, "name": f"run {i}"}).json() for i in range(5)]
    assert [j["queue_position"] for j in created] == [1, 2, 3, 4, 5]
    job = created[0]
    assert job["status"] == "queued" and job["preset"] == "tiny" and job["name"] == "run 0"
    assert job["config"]["data"]["max_pairs"] == 20 and job["config"]["model"]["tokenizer"] == TINY_TOKENIZER_DIR
    assert job["stages"] == [{"stage": "data", "status": "pending", "progress": 0.0, "done": None, "total": None,
                              "first_done": None, "first_progress_at": None, "progress_at": None,
                              "started_at": None, "finished_at": None}]
    assert job["result"] is None

    assert client.post(f"/api/jobs/{created[1]['id']}/cancel").json()["status"] == "cancelled"
    assert client.get(f"/api/jobs/{created[2]['id']}").json()["queue_position"] == 2

    page = client.get("/api/jobs", params={"limit": 2, "offset": 1}).json()
    assert page["total"] == 5 and [j["id"] for j in page["items"]] == [created[3]["id"], created[2]["id"]]
    queued = client.get("/api/jobs", params={"status": "queued"}).json()
    assert queued["total"] == 4 and all(j["status"] == "queued" for j in queued["items"])
    both = client.get("/api/jobs", params=[("status", "queued"), ("status", "cancelled")]).json()
    assert both["total"] == 5
    assert client.get("/api/jobs", params={"status": "exploded"}).status_code == 422
    assert client.get("/api/jobs", params={"limit": 0}).status_code == 422


def test_cancel_retry_delete_follow_the_job_state(client, app, settings):
    job_id = client.post("/api/jobs", json=TINY).json()["id"]
    assert client.delete(f"/api/jobs/{job_id}").status_code == 409  # queued: not finished
    assert client.post(f"/api/jobs/{job_id}/retry").status_code == 409
    with app.state.sessions() as s:
        queue.claim_next(s, "w")
    response = client.post(f"/api/jobs/{job_id}/cancel")
    assert response.status_code == 202 and response.json()["cancel_requested"] and response.json()["status"] == "running"
    assert client.delete(f"/api/jobs/{job_id}").status_code == 409  # running
    with app.state.sessions() as s:
        queue.fail(s, job_id, "ValueError: boom", "Traceback (most recent call last):\n  secret frame", "w")
    job = client.get(f"/api/jobs/{job_id}").json()
    assert job["status"] == "failed" and job["error"] == "ValueError: boom"
    assert "traceback" not in job and "secret frame" not in client.get(f"/api/jobs/{job_id}").text
    assert client.post(f"/api/jobs/{job_id}/cancel").status_code == 409

    retried = client.post(f"/api/jobs/{job_id}/retry").json()
    assert retried["status"] == "queued" and retried["error"] is None and retried["queue_position"] == 1
    assert client.post(f"/api/jobs/{job_id}/cancel").json()["status"] == "cancelled"

    run_dir = settings.runs_dir / f"job-{job_id}"
    (run_dir / "sft").mkdir(parents=True)
    (run_dir / "sft" / "report.json").write_text("{}")
    unloaded = []
    app.state.job_deleted_hooks.append(unloaded.append)
    assert client.delete(f"/api/jobs/{job_id}").status_code == 204
    assert not run_dir.exists()
    assert unloaded == [job_id]
    assert client.get(f"/api/jobs/{job_id}").status_code == 404


def test_rows_pages_follow_the_cursor(client, app):
    job_id = client.post("/api/jobs", json=TINY).json()["id"]
    with app.state.sessions() as s:
        queue.record(s, job_id, metrics=[("sft", key, step, float(step), 0.0)
                                          for step in range(10) for key in ("sft/loss", "sft/lr")])
        queue.record(s, job_id, metrics=[("sft", "sft/loss", 10, float("nan"), 0.0)],
                     samples=[{"stage": "sft", "kind": "probe", "checkpoint": "sft", "step": 1, "seq": 0,
                               "prompt": "Hi", "response": "Hello", "reward": 0.5, "time": 0.0}],
                     artifacts=[("sft", "adapter", "/elsewhere/adapter", 12)])
    page = client.get(f"/api/jobs/{job_id}/metrics", params={"keys": "sft/loss", "limit": 4}).json()
    assert [m["step"] for m in page["items"]] == [0, 1, 2, 3] and page["more"]
    assert page["cursor"] == page["items"][-1]["cursor"], "a page's cursor is its last row's"
    rest = client.get(f"/api/jobs/{job_id}/metrics", params={"keys": "sft/loss", "after": page["cursor"]}).json()
    assert [m["step"] for m in rest["items"]] == list(range(4, 11)) and not rest["more"]
    assert rest["items"][-1]["value"] is None  # NaN travels as null
    again = client.get(f"/api/jobs/{job_id}/metrics", params={"after": rest["cursor"]}).json()
    assert again == {"items": [], "cursor": rest["cursor"], "more": False}
    both = client.get(f"/api/jobs/{job_id}/metrics", params=[("keys", "sft/loss"), ("keys", "sft/lr")]).json()
    assert len(both["items"]) == 21
    assert client.get(f"/api/jobs/{job_id}/samples", params={"kind": "probe"}).json()["items"][0]["response"] == "Hello"
    assert client.get(f"/api/jobs/{job_id}/artifacts").json()[0]["path"] == "/elsewhere/adapter"
    logs = client.get(f"/api/jobs/{job_id}/logs").json()
    assert logs["items"][0]["message"].startswith("queued")
    assert client.get(f"/api/jobs/{job_id}/metrics", params={"after": -1}).status_code == 422


def test_presets_system_and_docs(client):
    presets = {p["name"]: p for p in client.get("/api/presets").json()}
    assert {"tiny", "distilgpt2-8gb", "qwen2.5-0.5b-8gb", "smollm2-1.7b-8gb"} <= set(presets)
    assert presets["tiny"]["config"]["model"]["random_init"] is True
    assert presets["tiny"]["model"] == "tiny-gpt2 (random weights)"
    assert presets["qwen2.5-0.5b-8gb"]["model"] == "Qwen/Qwen2.5-0.5B-Instruct"
    assert presets["smollm2-1.7b-8gb"]["config"]["sft"]["precision"] == "int4"
    assert presets["smollm2-1.7b-8gb"]["config"]["ppo"]["quantized_policy"] is True
    system = client.get("/api/system").json()
    assert system["worker"]["alive"] is False and system["queue_length"] == 0
    assert system["cpu"]["memory_total_mb"] > 0 and isinstance(system["gpus"], list)
    assert client.get("/healthz").json()["status"] == "ok"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/api/jobs", "/api/jobs/{job_id}/events", "/api/system", "/healthz"} <= set(paths)


def test_server_errors_never_show_a_traceback(client, app):
    job_id = client.post("/api/jobs", json=TINY).json()["id"]
    with app.state.sessions() as s:  # break the database under the running app
        s.execute(text("DROP TABLE metrics"))
        s.commit()
    response = client.get(f"/api/jobs/{job_id}/metrics")
    assert response.status_code == 500
    assert response.json() == {"detail": "internal server error"}
    assert "Traceback" not in response.text and "metrics" not in response.text


def test_a_wrong_algorithm_is_a_422_naming_the_field_and_stores_nothing(client, app):
    before = row_counts(app)
    response = client.post("/api/jobs", json={"preset": "tiny", "overrides": {"algorithm": "a2c"}})
    assert response.status_code == 422, response.text
    assert field_of(response) == ["body", "overrides", "algorithm"]
    message = response.json()["detail"][0]["msg"]
    assert "'a2c'" in message and all(name in message for name in ("ppo", "grpo", "rloo", "dpo"))
    assert row_counts(app) == before


@pytest.mark.parametrize("algorithm", ["grpo", "dpo"])
def test_the_chosen_algorithm_is_stored_in_the_jobs_config(client, algorithm):
    body = {"preset": "tiny", "overrides": {"algorithm": algorithm, "dpo": {"beta": 0.2}}}
    created = client.post("/api/jobs", json=body)
    assert created.status_code in (200, 201), created.text
    stored = client.get(f"/api/jobs/{created.json()['id']}").json()["config"]
    assert stored["algorithm"] == algorithm and stored["dpo"]["beta"] == 0.2
