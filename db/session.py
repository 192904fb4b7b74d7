"""Engine and session factory, and the schema's creation and growth (`init_db`), for SQLite and PostgreSQL.

SQLite (the embedded default) gets WAL mode and a busy timeout: WAL lets the backend read while the worker
writes (readers never block the single writer), and the busy timeout makes a second writer (another worker,
the backend enqueueing) wait for the lock instead of failing with "database is locked". SQLAlchemy's SQLite
notes describe the pragmas used here. PostgreSQL (`postgresql+psycopg://user:pass@host/db`, psycopg 3) is
used as is, with `pool_pre_ping` so a restarted server costs one failed check, not a failed request.
"""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from sqlalchemy import create_engine, event, func, inspect, select, text, update
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.schema import CreateIndex, CreateTable

from db.models import ArenaVote, Base, Job, LogLine, Metric, Sample

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


_RACE_WORDS = ("already exists", "duplicate column", "duplicate key value", "locked", "deadlock detected")
"""What the loser of two processes creating the same table, column or index is told (SQLite, PostgreSQL)."""


def init_db(engine: Engine) -> None:
    """Create missing tables, add missing columns, number old rows, add missing indexes. Safe when several
    processes start at once, on SQLite and PostgreSQL.

    The schema only ever grows by columns that are nullable or have a `server_default` (a new column must
    have one of the two: old rows get it), so `add_missing_columns` is the whole migration story, the same
    on SQLite and PostgreSQL: a database written by an older version gains the new columns in place. The
    one column filled by a step of its own is `row_seq`, the read cursor of metrics, samples and logs
    (`number_old_rows`), and indexes of tables that already exist come after it (`add_missing_indexes`). One change
    is not a column: SQLite tables made before they had AUTOINCREMENT are rebuilt once (`add_autoincrement`).
    """
    for attempt in range(5):
        try:
            Base.metadata.create_all(engine)
            add_missing_columns(engine)
            add_autoincrement(engine)
            number_old_rows(engine)
            add_missing_indexes(engine)
            return
        except (OperationalError, ProgrammingError, IntegrityError) as exc:
            # Two processes may both see a table, column or index missing; the loser's DDL fails (on PostgreSQL
            # a concurrent CREATE TABLE can also fail on its catalog's unique index) and retrying finds it.
            if not any(word in str(exc) for word in _RACE_WORDS) or attempt == 4:
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


_MODEL_JOB = re.compile(r"^job-(\d+)/")
"""The job id in a chat model id (`job-12/ppo`, `backend.chat_models.MODEL_ID_FORMAT`), as arena votes store it."""


def add_autoincrement(engine: Engine) -> list[str]:
    """Rebuild each SQLite table whose model asks for AUTOINCREMENT (`sqlite_autoincrement`) but whose stored table
    lacks it (made by an older version), so that the id of a deleted row is never handed out again; returns the
    tables rebuilt. Nothing to do on PostgreSQL, whose sequences never go back.

    SQLite cannot add AUTOINCREMENT to a table, so this is its documented rebuild (sqlite.org/lang_altertable.html,
    "making other kinds of table schema changes"): foreign keys off (a DROP TABLE of `jobs` would cascade to every
    row that points at it), then in one write transaction a new table, the rows copied with their ids, the old table
    dropped, the new one renamed, its indexes made, `PRAGMA foreign_key_check`. The sequence starts past the highest
    id seen, in the rows and, for jobs, in the chat model ids arena votes name (`job-12/ppo`: a deleted job's votes
    stay, and a new job must not inherit them). Several processes may start at once: the first to take the write
    lock rebuilds, the others wait for it and find nothing left to do.
    """
    if engine.dialect.name != "sqlite":
        return []
    wanted = [t for t in Base.metadata.sorted_tables if t.dialect_options["sqlite"].get("autoincrement")]

    def lacking(cursor) -> list:
        found = []
        for table in wanted:
            row = cursor.execute("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?",
                                 (table.name,)).fetchone()
            if row is not None and "AUTOINCREMENT" not in row[0].upper():
                found.append(table)
        return found

    raw = engine.raw_connection()
    try:
        db = raw.driver_connection
        if not lacking(db):
            return []
        saved = db.isolation_level
        db.isolation_level = None  # explicit BEGIN and COMMIT below
        try:
            db.execute("PRAGMA foreign_keys=OFF")  # outside any transaction, or SQLite ignores it
            db.execute("BEGIN IMMEDIATE")
            try:
                rebuilt = []
                for table in lacking(db):  # again, under the write lock: another process may have done it
                    _rebuild(db, table, engine.dialect)
                    rebuilt.append(table.name)
                if "jobs" in rebuilt:
                    _skip_job_ids_named_by_votes(db)
                broken = db.execute("PRAGMA foreign_key_check").fetchall()
                if broken:
                    raise RuntimeError(f"rebuilding {rebuilt} broke foreign keys: {broken[:5]}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        finally:
            db.execute("PRAGMA foreign_keys=ON")
            db.isolation_level = saved
        return rebuilt
    finally:
        raw.close()


def _rebuild(db, table, dialect) -> None:
    new = f"{table.name}__rebuilt"
    ddl = str(CreateTable(table).compile(dialect=dialect)).strip()
    head = f"CREATE TABLE {table.name} ("
    assert ddl.startswith(head), ddl[:80]
    db.execute(f"CREATE TABLE {new} (" + ddl[len(head):])
    columns = ", ".join(f'"{c.name}"' for c in table.columns)
    db.execute(f"INSERT INTO {new} ({columns}) SELECT {columns} FROM {table.name}")  # ids kept: the sequence follows
    db.execute(f"DROP TABLE {table.name}")  # its indexes go with it
    db.execute(f"ALTER TABLE {new} RENAME TO {table.name}")
    for index in table.indexes:
        db.execute(str(CreateIndex(index).compile(dialect=dialect)))


def _skip_job_ids_named_by_votes(db) -> None:
    votes = ArenaVote.__table__.name
    named = [int(m.group(1)) for row in db.execute(f"SELECT model_a, model_b FROM {votes}") for value in row
             if (m := _MODEL_JOB.match(value or ""))]
    highest = max(named, default=0)
    seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
    if seq is None:
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)", (highest,))
    elif seq[0] < highest:
        db.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'jobs'", (highest,))


def number_old_rows(engine: Engine) -> int:
    """Give the metrics, samples and log lines written before `row_seq` existed a number: their id, so a cursor
    a reader held then (a global id) still resumes in the right place; then raise each job's counter
    (`Job.last_row_seq`) past its rows. Returns how many rows it numbered.

    A table created with `row_seq` has it NOT NULL and is skipped at no cost. Where `add_missing_columns` added
    the column (nullable), every start looks for rows without a number, so a row an old worker wrote after the
    upgrade began is numbered by the next start; PostgreSQL then marks the column NOT NULL, and stops looking.
    """
    numbered = 0
    with engine.begin() as conn:
        for model in (Metric, Sample, LogLine):
            table = model.__table__
            if not _nullable(conn, table.name, "row_seq"):
                continue
            count = conn.execute(update(table).where(table.c.row_seq.is_(None)).values(row_seq=table.c.id)).rowcount
            if count:
                numbered += count
                jobs = Job.__table__
                last = select(func.max(table.c.row_seq)).where(table.c.job_id == jobs.c.id).scalar_subquery()
                conn.execute(update(jobs).where(func.coalesce(jobs.c.last_row_seq, 0) < last).values(last_row_seq=last))
            if engine.dialect.name == "postgresql":
                conn.execute(text(f"ALTER TABLE {table.name} ALTER COLUMN row_seq SET NOT NULL"))
    return numbered


def _nullable(conn: Connection, table: str, column: str) -> bool:
    return next(c["nullable"] for c in inspect(conn).get_columns(table) if c["name"] == column)


def add_missing_indexes(engine: Engine) -> list[str]:
    """`CREATE INDEX` for every model index an existing table lacks (create_all only indexes the tables it
    creates); returns the names added."""
    added = []
    with engine.begin() as conn:
        for table in Base.metadata.sorted_tables:
            present = {ix["name"] for ix in inspect(conn).get_indexes(table.name)}
            for index in table.indexes:
                if index.name not in present:
                    index.create(conn)
                    added.append(index.name)
    return added


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    # Objects stay readable after commit: queue functions return them to callers outside the session.
    return sessionmaker(engine, expire_on_commit=False)
