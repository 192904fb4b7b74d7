"""The schema grows in place, on SQLite and PostgreSQL: a database made by an older version gains new columns,
its rows gain their cursor numbers, and several processes may create or migrate one database at once (`init_db`)."""

from __future__ import annotations

import subprocess
import sys
import time

from sqlalchemy import inspect, select, text

from db import init_db, make_engine, make_sessionmaker, queue, read
from db.models import Base, Job

from tests.support.procs import REPO_ROOT

ROW_TABLES = ("metrics", "samples", "logs")
OLD_JOB = ("INSERT INTO jobs (name, status, preset, config, progress, created_at, attempts, cancel_requested) "
           "VALUES ('{name}', 'running', 'tiny', '{{}}', 0, '2026-01-01', 1, false)")


def columns(engine, table: str) -> set[str]:
    return {c["name"] for c in inspect(engine).get_columns(table)}


def test_an_older_database_gains_the_missing_columns(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    with engine.begin() as conn:  # play an older version: drop a column the models have (SQLite >= 3.35 can)
        conn.execute(text("ALTER TABLE samples DROP COLUMN checkpoint"))
        conn.execute(text(OLD_JOB.format(name="old")))
    engine.dispose()

    engine = make_engine(db_url)
    init_db(engine)
    assert columns(engine, "samples") == {c.name for c in Base.metadata.tables["samples"].columns}
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM jobs")).scalar_one() == "old"  # nothing lost
    init_db(engine)  # and a second start changes nothing
    engine.dispose()


def test_rows_from_before_the_cursor_numbers_get_their_id_and_an_old_cursor_still_resumes(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    with engine.begin() as conn:  # the version before `row_seq`: the global id was the cursor
        for table in ROW_TABLES:
            conn.execute(text(f"DROP INDEX ix_{table}_job_row_seq"))
            conn.execute(text(f"ALTER TABLE {table} DROP COLUMN row_seq"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN last_row_seq"))
        conn.execute(text(OLD_JOB.format(name="a")))
        conn.execute(text(OLD_JOB.format(name="b")))
        a, b = conn.execute(text("SELECT id FROM jobs ORDER BY id")).scalars().all()
        for step in range(6):  # the two jobs' points interleave in the global id order
            for job_id in (a, b):
                conn.execute(text('INSERT INTO metrics (job_id, stage, "key", step, value, time) '
                                  f"VALUES ({job_id}, 'sft', 'sft/loss', {step}, {step}, 0)"))
        conn.execute(text(f"INSERT INTO logs (job_id, time, level, message) VALUES ({a}, 0, 'info', 'old line')"))
        old_ids = conn.execute(text(f"SELECT id FROM metrics WHERE job_id = {a} ORDER BY id")).scalars().all()
    engine.dispose()

    engine = make_engine(db_url)
    init_db(engine)  # a newer version starts on it
    for table in ROW_TABLES:
        assert {ix["name"] for ix in inspect(engine).get_indexes(table)} >= {f"ix_{table}_job_row_seq"}
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        old = read.metrics_after(s, a)
        assert [m.row_seq for m in old] == [m.id for m in old] == old_ids, "an old row's number is its id"
        counters = dict(s.execute(select(Job.id, Job.last_row_seq)).all())
        assert counters[a] == max(max(old_ids), read.logs_after(s, a)[0].id)
        assert counters[b] == max(m.id for m in read.metrics_after(s, b))
        # A dashboard that had read up to the third point (an id cursor from the old API) resumes there:
        # the last three old points, then what the new version writes, once each.
        queue.record(s, a, metrics=[("sft", "sft/loss", 6, 6.0, 0.0)], logs=[(0.0, "info", "sft", "new line")])
        rest = read.metrics_after(s, a, after=old_ids[2])
        assert [m.step for m in rest] == [3, 4, 5, 6]
        assert rest[-1].row_seq > counters[a]
        assert [line.message for line in read.logs_after(s, a)] == ["old line", "new line"]
    init_db(engine)  # a second start finds nothing to do
    with sessions() as s:
        assert [m.row_seq for m in read.metrics_after(s, a)] == [m.row_seq for m in old] + [rest[-1].row_seq]
    if engine.dialect.name == "postgresql":  # PostgreSQL makes the column NOT NULL once it is filled
        assert not next(c for c in inspect(engine).get_columns("metrics") if c["name"] == "row_seq")["nullable"]
    engine.dispose()


STARTER = r"""
import sys, time
from pathlib import Path
from db import init_db, make_engine
url, ready, go = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
engine = make_engine(url)
ready.touch()
while not go.exists():
    time.sleep(0.001)
init_db(engine)
"""


def test_several_processes_creating_one_database_at_once_all_succeed(db_url, tmp_path):
    go, ready = tmp_path / "go", [tmp_path / f"ready-{i}" for i in range(4)]
    procs = [subprocess.Popen([sys.executable, "-c", STARTER, db_url, str(r), str(go)], cwd=REPO_ROOT,
                              stderr=subprocess.PIPE, text=True) for r in ready]
    deadline = time.monotonic() + 120
    while not all(r.exists() for r in ready):  # all of them at the start line, then all at once
        assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "a starter died"
        time.sleep(0.01)
    go.touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
    engine = make_engine(db_url)
    assert set(inspect(engine).get_table_names()) >= set(Base.metadata.tables)
    for table in ROW_TABLES:
        assert f"ix_{table}_job_row_seq" in {ix["name"] for ix in inspect(engine).get_indexes(table)}
    engine.dispose()


def _finished_job(sessions, name: str) -> int:
    with sessions() as s:
        job_id = queue.create_job(s, name=name, preset="tiny", config={}).id
        queue.request_cancel(s, job_id)  # a queued job is cancelled at once: finished, deletable
    return job_id


def _vote(sessions, model: str = "job-1/sft") -> int:
    from db import arena

    with sessions() as s:
        return arena.add_vote(s, prompt="\n\nHuman: hi\n\nAssistant:", model_a=model, model_b="job-1/ppo",
                              answer_a="a", answer_b="b", choice="a").id


def test_the_id_of_a_deleted_job_or_vote_is_never_handed_out_again(db_url):
    """Votes, leaderboard rows, snapshot vote ids and run directories name jobs and votes by id: a new job or vote
    must never get the id of a deleted one (SQLite's AUTOINCREMENT; PostgreSQL's sequences never go back)."""
    from db import arena

    engine = make_engine(db_url)
    init_db(engine)
    sessions = make_sessionmaker(engine)
    first, last = _finished_job(sessions, "a"), _finished_job(sessions, "b")
    with sessions() as s:
        queue.delete_job(s, last)  # the newest: SQLite would hand out max(id) + 1 again
    assert _finished_job(sessions, "c") > last > first
    v1, v2 = _vote(sessions), _vote(sessions)
    with sessions() as s:
        assert arena.delete_vote(s, v2)
    assert _vote(sessions) > v2 > v1
    engine.dispose()


def test_an_older_sqlite_database_is_rebuilt_once_with_autoincrement_and_keeps_every_row(sqlite_url):
    """A database made before `jobs` and `arena_votes` had AUTOINCREMENT is rebuilt in place by the next start: the
    rows, the rows that point at the jobs (a DROP TABLE with foreign keys on would cascade) and the indexes are
    kept, and no id already seen (the deleted job's, still named by a vote) is handed out again."""
    engine = make_engine(sqlite_url)
    init_db(engine)
    sessions = make_sessionmaker(engine)
    raw = engine.raw_connection()  # play an older version: the two tables without AUTOINCREMENT
    try:
        db = raw.driver_connection
        db.isolation_level = None
        db.execute("PRAGMA foreign_keys=OFF")
        for table in ("jobs", "arena_votes"):
            sql = db.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
            old = sql.replace(" AUTOINCREMENT", "").replace(f"CREATE TABLE {table} ", f"CREATE TABLE {table}_old ")
            db.execute(old)
            db.execute(f"INSERT INTO {table}_old SELECT * FROM {table}")
            db.execute(f"DROP TABLE {table}")
            db.execute(f"ALTER TABLE {table}_old RENAME TO {table}")
        db.execute("CREATE INDEX IF NOT EXISTS ix_jobs_status_id ON jobs (status, id)")
        db.execute("PRAGMA foreign_keys=ON")
    finally:
        raw.close()
    assert "AUTOINCREMENT" not in _table_sql(engine, "jobs")
    kept, deleted = _finished_job(sessions, "kept"), _finished_job(sessions, "deleted")
    with sessions() as s:
        queue.begin_stage(s, kept, "data", attempt=1)
        queue.record(s, kept, logs=[(0.0, "info", "data", "a line")], metrics=[("data", "data/pairs", 0, 1.0, 0.0)])
    _vote(sessions, model=f"job-{deleted}/sft")
    with sessions() as s:
        queue.delete_job(s, deleted)
    counts = _row_counts(engine)
    engine.dispose()

    for _ in range(2):  # the start that rebuilds, and one that finds nothing to do
        engine = make_engine(sqlite_url)
        init_db(engine)
        for table in ("jobs", "arena_votes"):
            assert "AUTOINCREMENT" in _table_sql(engine, table), table
        assert _row_counts(engine) == counts
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM jobs")).scalars().all() == ["kept"]
            assert conn.execute(text(f"SELECT count(*) FROM metrics WHERE job_id = {kept}")).scalar() == 1
            assert conn.execute(text(f"SELECT count(*) FROM stage_runs WHERE job_id = {kept}")).scalar() == 1
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
        assert "ix_jobs_status_id" in {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
        engine.dispose()
    sessions = make_sessionmaker(make_engine(sqlite_url))
    assert _finished_job(sessions, "new") > deleted  # not the deleted job's id, which a vote still names
    with sessions() as s:  # the foreign keys still cascade from the rebuilt table
        queue.delete_job(s, kept)
        assert s.scalar(text(f"SELECT count(*) FROM logs WHERE job_id = {kept}")) == 0


def _row_counts(engine) -> dict[str, int]:
    with engine.connect() as conn:
        return {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar() for t in Base.metadata.tables}


def _table_sql(engine, table: str) -> str:
    with engine.connect() as conn:
        return conn.execute(text("SELECT sql FROM sqlite_master WHERE type = 'table' AND name = :t"),
                            {"t": table}).scalar()


STEP_COLUMNS = ("done", "total", "first_done", "first_progress_at", "progress_at")


def test_an_older_stage_runs_table_gains_the_step_counts_and_stores_them(db_url):
    from datetime import timedelta

    from db.models import StageRun, utcnow

    engine = make_engine(db_url)
    init_db(engine)
    with engine.begin() as conn:  # the version before stages reported their step counts
        for column in STEP_COLUMNS:
            conn.execute(text(f"ALTER TABLE stage_runs DROP COLUMN {column}"))
        conn.execute(text(OLD_JOB.format(name="old")))
        job_id = conn.execute(text("SELECT id FROM jobs")).scalar_one()
        conn.execute(text("INSERT INTO stage_runs (job_id, stage, status, attempt, progress) "
                          f"VALUES ({job_id}, 'sft', 'running', 1, 0.25)"))
    engine.dispose()

    engine = make_engine(db_url)
    init_db(engine)
    assert set(STEP_COLUMNS) <= columns(engine, "stage_runs")
    sessions = make_sessionmaker(engine)
    with sessions() as s:
        old = read.stage_runs(s, job_id)[0]
        assert (old.progress, old.done, old.total, old.progress_at) == (0.25, None, None, None)  # unknown, not 0
        first = utcnow()
        queue.record(s, job_id, progress=("sft", 0.5, 0.5),
                     steps=queue.StepProgress(5, 10, 2, first, first + timedelta(seconds=30)))
    with sessions() as s:
        run = s.scalars(select(StageRun)).one()
        assert (run.done, run.total, run.first_done) == (5, 10, 2)
        assert run.first_progress_at == first and run.progress_at == first + timedelta(seconds=30)
    engine.dispose()
