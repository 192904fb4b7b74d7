"""The tables store the contract's statuses, and their columns do not depend on the statuses' members."""

from __future__ import annotations

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.schema import CreateTable

import db
from db import init_db, make_engine, make_sessionmaker
from db.models import Base, Job, StageRun
from edgerlhf import contract

# The two tables as an earlier version created them (before StageStatus gained the API-only `pending`), in
# types both engines know.
EXISTING_SCHEMA = [
    """CREATE TABLE jobs (id INTEGER NOT NULL, name VARCHAR(200) NOT NULL, status VARCHAR(16) NOT NULL,
       preset VARCHAR(100) NOT NULL, config JSON NOT NULL, stage VARCHAR(32), progress FLOAT NOT NULL,
       created_at TIMESTAMP NOT NULL, started_at TIMESTAMP, finished_at TIMESTAMP, error TEXT, traceback TEXT,
       attempts INTEGER NOT NULL, worker_id VARCHAR(200), heartbeat_at TIMESTAMP, cancel_requested BOOLEAN NOT NULL,
       PRIMARY KEY (id))""",
    """CREATE TABLE stage_runs (id INTEGER NOT NULL, job_id INTEGER NOT NULL, stage VARCHAR(32) NOT NULL,
       status VARCHAR(16) NOT NULL, attempt INTEGER NOT NULL, progress FLOAT NOT NULL, started_at TIMESTAMP,
       finished_at TIMESTAMP, report JSON, PRIMARY KEY (id),
       CONSTRAINT uq_stage_runs_job_stage UNIQUE (job_id, stage),
       FOREIGN KEY(job_id) REFERENCES jobs (id) ON DELETE CASCADE)""",
]
STORED_STAGE_STATUSES = [s for s in contract.StageStatus if s is not contract.StageStatus.pending]


def test_the_database_package_re_exports_the_contracts_statuses():
    assert db.JobStatus is contract.JobStatus and db.StageStatus is contract.StageStatus
    assert db.FINISHED is contract.FINISHED


@pytest.mark.parametrize("dialect", [sqlite.dialect(), postgresql.dialect()], ids=["sqlite", "postgresql"])
def test_status_columns_are_plain_strings_without_a_check_on_the_members(dialect):
    # A CHECK (or a native ENUM) would freeze the members into an existing database's schema, and a member
    # added to the contract later could not be stored there without a migration.
    for table in ("jobs", "stage_runs"):
        ddl = str(CreateTable(Base.metadata.tables[table]).compile(dialect=dialect))
        assert "status VARCHAR(16) NOT NULL" in ddl and "CHECK" not in ddl.upper(), ddl
        assert "ENUM" not in ddl.upper()


def test_an_existing_database_stores_and_reads_every_stored_status(db_url):
    engine = make_engine(db_url)
    with engine.begin() as conn:
        for statement in EXISTING_SCHEMA:
            if engine.dialect.name == "postgresql":  # as SQLAlchemy makes an integer primary key count there
                statement = statement.replace("(id INTEGER NOT NULL", "(id SERIAL NOT NULL")
            conn.execute(text(statement))
    init_db(engine)  # creates only the tables that are missing
    sessions = make_sessionmaker(engine)
    with sessions() as session:
        for status in contract.JobStatus:
            job = Job(name=status.value, preset="tiny", config={}, status=status)
            session.add(job)
            session.flush()
            for stage, stage_status in zip(contract.STAGES, STORED_STAGE_STATUSES):
                session.add(StageRun(job_id=job.id, stage=stage, status=stage_status))
        session.commit()
        session.execute(update(StageRun).values(status=contract.StageStatus.interrupted))  # as db.queue writes
        session.commit()
    with sessions() as session:
        assert [j.status for j in session.scalars(select(Job).order_by(Job.id))] == list(contract.JobStatus)
        assert {r.status for r in session.scalars(select(StageRun))} == {contract.StageStatus.interrupted}
    with engine.connect() as conn:
        stored = conn.execute(text("SELECT DISTINCT status FROM jobs ORDER BY status")).scalars().all()
    assert stored == sorted(s.value for s in contract.JobStatus)
    engine.dispose()
