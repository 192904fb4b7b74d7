"""Fixtures for the worker tests: a data directory, its database and real worker processes (`tests/support/workers.py`).

What a worker process does (claims by GPU memory, crash, SIGKILL and resume, SIGTERM, cancel) is about processes, not
SQL: `service` runs on a SQLite file. The SQL under it (atomic claims racing across processes, stall detection,
cursors) runs on both engines in tests/db. The worker's database context, which writes through that SQL in-process,
runs on both engines (`db_service`).
"""

from __future__ import annotations

import pytest

from tests.support.workers import Service


@pytest.fixture
def service(tmp_path, sqlite_url):
    svc = Service(tmp_path, sqlite_url)
    yield svc
    svc.close()


@pytest.fixture
def db_service(tmp_path, db_url):
    svc = Service(tmp_path, db_url)
    yield svc
    svc.close()
