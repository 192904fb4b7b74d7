"""The job queue: every change of a job's state goes through these functions (procrastinate's job manager idea).

Each function is one transaction on the `Session` it is given and commits it. State changes are
compare-and-set updates (`UPDATE ... WHERE id = ? AND status = ?`) checked by their row count, so two
processes can never both win: two workers claiming, a worker finishing a job another requeued, a cancel
racing a claim; the same on SQLite and PostgreSQL. `claim_next` picks its candidate with
`FOR NO KEY UPDATE SKIP LOCKED` on PostgreSQL (ignored by SQLite, whose one writer already serialises
claims), so racing workers take different jobs instead of queueing on the same row and losing.

Every metric, sample and log line of a job is numbered by `next_row_seqs`, which bumps the job row's
counter and so holds the job row's lock until the transaction commits: a transaction that writes a job's
rows locks the job row first (then anything else), and the numbers follow commit order (`db.read`).
Metrics and samples are written in batches with "replace" semantics: a row for an existing
(job, stage, key, step) point is deleted and inserted again, so it gets a new, larger number and a cursor
reader (`after=N`) sees the new value, while the unique constraint guarantees no point exists twice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, bindparam, delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from db.models import (
    FINISHED,
    Artifact,
    Job,
    JobStatus,
    LogLine,
    Metric,
    Sample,
    StageRun,
    StageStatus,
    Worker,
    utcnow,
)

logger = logging.getLogger("edgerlhf.db")


class JobNotFound(LookupError):
    """No job with this id."""

    def __init__(self, job_id: int):
        super().__init__(f"job {job_id} not found")
        self.job_id = job_id


class JobStateError(RuntimeError):
    """The action is not allowed in the job's current status (e.g. deleting a running job)."""


@dataclass(frozen=True)
class StepProgress:
    """Where a running stage is in the units its `ctx.progress(done, total)` counts (steps, batches ...), and when:
    what the dashboard's step counts and ETAs are computed from (`StageRun.done` and the columns after it)."""

    done: int
    total: int
    first_done: int
    """`done` at the stage's first report in this attempt: the step rate counts from there."""
    first_at: datetime
    """When that first report came (the end of loading and warm-up)."""
    at: datetime
    """When this report came (not when it was written: the worker writes in batches)."""


@dataclass
class HeartbeatReply:
    owned: bool
    """False when the job is no longer running under this worker (requeued by another worker, deleted)."""
    cancel_requested: bool


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def _log_row(job_id: int, message: str, level: str = "info", stage: str | None = None) -> dict[str, Any]:
    return {"job_id": job_id, "time": utcnow().timestamp(), "level": level, "stage": stage, "message": message}


_jobs = Job.__table__
_BUMP_ROW_SEQ = (update(_jobs).where(_jobs.c.id == bindparam("job_id"))
                 .values(last_row_seq=func.coalesce(_jobs.c.last_row_seq, 0) + bindparam("n"))
                 .returning(_jobs.c.last_row_seq))
"""Built once: it runs for every batch a job writes, and building the statement cost more than running it."""


def next_row_seqs(session: Session, job_id: int, n: int) -> int:
    """Reserve the next `n` numbers of `job_id`'s row stream (`row_seq` of its metrics, samples and logs);
    returns the first. The update locks the job row until this transaction ends, so no other transaction
    numbers rows of the job before this one commits: numbers never commit out of order. Call it before
    touching any other row in the transaction, so every writer takes its locks in the same order."""
    last = session.execute(_BUMP_ROW_SEQ, {"job_id": job_id, "n": n}).scalar()
    if last is None:
        raise JobNotFound(job_id)
    return last - n + 1


def _numbered(rows: list[dict[str, Any]], first: int) -> list[dict[str, Any]]:
    for i, row in enumerate(rows):
        row["row_seq"] = first + i
    return rows


def _add_logs(session: Session, job_id: int, *rows: dict[str, Any]) -> None:
    session.execute(insert(LogLine), _numbered(list(rows), next_row_seqs(session, job_id, len(rows))))


def _get(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id, populate_existing=True)
    if job is None:
        raise JobNotFound(job_id)
    return job


# --- enqueue and claim -----------------------------------------------------------------------------


def create_job(session: Session, *, name: str, preset: str, config: dict[str, Any],
               min_gpu_memory_mb: int | None = None, parent_id: int | None = None, round: int = 1) -> Job:
    """Queue a job; `parent_id` and `round`: the job it continues and its round (the next round of RLHF)."""
    job = Job(name=name, preset=preset, config=config, status=JobStatus.queued, min_gpu_memory_mb=min_gpu_memory_mb,
              parent_id=parent_id, round=round)
    session.add(job)
    session.flush()
    needs = f", needs a GPU with >= {min_gpu_memory_mb} MB" if min_gpu_memory_mb is not None else ""
    continues = f", round {round}: continues job {parent_id}" if parent_id is not None else ""
    _add_logs(session, job.id, _log_row(job.id, f"queued ({preset}{needs}{continues})"))
    session.commit()
    return job


def fits_gpu(gpu_memory_mb: int | None) -> ColumnElement[bool]:
    """The jobs a worker whose GPU has `gpu_memory_mb` may take: those without a minimum, and those whose
    minimum it meets; a worker of unknown memory (None: no GPU, or none found) only the former."""
    if gpu_memory_mb is None:
        return Job.min_gpu_memory_mb.is_(None)
    return or_(Job.min_gpu_memory_mb.is_(None), Job.min_gpu_memory_mb <= gpu_memory_mb)


def claim_next(session: Session, worker_id: str, gpu_memory_mb: int | None = None) -> Job | None:
    """Atomically take the oldest queued job that `worker_id`'s GPU memory fits (`fits_gpu`), or None if there
    is none; jobs asking for more memory stay queued for a worker that has it."""
    for _ in range(50):  # lost races retry with the next candidate
        now = utcnow()
        job_id = session.scalar(
            select(Job.id).where(Job.status == JobStatus.queued, fits_gpu(gpu_memory_mb)).order_by(Job.id).limit(1)
            .with_for_update(skip_locked=True, key_share=True))
        if job_id is None:
            session.rollback()
            return None
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == JobStatus.queued)
            .values(status=JobStatus.running, worker_id=worker_id, attempts=Job.attempts + 1,
                    heartbeat_at=now, started_at=now, finished_at=None, error=None, traceback=None)
            .execution_options(synchronize_session=False))
        if result.rowcount != 1:
            session.rollback()
            continue
        job = _get(session, job_id)
        _add_logs(session, job_id, _log_row(job_id, f"claimed by worker {worker_id} (attempt {job.attempts})"))
        session.commit()
        return job
    return None


def heartbeat(session: Session, job_id: int, worker_id: str) -> HeartbeatReply:
    """Prove the worker running `job_id` is alive; also tells it whether a cancel was requested."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.worker_id == worker_id, Job.status == JobStatus.running)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False))
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    session.commit()
    return HeartbeatReply(owned=result.rowcount == 1, cancel_requested=bool(cancel))


def cancel_requested(session: Session, job_id: int) -> bool:
    """Whether someone asked `job_id` to stop (a missing job counts as cancelled: it was deleted)."""
    row = session.execute(select(Job.cancel_requested, Job.status).where(Job.id == job_id)).first()
    session.rollback()
    return row is None or bool(row.cancel_requested) or row.status == JobStatus.cancelled


def worker_heartbeat(session: Session, worker_id: str, *, hostname: str, pid: int, state: str,
                     job_id: int | None = None, child_pid: int | None = None, gpu_index: int | None = None,
                     gpu_name: str | None = None, gpu_memory_mb: int | None = None) -> None:
    """Create or refresh the worker's row: the backend's "worker alive", and the GPU it owns (index, name,
    memory: None where unknown)."""
    worker = session.get(Worker, worker_id, populate_existing=True)
    if worker is None:
        worker = Worker(id=worker_id, hostname=hostname, pid=pid)
        session.add(worker)
    worker.heartbeat_at = utcnow()
    worker.state = state
    worker.job_id = job_id
    worker.child_pid = child_pid
    worker.gpu_index = gpu_index
    worker.gpu_name = gpu_name
    worker.gpu_memory_mb = gpu_memory_mb
    session.commit()


# --- what the running job writes -------------------------------------------------------------------


def begin_stage(session: Session, job_id: int, stage: str, attempt: int) -> None:
    now = utcnow()
    # The job row first, as every writer of a job's rows locks it (`next_row_seqs`): one lock order, no deadlock.
    session.execute(update(Job).where(Job.id == job_id).values(stage=stage)
                    .execution_options(synchronize_session=False))
    run = session.scalar(select(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage))
    if run is None:
        run = StageRun(job_id=job_id, stage=stage)
        session.add(run)
    run.status = StageStatus.running
    run.attempt = attempt
    run.progress = 0.0
    run.done = run.total = run.first_done = run.first_progress_at = run.progress_at = None  # this attempt's own
    run.started_at = now
    run.finished_at = None
    run.report = None
    session.commit()


def end_stage(session: Session, job_id: int, stage: str, report: dict[str, Any] | None,
              overall_progress: float | None = None) -> None:
    if overall_progress is not None:  # the job row first (see begin_stage)
        session.execute(update(Job).where(Job.id == job_id).values(progress=overall_progress)
                        .execution_options(synchronize_session=False))
    session.execute(
        update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage)
        .values(status=StageStatus.succeeded, progress=1.0, finished_at=utcnow(), report=report)
        .execution_options(synchronize_session=False))
    session.commit()


def completed_stages(session: Session, job_id: int) -> set[str]:
    """Stages of `job_id` that succeeded in an earlier attempt: a resumed job skips them."""
    rows = session.scalars(select(StageRun.stage).where(
        StageRun.job_id == job_id, StageRun.status == StageStatus.succeeded)).all()
    session.rollback()
    return set(rows)


def _replace_rows(session: Session, model: type, rows: list[dict[str, Any]], key_cols: Sequence[str]) -> None:
    """Insert `rows`; a row whose `key_cols` match an existing row replaces it (with a new id and `row_seq`)."""
    if not rows:
        return
    if session.get_bind().dialect.name == "sqlite":
        # SQLite's REPLACE is delete + insert in one statement; with AUTOINCREMENT the new id is fresh.
        session.execute(insert(model).prefix_with("OR REPLACE"), rows)
        return
    # Elsewhere: delete the points about to be written, then insert, in the same transaction.
    *group_cols, last = key_cols
    groups: dict[tuple, list[Any]] = {}
    for row in rows:
        groups.setdefault(tuple(row[c] for c in group_cols), []).append(row[last])
    for group, values in groups.items():
        cond = [getattr(model, c) == v for c, v in zip(group_cols, group)]
        session.execute(delete(model).where(*cond, getattr(model, last).in_(values))
                        .execution_options(synchronize_session=False))
    session.execute(insert(model), rows)


def record(session: Session, job_id: int, *,
           metrics: Iterable[tuple[str, str, int, float | None, float]] = (),
           samples: Iterable[dict[str, Any]] = (),
           logs: Iterable[tuple[float, str, str | None, str]] = (),
           artifacts: Iterable[tuple[str | None, str, str, int | None]] = (),
           progress: tuple[str, float, float] | None = None, steps: StepProgress | None = None) -> None:
    """Write one batch of what a running job reported, in one transaction.

    metrics: (stage, key, step, value, time); samples: dicts with stage, kind, checkpoint, step, seq,
    prompt, response, reward, time; logs: (time, level, stage, message); artifacts: (stage, kind,
    path, size); progress: (stage, stage fraction, overall fraction), with `steps` the same stage's step
    counts when it reported them. The batch's metrics, samples and
    logs are numbered with one `next_row_seqs` call: one lock of the job row per batch, not per row.
    """
    metric_rows: dict[tuple[str, str, int], dict[str, Any]] = {}
    for stage, key, step, value, t in metrics:  # last write of a point wins within the batch too
        metric_rows[(stage, key, step)] = {"job_id": job_id, "stage": stage, "key": key, "step": step,
                                           "value": _finite(value), "time": t}
    sample_rows: dict[tuple, dict[str, Any]] = {}
    for s in samples:
        row = {"job_id": job_id, **s, "reward": _finite(s.get("reward")),
               "parts": {k: _finite(v) for k, v in s["parts"].items()} if s.get("parts") else None}
        sample_rows[(row["stage"], row["kind"], row["step"], row["seq"])] = row
    log_rows = [{"job_id": job_id, "time": t, "level": level, "stage": stage, "message": message}
                for t, level, stage, message in logs]

    # First, even with nothing to number: the job row is the first lock of every transaction that writes a job.
    first = next_row_seqs(session, job_id, len(metric_rows) + len(sample_rows) + len(log_rows))
    _replace_rows(session, Metric, _numbered(list(metric_rows.values()), first), ("job_id", "stage", "key", "step"))
    first += len(metric_rows)
    _replace_rows(session, Sample, _numbered(list(sample_rows.values()), first),
                  ("job_id", "stage", "kind", "step", "seq"))
    first += len(sample_rows)
    if log_rows:
        session.execute(insert(LogLine), _numbered(log_rows, first))

    artifact_rows = {(kind, path): {"job_id": job_id, "stage": stage, "kind": kind, "path": path, "size": size,
                                    "created_at": utcnow()}
                     for stage, kind, path, size in artifacts}
    if artifact_rows:
        for kind, path in artifact_rows:
            session.execute(delete(Artifact).where(Artifact.job_id == job_id, Artifact.kind == kind,
                                                   Artifact.path == path)
                            .execution_options(synchronize_session=False))
        session.execute(insert(Artifact), list(artifact_rows.values()))

    if progress is not None:
        stage, stage_fraction, overall = progress
        counts = {} if steps is None else {
            "done": steps.done, "total": steps.total, "first_done": steps.first_done,
            "first_progress_at": steps.first_at, "progress_at": steps.at}
        session.execute(update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
                        .values(progress=overall, stage=stage).execution_options(synchronize_session=False))
        session.execute(update(StageRun).where(StageRun.job_id == job_id, StageRun.stage == stage,
                                               StageRun.status == StageStatus.running)
                        .values(progress=stage_fraction, **counts).execution_options(synchronize_session=False))
    session.commit()


def add_log(session: Session, job_id: int, message: str, level: str = "info", stage: str | None = None) -> None:
    _add_logs(session, job_id, _log_row(job_id, message, level, stage))
    session.commit()


# --- final states ----------------------------------------------------------------------------------


def _close_stage_runs(session: Session, job_id: int, status: StageStatus) -> None:
    session.execute(update(StageRun).where(StageRun.job_id == job_id, StageRun.status == StageStatus.running)
                    .values(status=status, finished_at=utcnow()).execution_options(synchronize_session=False))


def _transition(session: Session, job_id: int, to: JobStatus, *, owner: str | None,
                message: str, level: str = "info", stage_status: StageStatus | None = None,
                **values: Any) -> bool:
    """Move a running job (of worker `owner`, when given) to `to`; False if it was not ours to move."""
    cond = [Job.id == job_id, Job.status == JobStatus.running]
    if owner is not None:
        cond.append(Job.worker_id == owner)
    result = session.execute(update(Job).where(*cond).values(status=to, **values)
                             .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        session.rollback()
        return False
    if stage_status is not None:
        _close_stage_runs(session, job_id, stage_status)
    _add_logs(session, job_id, _log_row(job_id, message, level))
    session.commit()
    return True


def finish(session: Session, job_id: int, worker_id: str | None = None) -> bool:
    """The job's every stage finished."""
    return _transition(session, job_id, JobStatus.succeeded, owner=worker_id, message="succeeded",
                       progress=1.0, finished_at=utcnow())


def fail(session: Session, job_id: int, error: str, traceback: str | None = None,
         worker_id: str | None = None) -> bool:
    """A stage raised (or the job process died): store the reason and the traceback."""
    return _transition(session, job_id, JobStatus.failed, owner=worker_id, message=f"failed: {error}",
                       level="error", stage_status=StageStatus.failed,
                       error=error[:10_000], traceback=traceback, finished_at=utcnow())


def mark_cancelled(session: Session, job_id: int, worker_id: str | None = None) -> bool:
    """The running job stopped after a cancel request."""
    return _transition(session, job_id, JobStatus.cancelled, owner=worker_id, message="cancelled",
                       stage_status=StageStatus.cancelled, finished_at=utcnow())


def release(session: Session, job_id: int, worker_id: str) -> bool:
    """Give a running job back to the queue (clean worker shutdown); the attempt does not count."""
    return _transition(session, job_id, JobStatus.queued, owner=worker_id,
                       message=f"worker {worker_id} stopped; job requeued", level="warning",
                       stage_status=StageStatus.interrupted,
                       worker_id=None, heartbeat_at=None, attempts=Job.attempts - 1)


def request_cancel(session: Session, job_id: int) -> Job:
    """Cancel a job: a queued one at once, a running one by flagging it (its worker stops it)."""
    for _ in range(10):
        job = _get(session, job_id)
        if job.status in FINISHED:
            session.rollback()
            raise JobStateError(f"job {job_id} already {job.status.value}")
        if job.status == JobStatus.queued:
            result = session.execute(
                update(Job).where(Job.id == job_id, Job.status == JobStatus.queued)
                .values(status=JobStatus.cancelled, cancel_requested=True, finished_at=utcnow())
                .execution_options(synchronize_session=False))
            message = "cancelled while queued"
        else:
            result = session.execute(
                update(Job).where(Job.id == job_id, Job.status == JobStatus.running)
                .values(cancel_requested=True).execution_options(synchronize_session=False))
            message = "cancel requested"
        if result.rowcount == 1:
            _add_logs(session, job_id, _log_row(job_id, message))
            session.commit()
            return _get(session, job_id)
        session.rollback()  # the status changed under us (claimed, finished); look again
    raise JobStateError(f"job {job_id} keeps changing state; try again")


def requeue_stalled(session: Session, stall_seconds: float, max_attempts: int) -> list[tuple[int, JobStatus]]:
    """Running jobs whose worker stopped heartbeating: requeue them (they resume), or fail them after
    `max_attempts`; a stalled job with a pending cancel ends cancelled. Returns (job id, new status)."""
    cutoff = utcnow() - timedelta(seconds=stall_seconds)
    stalled = session.execute(select(Job.id, Job.heartbeat_at, Job.attempts, Job.cancel_requested, Job.worker_id)
                              .where(Job.status == JobStatus.running,
                                     or_(Job.heartbeat_at < cutoff, Job.heartbeat_at.is_(None)))).all()
    session.rollback()
    done: list[tuple[int, JobStatus]] = []
    for job_id, beat, attempts, cancel, worker in stalled:
        # Only if the heartbeat is still the stale one we saw (the worker did not come back meanwhile).
        same_beat = Job.heartbeat_at == beat if beat is not None else Job.heartbeat_at.is_(None)
        cond = and_(Job.id == job_id, Job.status == JobStatus.running, same_beat)
        if cancel:
            to, values, stage_status = JobStatus.cancelled, {"finished_at": utcnow()}, StageStatus.cancelled
            message = f"worker {worker} stopped heartbeating; job was being cancelled: cancelled"
        elif attempts >= max_attempts:
            to, stage_status = JobStatus.failed, StageStatus.interrupted
            values = {"finished_at": utcnow(),
                      "error": f"worker stopped heartbeating {attempts} time(s); gave up after {max_attempts} attempts"}
            message = f"worker {worker} stopped heartbeating; failed after {attempts} attempts"
        else:
            to, values, stage_status = JobStatus.queued, {"worker_id": None, "heartbeat_at": None}, StageStatus.interrupted
            message = f"worker {worker} stopped heartbeating; requeued (attempt {attempts} of {max_attempts})"
        result = session.execute(update(Job).where(cond).values(status=to, **values)
                                 .execution_options(synchronize_session=False))
        if result.rowcount != 1:
            session.rollback()
            continue
        _close_stage_runs(session, job_id, stage_status)
        _add_logs(session, job_id, _log_row(job_id, message, "warning"))
        session.commit()
        logger.warning(message, extra={"job_id": job_id})
        done.append((job_id, to))
    return done


def retry(session: Session, job_id: int) -> Job:
    """Requeue a failed or cancelled job; it resumes after its last completed stage."""
    job = _get(session, job_id)
    if job.status not in (JobStatus.failed, JobStatus.cancelled):
        session.rollback()
        raise JobStateError(f"only failed or cancelled jobs can be retried; job {job_id} is {job.status.value}")
    result = session.execute(
        update(Job).where(Job.id == job_id, Job.status.in_([JobStatus.failed, JobStatus.cancelled]))
        .values(status=JobStatus.queued, attempts=0, error=None, traceback=None, cancel_requested=False,
                worker_id=None, heartbeat_at=None, started_at=None, finished_at=None)
        .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        session.rollback()
        raise JobStateError(f"job {job_id} changed state; try again")
    _add_logs(session, job_id, _log_row(job_id, "retry requested; requeued"))
    session.commit()
    return _get(session, job_id)


def waiting_rounds(session: Session, job_id: int) -> list[int]:
    """The queued or running jobs that continue job `job_id` and still need its run directory: their SFT stage, which
    writes the parent's aligned policy into their own, has not succeeded."""
    children = session.scalars(select(Job.id).where(Job.parent_id == job_id, Job.status.not_in(FINISHED))
                               .order_by(Job.id)).all()
    copied = set(session.scalars(select(StageRun.job_id).where(StageRun.job_id.in_(children), StageRun.stage == "sft",
                                                               StageRun.status == StageStatus.succeeded)).all())
    return [i for i in children if i not in copied]


def delete_job(session: Session, job_id: int) -> Job:
    """Delete a finished job and everything recorded about it (the caller removes its run directory)."""
    job = _get(session, job_id)
    if job.status not in FINISHED:
        session.rollback()
        raise JobStateError(f"job {job_id} is {job.status.value}; only finished jobs can be deleted "
                            f"(cancel it first)")
    waiting = waiting_rounds(session, job_id)
    if waiting:
        session.rollback()
        raise JobStateError(f"job {job_id} is continued by job(s) {', '.join(f'#{i}' for i in waiting)}, which start "
                            "from its aligned policy and have not copied it yet: delete it once their SFT stage has "
                            "finished (or cancel them)")
    # The job row first, as every writer of a job's rows locks it (`next_row_seqs`): a late batch of a job
    # process that outlived its job commits before the delete, or waits and finds no job.
    session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
    for model in (Metric, Sample, LogLine, Artifact, StageRun):
        session.execute(delete(model).where(model.job_id == job_id).execution_options(synchronize_session=False))
    result = session.execute(delete(Job).where(Job.id == job_id, Job.status.in_(FINISHED))
                             .execution_options(synchronize_session=False))
    if result.rowcount != 1:
        session.rollback()
        raise JobStateError(f"job {job_id} changed state; try again")
    session.commit()
    session.expunge(job)
    return job


def worker_stopped(session: Session, worker_id: str) -> None:
    session.execute(update(Worker).where(Worker.id == worker_id)
                    .values(state="stopped", job_id=None, child_pid=None, heartbeat_at=utcnow())
                    .execution_options(synchronize_session=False))
    session.commit()


def touch(session: Session) -> datetime:
    """A trivial round trip (health checks)."""
    session.execute(select(1))
    session.rollback()
    return utcnow()
