"""Read queries for the backend and tests: jobs with their queue position, and cursor pages of a job's rows.

Cursor pages return a job's rows with `row_seq > after` in `row_seq` order, at most `limit` of them; the
caller passes the last `row_seq` back as the next `after`. A reader never misses or repeats a row, on
SQLite and PostgreSQL alike, with any number of processes writing the job's rows at once, because:

- **Why not the global id.** A reader that has seen id 120 asks for `id > 120`. On PostgreSQL, ids come
  from a sequence when a row is inserted, not when its transaction commits: the worker's flusher draws
  118, the job process or the backend draws 120 and commits first, the reader sees 120, then 118 commits,
  behind the cursor, and is never returned (tests/db/test_cursors.py showed it: with three writers the id
  cursor missed rows in every run, up to 57 of 4,800). SQLite never showed it only because it has one
  writer at a time.
- **A per-job number, handed out under the job row's lock.** Each job row carries a counter
  (`Job.last_row_seq`); a transaction that writes a job's metrics, samples or log lines first bumps it by the
  batch's size (`db.queue.next_row_seqs`: one `UPDATE jobs ... RETURNING`, so one lock per batch, not
  per row) and numbers the rows from it. The update holds the job row's lock until commit, so a second
  writer of the same job waits for the first to commit before it draws its numbers: within a job, number
  order is commit order, and every snapshot a reader takes holds all of a job's committed numbers up to
  some point and none after it (PostgreSQL's row lock; SQLite's single writer serialises the same way).
  A rolled-back batch rolls its numbers back with it. The price: writers of one job wait for each other's
  batch transaction (milliseconds; the worker's context writes one batch every half second), and so does
  a heartbeat or a cancel, which update the same row.
- **Why per job, not a global counter or a global lock.** Writers of different jobs never wait on each
  other, and every reader follows one job. One counter serves the three tables (a page of one kind skips
  the numbers of the others, which only makes gaps), so a batch with metrics, samples and logs takes the
  lock once. Considered and not taken: a global advisory lock (serialises every job's writers),
  reading only up to the oldest open transaction's snapshot (`pg_snapshot_xmin`, PostgreSQL-only and
  a stalled transaction stalls every reader), and commit timestamps (not in visibility order either).
- Rows written before `row_seq` existed were numbered with their id by `db.session.init_db`, so a
  cursor a dashboard held across the upgrade (a global id) still resumes where it was.

The unique index `(job_id, row_seq)` of each table makes a page one index range scan, and makes a
number handed out twice an error instead of a silently skipped row.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import INT64_MAX, INT64_MIN, Artifact, Job, JobStatus, LogLine, Metric, Sample, StageRun, Worker, utcnow


def get_job(session: Session, job_id: int) -> Job | None:
    """The job with this id, or None; any int is accepted (ids come straight from URLs)."""
    if not INT64_MIN <= job_id <= INT64_MAX:  # no row has it, and SQLite could not bind it
        return None
    return session.get(Job, job_id, populate_existing=True)


def list_jobs(session: Session, statuses: Sequence[JobStatus] = (), limit: int = 50,
              offset: int = 0) -> tuple[list[Job], int]:
    """Newest first, optionally only the given statuses; also returns the total count of matches."""
    query = select(Job)
    count = select(func.count(Job.id))
    if statuses:
        query = query.where(Job.status.in_(statuses))
        count = count.where(Job.status.in_(statuses))
    jobs = session.scalars(query.order_by(Job.id.desc()).limit(limit).offset(offset)).all()
    return list(jobs), int(session.scalar(count) or 0)


def rounds(session: Session, job_id: int) -> list[Job]:
    """The chain of rounds job `job_id` belongs to (`Job.parent_id`): the jobs it continues, back to its round 1 (or
    to the first whose parent was deleted), itself, and every job continued from it, from those, and so on; ordered
    by round, then id. Empty for an unknown job."""
    job = get_job(session, job_id)
    if job is None:
        return []
    found = {job.id: job}
    node = job
    while node.parent_id is not None and node.parent_id not in found:
        parent = get_job(session, node.parent_id)
        if parent is None:
            break
        found[parent.id] = node = parent
    frontier = [job.id]
    while frontier:
        children = [c for c in session.scalars(select(Job).where(Job.parent_id.in_(frontier))) if c.id not in found]
        found.update({c.id: c for c in children})
        frontier = [c.id for c in children]
    return sorted(found.values(), key=lambda j: (j.round or 1, j.id))


def queue_positions(session: Session) -> dict[int, int]:
    """Queued job id -> its position in the queue (1 = the next job a worker claims)."""
    ids = session.scalars(select(Job.id).where(Job.status == JobStatus.queued).order_by(Job.id)).all()
    return {job_id: i + 1 for i, job_id in enumerate(ids)}


def status_counts(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all()
    counts = {s.value: 0 for s in JobStatus}
    counts.update({status.value: int(n) for status, n in rows})
    return counts


def stage_runs(session: Session, job_id: int) -> list[StageRun]:
    return list(session.scalars(select(StageRun).where(StageRun.job_id == job_id).order_by(StageRun.id)).all())


def metrics_after(session: Session, job_id: int, after: int = 0, keys: Sequence[str] = (),
                  stage: str | None = None, limit: int = 10_000) -> list[Metric]:
    query = select(Metric).where(Metric.job_id == job_id, Metric.row_seq > after)
    if keys:
        query = query.where(Metric.key.in_(keys))
    if stage:
        query = query.where(Metric.stage == stage)
    return list(session.scalars(query.order_by(Metric.row_seq).limit(limit)).all())


def samples_after(session: Session, job_id: int, after: int = 0, stage: str | None = None,
                  kind: str | None = None, limit: int = 1_000) -> list[Sample]:
    query = select(Sample).where(Sample.job_id == job_id, Sample.row_seq > after)
    if stage:
        query = query.where(Sample.stage == stage)
    if kind:
        query = query.where(Sample.kind == kind)
    return list(session.scalars(query.order_by(Sample.row_seq).limit(limit)).all())


def logs_after(session: Session, job_id: int, after: int = 0, limit: int = 1_000) -> list[LogLine]:
    query = select(LogLine).where(LogLine.job_id == job_id, LogLine.row_seq > after)
    return list(session.scalars(query.order_by(LogLine.row_seq).limit(limit)).all())


def artifacts(session: Session, job_id: int) -> list[Artifact]:
    return list(session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)).all())


def workers(session: Session, limit: int = 20) -> list[Worker]:
    """The workers that heartbeated last, most recent first (old rows of stopped workers stay in the table)."""
    return list(session.scalars(select(Worker).order_by(Worker.heartbeat_at.desc()).limit(limit)).all())


def alive_workers(session: Session, within_seconds: float) -> list[Worker]:
    """Workers that heartbeated in the last `within_seconds` and did not say they stopped."""
    cutoff: datetime = utcnow() - timedelta(seconds=within_seconds)
    return list(session.scalars(select(Worker).where(Worker.heartbeat_at >= cutoff, Worker.state != "stopped")
                                .order_by(Worker.heartbeat_at.desc())).all())


def metric_points(session: Session, job_id: int, key: str, stage: str | None = None) -> list[tuple[str, int, float | None]]:
    """(stage, step, value) of every point of one metric, in step order (tests, reports)."""
    query = select(Metric.stage, Metric.step, Metric.value).where(Metric.job_id == job_id, Metric.key == key)
    if stage:
        query = query.where(Metric.stage == stage)
    return [tuple(r) for r in session.execute(query.order_by(Metric.stage, Metric.step)).all()]
