"""Databases in the tests: the two engines every database test runs on, and a table-by-table row count."""

from __future__ import annotations

import pytest

ENGINES = ("sqlite", "postgresql")
"""`db_url`'s parameters (tests/conftest.py): a SQLite file, and a database on the session's PostgreSQL server."""

sqlite_only = pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
"""For a test of SQLite's own behaviour (its pragmas): `db_url` without the PostgreSQL half."""


def row_counts(app) -> dict[str, int]:
    """Rows per table of a backend app's database: a rejected request must leave every one unchanged."""
    from sqlalchemy import func, select

    from db.models import Base

    with app.state.sessions() as s:
        return {t.name: s.scalar(select(func.count()).select_from(t)) for t in Base.metadata.sorted_tables}
