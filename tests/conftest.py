"""Shared fixtures: paths to the local data in ../shared, free ports, a database per test on either engine.

`db_url` is parametrised over SQLite (a file in the test's temp dir) and PostgreSQL (a new database on one
throw-away server per session, `tests/postgres.py`), so every test that takes it runs on both engines. Where
no PostgreSQL server can be started, the PostgreSQL half is skipped, or fails under `CI=true` (CI must run it).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgerlhf.config import SHARED_DIR

from .postgres import PostgresServer, PostgresUnavailable

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(SHARED_DIR)

# Tests never reach the hub; make any accidental hub access fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared data directory {SHARED} is missing (set EDGERLHF_SHARED_DIR)")
    return SHARED


ENGINES = ("sqlite", "postgresql")
sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
"""For a test of SQLite's own behaviour (its pragmas): `db_url` without the PostgreSQL half."""


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
