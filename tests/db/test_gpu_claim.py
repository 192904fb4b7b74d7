"""Many GPU workers, one queue: a job's minimum GPU memory decides which worker may claim it, a dead worker's
job goes back to the queue whoever notices, and a database from before these columns gains them."""

from __future__ import annotations

import sqlite3
from datetime import timedelta

from sqlalchemy import inspect, update

from db import JobStatus, init_db, make_engine, make_sessionmaker, queue, read
from db.models import Base, Job, utcnow


def make_job(sessions, name: str, min_gpu_memory_mb: int | None = None) -> int:
    with sessions() as s:
        return queue.create_job(s, name=name, preset="tiny", config={"stages": ["data"]},
                                min_gpu_memory_mb=min_gpu_memory_mb).id


def test_a_worker_claims_only_the_jobs_its_gpu_memory_meets_oldest_first(sessions):
    big = make_job(sessions, "big", min_gpu_memory_mb=16_000)
    mid = make_job(sessions, "mid", min_gpu_memory_mb=8_000)
    any_gpu = make_job(sessions, "any")
    with sessions() as s:
        # Unknown memory (a CPU-only worker): only the job without a minimum, though it is the newest.
        assert queue.claim_next(s, "cpu", None).id == any_gpu
        assert queue.claim_next(s, "cpu", None) is None
        # Less than either minimum: nothing, and both jobs stay queued for a worker that has it.
        assert queue.claim_next(s, "small", 7_999) is None
        assert read.queue_positions(s) == {big: 1, mid: 2}
        # Exactly the minimum is enough; the older, bigger job is skipped, not blocking the queue.
        assert queue.claim_next(s, "eight", 8_000).id == mid
        assert queue.claim_next(s, "eight", 8_000) is None
        assert queue.claim_next(s, "large", 80_000).id == big
        jobs = {j.id: j for j in (read.get_job(s, i) for i in (big, mid, any_gpu))}
    assert {i: (j.status, j.worker_id) for i, j in jobs.items()} == {
        big: (JobStatus.running, "large"), mid: (JobStatus.running, "eight"), any_gpu: (JobStatus.running, "cpu")}
    assert jobs[big].min_gpu_memory_mb == 16_000 and jobs[any_gpu].min_gpu_memory_mb is None


def test_a_dead_workers_job_is_requeued_by_any_worker_and_claimed_only_by_one_that_fits(sessions):
    job_id = make_job(sessions, "needs 24 GB", min_gpu_memory_mb=24_000)
    with sessions() as s:
        assert queue.claim_next(s, "dead-a100", 40_000).id == job_id
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=utcnow() - timedelta(seconds=60)))
        s.commit()
        # A small worker's loop notices the stall (requeue_stalled does not ask who calls it) ...
        assert queue.requeue_stalled(s, stall_seconds=30, max_attempts=3) == [(job_id, JobStatus.queued)]
        # ... but cannot take the job itself.
        assert queue.claim_next(s, "small", 8_000) is None
        assert queue.claim_next(s, "cpu", None) is None
        job = queue.claim_next(s, "other-a100", 40_000)
        assert (job.id, job.attempts, job.worker_id) == (job_id, 2, "other-a100")


def test_the_worker_row_records_its_gpu(sessions):
    with sessions() as s:
        queue.worker_heartbeat(s, "h:1", hostname="h", pid=1, state="idle", gpu_index=1, gpu_name="RTX 4060",
                               gpu_memory_mb=8188)
        queue.worker_heartbeat(s, "h:2", hostname="h", pid=2, state="idle")  # a CPU-only worker
        queue.worker_heartbeat(s, "h:1", hostname="h", pid=1, state="busy", job_id=7, child_pid=9, gpu_index=1,
                               gpu_name="RTX 4060", gpu_memory_mb=8188)
        rows = {w.id: w for w in read.workers(s)}
    assert (rows["h:1"].state, rows["h:1"].job_id, rows["h:1"].gpu_index, rows["h:1"].gpu_name,
            rows["h:1"].gpu_memory_mb) == ("busy", 7, 1, "RTX 4060", 8188)
    assert (rows["h:2"].gpu_index, rows["h:2"].gpu_name, rows["h:2"].gpu_memory_mb) == (None, None, None)


def test_a_database_from_before_gpu_workers_gains_the_columns_and_its_jobs_need_no_minimum(tmp_path):
    path = tmp_path / "old.db"
    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    engine.dispose()
    with sqlite3.connect(path) as conn:  # play the version before these columns
        conn.execute("ALTER TABLE jobs DROP COLUMN min_gpu_memory_mb")
        for column in ("gpu_index", "gpu_name", "gpu_memory_mb"):
            conn.execute(f"ALTER TABLE workers DROP COLUMN {column}")
        conn.execute("INSERT INTO jobs (name, status, preset, config, progress, created_at, attempts, "
                     "cancel_requested) VALUES ('old', 'queued', 'tiny', '{}', 0, '2026-01-01', 0, 0)")

    engine = make_engine(f"sqlite:///{path}")
    init_db(engine)
    for table in ("jobs", "workers"):
        assert {c["name"] for c in inspect(engine).get_columns(table)} == \
            {c.name for c in Base.metadata.tables[table].columns}
    with make_sessionmaker(engine)() as s:
        job = queue.claim_next(s, "cpu", None)  # the old job asks for no minimum: any worker takes it
        assert job is not None and job.name == "old" and job.min_gpu_memory_mb is None
    engine.dispose()
