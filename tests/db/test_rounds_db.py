"""Rounds in the database (issue 32), on SQLite and PostgreSQL: a job keeps the job it continues and its round; an older
database gains both columns in place (its jobs are round 1); the chain of a job is its ancestors, itself and every job
continued from it, without its siblings' branches; a parent whose policy a live round has not copied yet is kept."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from db import JobStateError, init_db, make_engine, make_sessionmaker, queue, read

OLD_JOB = ("INSERT INTO jobs (name, status, preset, config, progress, created_at, attempts, cancel_requested) "
           "VALUES ('old', 'succeeded', 'tiny', '{}', 1, '2026-01-01', 1, false)")


def test_an_older_database_gains_parent_and_round_and_its_jobs_are_round_one(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    with engine.begin() as conn:  # the version before rounds
        conn.execute(text("DROP INDEX ix_jobs_parent_id"))
        conn.execute(text("ALTER TABLE jobs DROP COLUMN parent_id"))
        conn.execute(text('ALTER TABLE jobs DROP COLUMN "round"'))
        conn.execute(text(OLD_JOB))
    engine.dispose()

    engine = make_engine(db_url)
    init_db(engine)
    assert {"parent_id", "round"} <= {c["name"] for c in inspect(engine).get_columns("jobs")}
    assert "ix_jobs_parent_id" in {ix["name"] for ix in inspect(engine).get_indexes("jobs")}
    with make_sessionmaker(engine)() as session:
        [old] = read.rounds(session, 1)
        assert (old.parent_id, old.round) == (None, 1)
        child = queue.create_job(session, name="next", preset="tiny", config={}, parent_id=old.id, round=2)
        assert [(j.id, j.round) for j in read.rounds(session, old.id)] == [(old.id, 1), (child.id, 2)]
    engine.dispose()


def finish(session, job_id: int) -> None:
    assert queue.claim_next(session, "test-worker").id == job_id
    assert queue.finish(session, job_id, "test-worker")


def test_a_chain_is_ancestors_itself_and_descendants_and_a_parent_is_kept_until_copied(db_url):
    engine = make_engine(db_url)
    init_db(engine)
    with make_sessionmaker(engine)() as s:
        one = queue.create_job(s, name="one", preset="tiny", config={}).id
        finish(s, one)
        two = queue.create_job(s, name="two", preset="tiny", config={}, parent_id=one, round=2).id
        finish(s, two)
        three = queue.create_job(s, name="three", preset="tiny", config={}, parent_id=two, round=3).id
        other = queue.create_job(s, name="other two", preset="tiny", config={}, parent_id=one, round=2).id
        alone = queue.create_job(s, name="alone", preset="tiny", config={}).id
        ids = lambda job_id: [j.id for j in read.rounds(s, job_id)]  # noqa: E731
        assert ids(one) == [one, two, other, three], "round 1's chain: every round continued from it"
        assert ids(three) == [one, two, three], "round 3's: its ancestors, not the other branch"
        assert ids(other) == [one, other] and ids(alone) == [alone] and ids(10**6) == []
        assert read.get_job(s, three).parent_id == two

        assert queue.waiting_rounds(s, two) == [three]
        with pytest.raises(JobStateError, match=f"continued by job.*#{three}"):
            queue.delete_job(s, two)
        assert queue.claim_next(s, "test-worker").id == three
        queue.begin_stage(s, three, "sft", attempt=1)
        assert queue.waiting_rounds(s, two) == [three], "its SFT stage has not copied the parent's policy yet"
        queue.end_stage(s, three, "sft", {"round": 3}, 0.4)
        assert queue.waiting_rounds(s, two) == []
        queue.delete_job(s, two)
        assert ids(three) == [three], "a deleted parent ends the chain; the round keeps its number and parent id"
        assert (read.get_job(s, three).round, read.get_job(s, three).parent_id) == (3, two)
    engine.dispose()
