"""Fixtures for the backend tests: an app on a fresh database (SQLite or PostgreSQL: `db_url`) and its in-process
client, which calls the app `localhost` (the backend answers only trusted Host names, and TestClient's default
`testserver` is none). A real backend process comes from `tests/support/backend.py` (`start_backend`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from backend.main import create_app
from edgerlhf.settings import Settings


@pytest.fixture
def settings(tmp_path, db_url) -> Settings:
    return Settings(data_dir=tmp_path / "data", database_url=db_url, api_token=None)


@pytest.fixture
def app(settings):
    return create_app(settings)


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as c:
        yield c
