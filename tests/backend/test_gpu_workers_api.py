"""The API of many GPU workers (TestClient on a real SQLite file): a job's minimum GPU memory (validated, stored,
shown, and said when no live worker has it), and `/api/system` listing every worker with its GPU."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import update

from db import queue
from db.models import MAX_GPU_MEMORY_MB, Worker, utcnow

from tests.support.db import row_counts

TINY = {"preset": "tiny", "overrides": {"stages": ["data"], "data": {"max_pairs": 20}}}


def beat(app, worker_id: str, *, age_seconds: float = 0.0, **fields) -> None:
    """Write a worker's heartbeat as the worker does, `age_seconds` ago."""
    host, pid = worker_id.split(":")
    with app.state.sessions() as s:
        queue.worker_heartbeat(s, worker_id, hostname=host, pid=int(pid), **{"state": "idle", **fields})
        if age_seconds:
            s.execute(update(Worker).where(Worker.id == worker_id)
                      .values(heartbeat_at=utcnow() - timedelta(seconds=age_seconds)))
            s.commit()


@pytest.mark.parametrize("value, words", [
    (0, "greater than or equal to 1"), (-4096, "greater than or equal to 1"),
    (MAX_GPU_MEMORY_MB + 1, f"less than or equal to {MAX_GPU_MEMORY_MB}"), (10**30, "less than or equal"),
    ("8192", "valid integer"), (8192.5, "valid integer"), (True, "valid integer"), ([8192], "valid integer"),
])
def test_a_bad_min_gpu_memory_gets_422_naming_the_field_and_stores_nothing(client, app, value, words):
    before = row_counts(app)
    response = client.post("/api/jobs", json={**TINY, "min_gpu_memory_mb": value})
    assert response.status_code == 422, response.text
    error = response.json()["detail"][0]
    assert error["loc"] == ["body", "min_gpu_memory_mb"] and words in error["msg"], error
    assert row_counts(app) == before


def test_the_minimum_is_stored_shown_and_said_while_no_live_worker_has_it(client, app):
    job = client.post("/api/jobs", json={**TINY, "min_gpu_memory_mb": 16_000}).json()
    plain = client.post("/api/jobs", json=TINY).json()
    assert job["min_gpu_memory_mb"] == 16_000 and plain["min_gpu_memory_mb"] is None
    assert job["waiting_for"] == "waiting for a worker with ≥ 16,000 MB of GPU memory (no worker is alive)"
    assert plain["waiting_for"] is None, "a job without a minimum waits for any worker, as before"

    beat(app, "b:2")  # a CPU-only worker
    expected = "waiting for a worker with ≥ 16,000 MB of GPU memory (no live worker's GPU memory is known)"
    assert client.get(f"/api/jobs/{job['id']}").json()["waiting_for"] == expected
    beat(app, "a:1", gpu_index=0, gpu_name="RTX 4060", gpu_memory_mb=8_188)
    beat(app, "e:5", gpu_index=0, gpu_name="RTX 3060", gpu_memory_mb=12_288)
    beat(app, "c:3", gpu_memory_mb=80_000, age_seconds=3600)  # big enough, but dead: no help
    expected = "waiting for a worker with ≥ 16,000 MB of GPU memory (the largest GPU of a live worker has 12,288 MB)"
    assert client.get(f"/api/jobs/{job['id']}").json()["waiting_for"] == expected
    listed = {j["id"]: j for j in client.get("/api/jobs").json()["items"]}
    assert listed[job["id"]]["waiting_for"] == expected and listed[plain["id"]]["waiting_for"] is None

    beat(app, "d:4", state="busy", job_id=plain["id"], gpu_memory_mb=24_000)  # busy now, can take it later
    assert client.get(f"/api/jobs/{job['id']}").json()["waiting_for"] is None
    assert client.post(f"/api/jobs/{job['id']}/cancel").json()["waiting_for"] is None, "only queued jobs wait"


def test_system_lists_every_worker_with_host_gpu_state_job_and_heartbeat(client, app):
    job_id = client.post("/api/jobs", json=TINY).json()["id"]
    beat(app, "gpu-box:11", state="busy", job_id=job_id, gpu_index=1, gpu_name="RTX 4090", gpu_memory_mb=24_564)
    beat(app, "cpu-box:22")
    beat(app, "old-box:33", gpu_index=0, gpu_name="GTX 1080", gpu_memory_mb=8_192, age_seconds=3600)
    system = client.get("/api/system").json()
    workers = {w["id"]: w for w in system["workers"]}
    assert list(workers) == ["cpu-box:22", "gpu-box:11", "old-box:33"], "most recent heartbeat first"
    busy = workers["gpu-box:11"]
    assert {k: busy[k] for k in ("alive", "host", "pid", "gpu_index", "gpu_name", "gpu_memory_mb", "state", "job_id")} \
        == {"alive": True, "host": "gpu-box", "pid": 11, "gpu_index": 1, "gpu_name": "RTX 4090",
            "gpu_memory_mb": 24_564, "state": "busy", "job_id": job_id}
    assert busy["last_heartbeat"] and busy["started_at"]
    cpu = workers["cpu-box:22"]
    assert (cpu["alive"], cpu["gpu_index"], cpu["gpu_name"], cpu["gpu_memory_mb"]) == (True, None, None, None)
    old = workers["old-box:33"]
    assert (old["alive"], old["gpu_name"], old["gpu_memory_mb"]) == (False, "GTX 1080", 8_192)
    assert system["worker"]["alive"] and system["worker"]["id"] == "cpu-box:22"
