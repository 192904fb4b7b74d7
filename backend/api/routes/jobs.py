"""Jobs: create (validated), list, read, cancel, retry, delete. The backend only enqueues and reads.

A job lives in the database and the worker, never in a browser session: closing a tab changes nothing,
and any client can re-attach to a running job by its id.
"""

from __future__ import annotations

import logging
import shutil
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from fastapi.responses import JSONResponse

from backend.api.deps import JobDep, RowOffset, SessionDep, SettingsDep
from backend.api.schemas import JobCreate, JobPublic, JobsPublic
from backend.api.validation import JobInvalid, validate_job
from db import JobNotFound, JobStateError, JobStatus, queue, read
from db.models import Job
from edgerlhf.contract import job_run_dir

logger = logging.getLogger("edgerlhf.backend")

router = APIRouter(prefix="/jobs", tags=["jobs"])


def job_public(session, job: Job) -> JobPublic:
    position = read.queue_positions(session).get(job.id) if job.status == JobStatus.queued else None
    return JobPublic.of(job, read.stage_runs(session, job.id), position)


def _conflict(exc: Exception) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, str(exc))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic,
             responses={422: {"description": "A field of the body or of the resulting config is invalid"},
                        413: {"description": "Body too large"}})
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep):
    """Queue a job: `preset` plus `overrides`. A bad field gets 422 naming it; nothing is stored then."""
    try:
        config = validate_job(body.preset, body.overrides, [*settings.allowed_roots, settings.data_dir])
    except JobInvalid as exc:
        return JSONResponse(status_code=422, content={"detail": exc.errors})
    job = queue.create_job(session, name=body.name or body.preset, preset=body.preset, config=config.to_dict())
    logger.info(f"job {job.id} queued ({body.preset})", extra={"job_id": job.id})
    return job_public(session, job)


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep,
              status_: Annotated[list[JobStatus] | None, Query(alias="status", description="Repeat to allow several")] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: RowOffset = 0):
    """Jobs, newest first, optionally filtered by status."""
    jobs, total = read.list_jobs(session, status_ or (), limit, offset)
    positions = read.queue_positions(session)
    items = [JobPublic.of(j, read.stage_runs(session, j.id), positions.get(j.id)) for j in jobs]
    return JobsPublic(items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses={404: {"description": "No such job"}})
def get_job(job: JobDep, session: SessionDep):
    return job_public(session, job)


@router.post("/{job_id}/cancel", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED,
             responses={404: {"description": "No such job"}, 409: {"description": "Job already finished"}})
def cancel_job(job: JobDep, session: SessionDep):
    """A queued job is cancelled at once; a running one stops within seconds (its worker checks between steps)."""
    try:
        job = queue.request_cancel(session, job.id)
    except JobStateError as exc:
        raise _conflict(exc) from None
    return job_public(session, job)


@router.post("/{job_id}/retry", response_model=JobPublic,
             responses={404: {"description": "No such job"}, 409: {"description": "Job is not failed or cancelled"}})
def retry_job(job: JobDep, session: SessionDep):
    """Requeue a failed or cancelled job; it resumes after its last completed stage."""
    try:
        job = queue.retry(session, job.id)
    except JobStateError as exc:
        raise _conflict(exc) from None
    return job_public(session, job)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "No such job"}, 409: {"description": "Job is queued or running"}})
def delete_job(job: JobDep, session: SessionDep, settings: SettingsDep, request: Request):
    """Delete a finished job, its records and its run directory (models, reports)."""
    try:
        queue.delete_job(session, job.id)
    except JobNotFound:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job.id} not found") from None
    except JobStateError as exc:
        raise _conflict(exc) from None
    runs = settings.runs_dir.resolve()
    run_dir = job_run_dir(runs, job.id).resolve()
    if run_dir.parent == runs and run_dir.exists():
        shutil.rmtree(run_dir, ignore_errors=True)
    for hook in request.app.state.job_deleted_hooks:  # e.g. unload the job's chat models
        try:
            hook(job.id)
        except Exception:
            logger.exception(f"job-deleted hook {hook!r} failed", extra={"job_id": job.id})
    logger.info(f"job {job.id} deleted", extra={"job_id": job.id})
    return Response(status_code=status.HTTP_204_NO_CONTENT)
