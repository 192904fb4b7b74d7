"""The backend as a real uvicorn process: the API token gate, and the live SSE stream of a job that a real
worker runs (on SQLite and PostgreSQL: `db_url`)."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.backend import start_backend
from tests.support.tiny import DATA_ONLY
from tests.support.workers import Service

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def server(tmp_path, db_url):
    srv = start_backend(tmp_path / "data", tmp_path / "backend.log", EDGERLHF_API_TOKEN=TOKEN,
                        EDGERLHF_DATABASE_URL=db_url)
    yield srv
    srv.stop()


def test_every_request_but_healthz_needs_the_token(server):
    url = server.url
    assert httpx.get(f"{url}/healthz").json()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": TOKEN}):
        for method, path in [("GET", "/api/jobs"), ("GET", "/api/system"), ("GET", "/api/presets"),
                             ("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/api/jobs/1/events"),
                             ("GET", "/v1/models"), ("GET", "/no/such/path")]:
            response = httpx.request(method, f"{url}{path}", headers=headers)
            assert response.status_code == 401, (method, path, headers, response.text)
            body = response.json()  # OpenAI's error shape under /v1, FastAPI's elsewhere
            message = body["error"]["message"] if path.startswith("/v1") else body["detail"]
            assert "API token" in message
        response = httpx.post(f"{url}/api/jobs", json={"preset": "tiny", "overrides": DATA_ONLY}, headers=headers)
        assert response.status_code == 401
    assert httpx.get(f"{url}/api/jobs", headers=AUTH).json()["total"] == 0, "a rejected request stored nothing"
    assert httpx.get(f"{url}/docs", headers=AUTH).status_code == 200
    created = httpx.post(f"{url}/api/jobs", json={"preset": "tiny", "overrides": DATA_ONLY}, headers=AUTH)
    assert created.status_code == 201
    assert httpx.get(f"{url}/api/jobs", headers=AUTH).json()["total"] == 1
    # A body over the limit is refused before it is read.
    big = httpx.post(f"{url}/api/jobs", headers={**AUTH, "content-type": "application/json"},
                     content=b"{" + b" " * 2_000_000 + b"}")
    assert big.status_code == 413


def read_events(lines, until: callable, timeout: float) -> list[dict]:
    """Parse lines of a text/event-stream into [{"event", "id", "data"}] until `until(event)` is true."""
    events, current = [], {}
    deadline = time.monotonic() + timeout
    for line in lines:
        if time.monotonic() > deadline:
            raise AssertionError(f"no matching event in {timeout}s; got {[e['event'] for e in events]}")
        if line == "":
            if "event" in current or "data" in current:
                current["data"] = json.loads(current["data"]) if "data" in current else None
                events.append(current)
                if until(current):
                    return events
            current = {}
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            current[name] = value[1:] if value.startswith(" ") else value
    raise AssertionError(f"stream ended; got {[e['event'] for e in events]}")


@pytest.mark.slow
def test_event_stream_delivers_what_the_worker_writes_as_it_happens(tmp_path, db_url, server):
    service = Service(tmp_path, db_url)  # the server's data directory and database
    service.env["EDGERLHF_API_TOKEN"] = TOKEN
    try:
        job = httpx.post(f"{server.url}/api/jobs", json={"preset": "tiny", "overrides": DATA_ONLY, "name": "live"},
                         headers=AUTH).json()
        url = f"{server.url}/api/jobs/{job['id']}/events"
        with httpx.stream("GET", url, headers=AUTH, timeout=httpx.Timeout(10, read=60)) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.iter_lines()
            first = read_events(lines, lambda e: e["event"] == "status", 30)
            assert first[-1]["data"]["status"] == "queued"
            # Only now does a worker start: what follows is live, not a replay.
            service.start_worker("--max-jobs", "1")
            events = read_events(lines, lambda e: e["event"] == "metric" and e["data"]["key"].startswith("data/"), 180)
            metric = events[-1]
            assert metric["data"]["stage"] == "data" and isinstance(metric["data"]["value"], float)
            assert any(e["event"] == "status" and e["data"]["status"] == "running" for e in events)
            events += read_events(lines, lambda e: e["event"] == "end", 180)
        assert events[-1]["data"]["status"] == "succeeded"
        statuses = [e["data"]["status"] for e in events if e["event"] == "status"]
        assert statuses[-1] == "succeeded"
        assert any(e["event"] == "log" and "stage data finished" in e["data"]["message"] for e in events)

        # Re-attaching with Last-Event-ID continues after that event instead of replaying it.
        with httpx.stream("GET", url, headers={**AUTH, "Last-Event-ID": metric["id"]}, timeout=30) as response:
            again = read_events(response.iter_lines(), lambda e: e["event"] == "end", 30)
        replayed = [e["data"]["cursor"] for e in again if e["event"] == "metric"]
        assert metric["data"]["cursor"] not in replayed
        assert all(c > metric["data"]["cursor"] for c in replayed)
        assert metric["id"] == f"{metric['data']['cursor']}." + metric["id"].split(".", 1)[1], \
            "an event's id carries the cursor of the row it sent"
    finally:
        service.close()
