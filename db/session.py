"""Engine and session factory. SQLite gets WAL mode and a busy timeout; any other SQLAlchemy URL works as is.

WAL lets the backend read while the worker writes (readers never block the single writer), and the
busy timeout makes a second writer (another worker, the backend enqueueing) wait for the lock instead
of failing with "database is locked". SQLAlchemy's SQLite notes describe the pragmas used here.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker

from db.models import Base

BUSY_TIMEOUT_S = 30.0
"""How long a SQLite writer waits for the write lock before giving up."""

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    cursor.execute("PRAGMA foreign_keys=ON")
    # NORMAL is durable across application crashes in WAL mode (only an OS crash can lose the last commits).
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(url: str, **kwargs) -> Engine:
    """A new engine for `url`; for SQLite the file's directory is created and the pragmas are set."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        connect_args = {"timeout": BUSY_TIMEOUT_S, "check_same_thread": False}
        connect_args.update(kwargs.pop("connect_args", {}))
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(url, pool_pre_ping=True, **kwargs)


def get_engine(url: str) -> Engine:
    """One shared engine per URL in this process (created on first use)."""
    with _engines_lock:
        if url not in _engines:
            _engines[url] = make_engine(url)
        return _engines[url]


def init_db(engine: Engine) -> None:
    """Create missing tables, then add missing columns. Safe when several processes start at once.

    The schema only ever grows by columns that are nullable or have a `server_default` (a new column must
    have one of the two: old rows get it), so `add_missing_columns` is the whole migration story, the same
    on SQLite and PostgreSQL: a database written by an older version gains the new columns in place.
    """
    for attempt in range(5):
        try:
            Base.metadata.create_all(engine)
            add_missing_columns(engine)
            return
        except (OperationalError, ProgrammingError) as exc:
            # Two processes may both see a table or column missing; the loser's DDL fails and retrying finds it.
            if not any(word in str(exc) for word in ("already exists", "duplicate column", "locked")) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def add_missing_columns(engine: Engine) -> list[str]:
    """`ALTER TABLE ... ADD COLUMN` for every model column the database lacks; returns `table.column` added."""
    added = []
    existing_tables = set(inspect(engine).get_table_names())
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            if table.name not in existing_tables:
                continue
            present = {c["name"] for c in inspect(conn).get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                kind = column.type.compile(dialect=engine.dialect)
                default = column.server_default.arg if column.server_default is not None else None
                ddl = f'ALTER TABLE {table.name} ADD COLUMN "{column.name}" {kind}'
                if default is not None:
                    ddl += f" DEFAULT {default}"
                conn.execute(text(ddl))
                added.append(f"{table.name}.{column.name}")
    return added


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: queue functions return them to callers outside the session.
    return sessionmaker(engine, expire_on_commit=False)
