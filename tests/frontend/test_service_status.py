"""The sidebar's service status says which part of the service is down (issue 33), with Streamlit's AppTest against
real backends: no live worker (queued jobs wait), then a worker heartbeating; the backend unreachable; the backend up
but its database gone (PostgreSQL, whose database is dropped under the running backend)."""

from __future__ import annotations

import httpx
from streamlit.testing.v1 import AppTest

from tests.support.backend import start_backend
from tests.support.dashboard import APP, TIMEOUT, walk
from tests.support.heartbeats import register_worker
from tests.support.procs import free_port


def status(at: AppTest) -> tuple[str, str]:
    """(element type, text) of the sidebar's status line."""
    lines = [(e.type, e.value) for e in walk(at.sidebar)
             if isinstance(getattr(e, "value", None), str) and e.value.startswith("backend ")]
    assert len(lines) == 1, lines
    return lines[0]


def dashboard(dashboard_env, url: str) -> AppTest:
    dashboard_env(url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    return at


def test_the_sidebar_says_when_no_worker_is_alive_and_when_one_is(backend, dashboard_env):
    at = dashboard(dashboard_env, backend.url)
    kind, line = status(at)
    assert kind == "warning" and line.startswith("backend ✓ · database ✓ · worker ✗ (none alive, a new job would wait: "
                                               "start `edgerlhf worker`)"), (kind, line)

    created = httpx.post(f"{backend.url}/api/jobs", json={"preset": "tiny"}, timeout=30)
    assert created.status_code == 201, created.text
    at.run()
    assert "worker ✗ (none alive, 1 queued job(s) wait" in status(at)[1]

    register_worker(backend.db_url, "box:1")
    at.run()
    assert status(at) == ("caption", "backend ✓ · database ✓ · worker ✓")


def test_the_sidebar_says_the_backend_is_unreachable(dashboard_env):
    at = dashboard(dashboard_env, f"http://127.0.0.1:{free_port()}")  # nothing listens there
    kind, line = status(at)
    assert kind == "warning" and line.startswith("backend ✗ (unreachable: start `edgerlhf backend`"), (kind, line)


def test_the_sidebar_says_the_database_is_down(postgres, tmp_path, dashboard_env):
    url = postgres.create_database("status")
    backend = start_backend(tmp_path / "data", EDGERLHF_DATABASE_URL=url)
    try:
        assert status(dashboard(dashboard_env, backend.url))[1].startswith("backend ✓ · database ✓")
        postgres.drop_database(url)  # as a database server that went away would
        kind, line = status(dashboard(dashboard_env, backend.url))
        assert (kind, line) == ("warning", "backend ✓ · database ✗ (unreachable: see the backend's log) · worker ?")
    finally:
        backend.stop()
