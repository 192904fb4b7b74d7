"""What a job produced: metrics, samples, logs (cursor pages), artifacts, stage reports, and a live SSE stream.

Cursor pages: `?after=<cursor>` returns the job's rows written after the row with that cursor, at most
`limit`; `cursor` in the answer (and on each row) is what to pass next. A cursor is the row's number in its
job's stream (`row_seq`), not its global id: numbers follow commit order within a job, so a reader
never misses or repeats a row while the worker, the job process and the backend write at once, on SQLite
and PostgreSQL (`db.read` says why ids could not). A resumed stage rewrites its points with new numbers,
so a reader following the cursor gets the new values (a point is unique per stage, key and step: keep the
last value seen).

`GET /api/jobs/{id}/events` is a server-sent-event stream (`text/event-stream`) of the same rows as they
are written plus status changes: events `metric`, `sample`, `log`, `status` (a `JobSummary`: the job without its
config) and a final `end`. Each
event's id is `<metric cursor>.<sample cursor>.<log cursor>`; a reconnecting `EventSource` sends it back
as `Last-Event-ID` and the stream resumes there (or pass `after`, `after_sample`, `after_log`).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, status
from fastapi.sse import EventSourceResponse, ServerSentEvent
from pydantic import ValidationError

from backend.api.deps import JobDep, RowOffset, SessionDep, SettingsDep
from backend.api.routes.jobs import job_public
from backend.api.schemas import (
    ArtifactPublic,
    JobSummary,
    LogPublic,
    LogsPage,
    MetricPublic,
    MetricsPage,
    SamplePublic,
    SamplesPage,
)
from db import FINISHED, INT64_MAX, read
from edgerlhf.contract import REPORT_FILE, job_run_dir
from edgerlhf.reports import STAGE_REPORTS, JobReports

logger = logging.getLogger("edgerlhf.backend")

router = APIRouter(prefix="/jobs", tags=["metrics"])

POLL_SECONDS = 0.5
"""How often the event stream looks for new rows: a point reaches the browser within about a second."""
STREAM_PAGE = 2_000
"""Rows per kind per poll of the event stream."""

AfterQ = Annotated[RowOffset, Query(description="Return the job's rows after this cursor (a page's `cursor`)")]


def _keys(keys: list[str] | None) -> list[str]:
    """`keys=a,b` and `keys=a&keys=b` both work."""
    return [k.strip() for part in keys or [] for k in part.split(",") if k.strip()]


@router.get("/{job_id}/metrics", response_model=MetricsPage)
def metrics(job: JobDep, session: SessionDep, after: AfterQ = 0,
            keys: Annotated[list[str] | None, Query(description="Metric keys, comma separated or repeated")] = None,
            stage: str | None = None, limit: Annotated[int, Query(ge=1, le=50_000)] = 10_000):
    rows = read.metrics_after(session, job.id, after, _keys(keys), stage, limit)
    return MetricsPage(items=[MetricPublic.of(m) for m in rows], cursor=rows[-1].row_seq if rows else after,
                       more=len(rows) == limit)


@router.get("/{job_id}/samples", response_model=SamplesPage)
def samples(job: JobDep, session: SessionDep, after: AfterQ = 0, stage: str | None = None,
            kind: Annotated[str | None, Query(description="sample, probe or eval")] = None,
            limit: Annotated[int, Query(ge=1, le=5_000)] = 500):
    rows = read.samples_after(session, job.id, after, stage, kind, limit)
    return SamplesPage(items=[SamplePublic.of(s) for s in rows], cursor=rows[-1].row_seq if rows else after,
                       more=len(rows) == limit)


@router.get("/{job_id}/logs", response_model=LogsPage)
def logs(job: JobDep, session: SessionDep, after: AfterQ = 0, limit: Annotated[int, Query(ge=1, le=10_000)] = 1_000):
    rows = read.logs_after(session, job.id, after, limit)
    return LogsPage(items=[LogPublic.of(line) for line in rows], cursor=rows[-1].row_seq if rows else after,
                    more=len(rows) == limit)


@router.get("/{job_id}/artifacts", response_model=list[ArtifactPublic])
def artifacts(job: JobDep, session: SessionDep, settings: SettingsDep):
    run_dir = str(job_run_dir(settings.runs_dir, job.id).absolute())
    return [ArtifactPublic.of(a, run_dir) for a in read.artifacts(session, job.id)]


@router.get("/{job_id}/report", response_model=JobReports)
def report(job: JobDep, session: SessionDep, settings: SettingsDep):
    """The report of each finished stage (`edgerlhf.reports`); null for the others.

    A report that does not match its model (written by an older version of a stage) is left out and
    logged, so one stale file does not take the whole page down.
    """
    reports: dict[str, Any] = {}
    runs = {r.stage: r for r in read.stage_runs(session, job.id)}
    run_dir = job_run_dir(settings.runs_dir, job.id)
    for stage in job.config.get("stages", []):
        run = runs.get(stage)
        stored = run.report if run is not None else None
        if stored is None and (run_dir / stage / REPORT_FILE).is_file():  # written, but its stage end was not recorded
            try:
                stored = json.loads((run_dir / stage / REPORT_FILE).read_text())
            except (OSError, ValueError):
                continue
        if stored is None or stage not in STAGE_REPORTS:
            continue
        try:
            reports[stage] = STAGE_REPORTS[stage].model_validate(stored)
        except ValidationError as exc:
            logger.warning(f"job {job.id}: the {stage} report does not match its model; left out: {exc}")
    return JobReports(**reports)


# --- live stream -----------------------------------------------------------------------------------


@dataclass
class _Cursors:
    metric: int = 0
    sample: int = 0
    log: int = 0

    def event_id(self) -> str:
        return f"{self.metric}.{self.sample}.{self.log}"

    @classmethod
    def parse(cls, value: str) -> _Cursors | None:
        try:
            parts = [int(p) for p in value.split(".")]
        except ValueError:
            return None
        if len(parts) != 3 or min(parts) < 0 or max(parts) > INT64_MAX:  # as RowOffset bounds `after`
            return None
        return cls(*parts)


@dataclass
class _Batch:
    status: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False
    gone: bool = False


def _poll(sessions, job_id: int, cursors: _Cursors) -> _Batch:
    with sessions() as session:
        job = read.get_job(session, job_id)
        if job is None:
            return _Batch(gone=True)
        summary = job_public(session, job, schema=JobSummary).model_dump(mode="json")  # no config: events stay light
        batch = _Batch(status=summary, finished=job.status in FINISHED)
        batch.metrics = [MetricPublic.of(m).model_dump() for m in
                         read.metrics_after(session, job_id, cursors.metric, limit=STREAM_PAGE)]
        batch.samples = [SamplePublic.of(s).model_dump() for s in
                         read.samples_after(session, job_id, cursors.sample, limit=STREAM_PAGE)]
        batch.logs = [LogPublic.of(line).model_dump() for line in
                      read.logs_after(session, job_id, cursors.log, limit=STREAM_PAGE)]
        return batch


def existing_job_id(job_id: int, request: Request) -> int:
    # A short-lived session: the stream must not hold a pooled connection for its whole life.
    with request.app.state.sessions() as session:
        if read.get_job(session, job_id) is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job_id


def _status_key(status: dict[str, Any]) -> tuple:
    return (status["status"], status["stage"], round(status["progress"], 4), status["cancel_requested"],
            status["attempts"], status["queue_position"], tuple((s["stage"], s["status"]) for s in status["stages"]))


@router.get("/{job_id}/events", response_class=EventSourceResponse,
            responses={200: {"description": "Events `status`, `metric`, `sample`, `log`, `end`"}})
async def events(job_id: Annotated[int, Depends(existing_job_id)], request: Request,
                 after: AfterQ = 0, after_sample: AfterQ = 0, after_log: AfterQ = 0,
                 last_event_id: Annotated[str | None, Header()] = None):
    """Server-sent events of a job: new metrics, samples, log lines and status changes as they are written."""
    cursors = _Cursors(after, after_sample, after_log)
    if last_event_id and (resumed := _Cursors.parse(last_event_id)) is not None:
        cursors = resumed
    sessions = request.app.state.sessions
    last_status: tuple | None = None
    yield ServerSentEvent(comment="edgerlhf job events", retry=2000)
    while True:
        batch = await anyio.to_thread.run_sync(_poll, sessions, job_id, cursors)
        if batch.gone:
            yield ServerSentEvent(event="end", data={"job_id": job_id, "status": "deleted"}, id=cursors.event_id())
            return
        for row in batch.metrics:
            cursors.metric = row["cursor"]
            yield ServerSentEvent(event="metric", data=row, id=cursors.event_id())
        for row in batch.samples:
            cursors.sample = row["cursor"]
            yield ServerSentEvent(event="sample", data=row, id=cursors.event_id())
        for row in batch.logs:
            cursors.log = row["cursor"]
            yield ServerSentEvent(event="log", data=row, id=cursors.event_id())
        key = _status_key(batch.status)
        if key != last_status:
            last_status = key
            yield ServerSentEvent(event="status", data=batch.status, id=cursors.event_id())
        more = any(len(rows) == STREAM_PAGE for rows in (batch.metrics, batch.samples, batch.logs))
        if batch.finished and not more:
            yield ServerSentEvent(event="end", data={"job_id": job_id, "status": batch.status["status"]},
                                  id=cursors.event_id())
            return
        if not more:
            await anyio.sleep(POLL_SECONDS)

