"""Fixtures for the database tests: a fresh database per test, on SQLite and on PostgreSQL (`db_url`)."""

from __future__ import annotations

import pytest

from db import init_db, make_engine, make_sessionmaker


@pytest.fixture
def sessions(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    yield make_sessionmaker(engine)
    engine.dispose()
