"""Shared fixtures: the local data in ../shared, a database per test on either engine, the dashboard's settings, and
the session's one trained tiny run. What they are built from lives in `tests/support/`.

`db_url` is parametrised over SQLite (a file in the test's temp dir) and PostgreSQL (a new database on one
throw-away server per session, `tests/support/postgres.py`), so every test that takes it runs on both engines. Where
no PostgreSQL server can be started, the PostgreSQL half is skipped, or fails under `CI=true` (CI must run it).
Tests of what a worker process does (crash, SIGTERM, cancel, resume) take `sqlite_url` instead: they are about
processes, not SQL.

Under pytest-xdist (`-n 2`) every fixture here is per worker (one PostgreSQL server each), but the trained run,
which the workers share (`tests/support/trained.py`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerlhf.config import SHARED_DIR

from .support.db import ENGINES
from .support.postgres import PostgresServer, PostgresUnavailable

SHARED = Path(SHARED_DIR)

# Tests never reach the hub; make any accidental hub access fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


LONGEST_FIRST = (
    "tests/edgerlhf/test_known_answer.py",
    "tests/test_families.py",
    "tests/edgerlhf/test_verifiable.py",
    "tests/worker/test_worker.py",
    "tests/edgerlhf/test_plan_check.py",
    "tests/frontend/test_e2e_browser.py",
    "tests/backend/test_schemathesis.py",
    "tests/edgerlhf/test_gguf_export.py",
)
"""Modules that run for minutes, started first (in this order) so that no worker is left with one at the end."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The longest modules first: under `pytest -n 2 --dist loadfile` (the Makefile's), where
    each module's tests run on one worker (its module fixtures built once), they start at once instead of ending the
    run on one worker while the other waits. Without xdist only the order changes."""
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))  # stable: collection order otherwise


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared data directory {SHARED} is missing (set EDGERLHF_SHARED_DIR)")
    return SHARED


@pytest.fixture(scope="session")
def postgres():
    """One PostgreSQL server for the whole session, started on first use and removed at the end."""
    server, why = PostgresServer(), None
    try:
        server.start()
    except PostgresUnavailable as exc:
        server.stop()
        why = f"no PostgreSQL server for the PostgreSQL tests: {exc}"
    if why and os.environ.get("CI") == "true":
        pytest.fail(why, pytrace=False)
    if why:
        pytest.skip(why)
    yield server
    server.stop()


@pytest.fixture(params=ENGINES)
def db_url(request, tmp_path) -> Iterator[str]:
    """A fresh, empty database: a SQLite file in the temp dir, or a new database on the session's PostgreSQL
    (dropped after the test)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'data' / 'edgerlhf.db'}"
        return
    server = request.getfixturevalue("postgres")
    url = server.create_database()
    yield url
    server.drop_database(url)


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    """A fresh SQLite file in the temp dir, for tests about processes rather than SQL."""
    return f"sqlite:///{tmp_path / 'data' / 'edgerlhf.db'}"


@pytest.fixture
def dashboard_env(monkeypatch):
    """Point the in-process dashboard (AppTest runs it in this process) at a backend URL (and its token)."""
    from edgerlhf.settings import get_settings

    def point_at(url: str, token: str | None = None) -> None:
        for key in [k for k in os.environ if k.startswith("EDGERLHF_") and k != "EDGERLHF_SHARED_DIR"]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("EDGERLHF_BACKEND_URL", url)
        if token:
            monkeypatch.setenv("EDGERLHF_API_TOKEN", token)
        get_settings.cache_clear()

    yield point_at
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def finished_service(tmp_path_factory):
    """The session's backend over a PPO and a GRPO job that real workers ran (`tests/support/service.py`). Its
    tests read it; one that writes takes `copy_data`. Under pytest-xdist the workers share the jobs (built once) and
    each serves them with a backend of its own."""
    from .support.service import finished_jobs, serve

    base = tmp_path_factory.getbasetemp()
    data_dir, jobs = finished_jobs(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)
    service = serve(data_dir, jobs, tmp_path_factory.mktemp("service-backend") / "backend.log")
    yield service
    service.backend.stop()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """The session's trained tiny run (`tests/support/trained.py`): read it, or `copy_to(tmp_path / ...)` to write."""
    from .support.trained import trained_run

    base = tmp_path_factory.getbasetemp()
    # xdist workers each have a basetemp under one common parent: build the run there, once for all of them.
    return trained_run(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)
