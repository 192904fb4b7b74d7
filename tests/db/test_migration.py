"""The schema grows in place: a database made by an older version gains new columns (`init_db`)."""

import sqlite3

from sqlalchemy import inspect

from db import init_db, make_engine
from db.models import Base


def test_an_older_database_gains_the_missing_columns(tmp_path):
    path = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    engine.dispose()
    # Play an older version: drop a column the models have (SQLite >= 3.35 can).
    with sqlite3.connect(path) as conn:
        conn.execute("ALTER TABLE samples DROP COLUMN checkpoint")
        conn.execute("INSERT INTO jobs (name, status, preset, config, progress, created_at, attempts, "
                     "cancel_requested) VALUES ('old', 'queued', 'tiny', '{}', 0, '2026-01-01', 0, 0)")

    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    columns = {c["name"] for c in inspect(engine).get_columns("samples")}
    assert columns == {c.name for c in Base.metadata.tables["samples"].columns}
    with engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT name FROM jobs").scalar_one() == "old"  # nothing lost
    init_db(engine)  # and a second start changes nothing
