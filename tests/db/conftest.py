"""Fixtures for the database tests: a fresh SQLite file (WAL) per test."""

from __future__ import annotations

import pytest

from db import init_db, make_engine, make_sessionmaker


@pytest.fixture
def db_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'edgerlhf.db'}"


@pytest.fixture
def sessions(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    yield make_sessionmaker(engine)
    engine.dispose()
