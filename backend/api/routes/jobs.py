"""Jobs: create (validated), list, read, cancel, retry, delete. The backend only enqueues and reads.

A job lives in the database and the worker, never in a browser session: closing a tab changes nothing,
and any client can re-attach to a running job by its id. A job may ask for a minimum GPU memory; only a
worker whose GPU has it claims the job, and while no live worker has it, `waiting_for` says so. A job the
memory planner says cannot fit the GPU it would get is refused unless the person overrides the plan
(`backend.api.routes.plan`). A job may name uploaded or registered data sets by id per config section
(`datasets`): they become the sections' sources before the config is checked (`backend.datasets`).
"""

from __future__ import annotations

import logging
import shutil
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from backend import datasets
from backend.api.deps import JobDep, RowOffset, SessionDep, SettingsDep
from backend.api.routes import export
from backend.api.routes.plan import gpu_to_check, planned, refusal, served_judges
from backend.api.errors import SafeJSONResponse
from backend.api.schemas import JobCreate, JobPublic, JobsPublic, JobSummary
from backend.api.validation import JobInvalid, validate_job
from db import JobNotFound, JobStateError, JobStatus, queue, read
from db.models import Job, Worker
from edgerlhf.contract import job_run_dir
from edgerlhf.settings import get_settings

logger = logging.getLogger("edgerlhf.backend")

router = APIRouter(prefix="/jobs", tags=["jobs"])

EXPORT_WAIT_S = 5.0
"""How long a delete waits for the job's export lock (a download holds it only while it opens its files)."""


def waiting_for(job: Job, live: list[Worker]) -> str | None:
    """Why a queued job with a minimum GPU memory waits, when no live worker (busy or idle) could ever take it."""
    need = job.min_gpu_memory_mb
    if job.status != JobStatus.queued or need is None:
        return None
    if any(w.gpu_memory_mb is not None and w.gpu_memory_mb >= need for w in live):
        return None
    known = [w.gpu_memory_mb for w in live if w.gpu_memory_mb is not None]
    why = ("no worker is alive" if not live else f"the largest GPU of a live worker has {max(known):,} MB" if known
           else "no live worker's GPU memory is known")
    return f"waiting for a worker with ≥ {need:,} MB of GPU memory ({why})"


def job_public(session, job: Job, alive_seconds: float | None = None, schema: type[JobSummary] = JobPublic):
    """The job as `schema` (`JobPublic`, with its config, or `JobSummary`); `alive_seconds`: the app's
    `Settings.worker_alive_seconds` (default: the environment's settings')."""
    position = read.queue_positions(session).get(job.id) if job.status == JobStatus.queued else None
    live = []
    if job.status == JobStatus.queued and job.min_gpu_memory_mb is not None:
        live = read.alive_workers(session, alive_seconds or get_settings().worker_alive_seconds)
    return schema.of(job, read.stage_runs(session, job.id), position, waiting_for(job, live))


def _conflict(exc: Exception) -> HTTPException:
    return HTTPException(status.HTTP_409_CONFLICT, str(exc))


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobPublic,
             responses={422: {"description": "A field of the body or of the resulting config is invalid"},
                        409: {"description": "The memory plan says a stage does not fit the GPU the job is "
                                             "checked against (`override_memory_plan` queues it anyway)"},
                        413: {"description": "Body too large"}})
def create_job(body: JobCreate, session: SessionDep, settings: SettingsDep):
    """Queue a job: `preset` plus `overrides`, and the data sets it reads (`datasets`, by id). A bad field gets 422
    naming it; a job the memory planner says cannot fit its GPU gets 409 with the plan and the cheapest change that
    fits (see `POST /api/plan`), unless `override_memory_plan`. Nothing is stored then."""
    refs = body.datasets.chosen() if body.datasets else {}
    try:
        overrides = datasets.job_overrides(session, settings, refs, body.overrides) if refs else body.overrides
        config = validate_job(body.preset, overrides, [*settings.allowed_roots, settings.data_dir],
                              settings.allowed_judge_urls)
    except JobInvalid as exc:
        return SafeJSONResponse(status_code=422, content={"detail": exc.errors})
    if not body.override_memory_plan:
        gpu, source = gpu_to_check(session, body.min_gpu_memory_mb)
        try:
            result = planned(config, gpu, source, served=served_judges(session, settings, config))
        except ValueError as exc:  # what cannot be planned is not refused
            logger.warning(f"no memory plan for a {body.preset} job: {exc}")
        else:
            why = refusal(result)
            if why:
                return SafeJSONResponse(status_code=409, content={"detail": {
                    "field": "override_memory_plan", "message": why, "plan": result.model_dump(mode="json")}})
    try:
        with datasets.reading(session, settings, refs):  # no delete of its data sets until the job is queued
            job = queue.create_job(session, name=body.name or body.preset, preset=body.preset,
                                   config=config.to_dict(), min_gpu_memory_mb=body.min_gpu_memory_mb)
    except JobInvalid as exc:
        return SafeJSONResponse(status_code=422, content={"detail": exc.errors})
    except datasets.DatasetRefused as exc:  # the store's lock not had in time
        raise HTTPException(exc.status, exc.message) from None
    logger.info(f"job {job.id} queued ({body.preset})", extra={"job_id": job.id})
    return job_public(session, job, settings.worker_alive_seconds)


@router.get("", response_model=JobsPublic)
def list_jobs(session: SessionDep, settings: SettingsDep,
              status_: Annotated[list[JobStatus] | None, Query(alias="status", description="Repeat to allow several")] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: RowOffset = 0):
    """Jobs, newest first, optionally filtered by status; without their configs (`GET /api/jobs/{id}` has it)."""
    jobs, total = read.list_jobs(session, status_ or (), limit, offset)
    positions = read.queue_positions(session)
    live = read.alive_workers(session, settings.worker_alive_seconds)
    items = [JobSummary.of(j, read.stage_runs(session, j.id), positions.get(j.id), waiting_for(j, live)) for j in jobs]
    return JobsPublic(items=items, total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobPublic, responses={404: {"description": "No such job"}})
def get_job(job: JobDep, session: SessionDep, settings: SettingsDep):
    return job_public(session, job, settings.worker_alive_seconds)


@router.post("/{job_id}/cancel", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED,
             responses={404: {"description": "No such job"}, 409: {"description": "Job already finished"}})
def cancel_job(job: JobDep, session: SessionDep, settings: SettingsDep):
    """A queued job is cancelled at once; a running one stops within seconds (its worker checks between steps)."""
    try:
        job = queue.request_cancel(session, job.id)
    except JobStateError as exc:
        raise _conflict(exc) from None
    return job_public(session, job, settings.worker_alive_seconds)


@router.post("/{job_id}/retry", response_model=JobPublic,
             responses={404: {"description": "No such job"}, 409: {"description": "Job is not failed or cancelled"}})
def retry_job(job: JobDep, session: SessionDep, settings: SettingsDep):
    """Requeue a failed or cancelled job; it resumes after its last completed stage."""
    try:
        job = queue.retry(session, job.id)
    except JobStateError as exc:
        raise _conflict(exc) from None
    return job_public(session, job, settings.worker_alive_seconds)


@router.delete("/{job_id}", status_code=status.HTTP_204_NO_CONTENT,
               responses={404: {"description": "No such job"}, 409: {"description": "Job is queued or running"}})
def delete_job(job: JobDep, session: SessionDep, settings: SettingsDep, request: Request):
    """Delete a finished job, its records and its run directory (models, reports)."""
    lock = export.job_lock(job.id)
    if not lock.acquire(timeout=EXPORT_WAIT_S):  # an export writing into the run directory: not under its feet
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is being exported; delete it once the export "
                                                      "is done")
    try:
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
    finally:
        lock.release()
    for hook in request.app.state.job_deleted_hooks:  # e.g. unload the job's chat models
        try:
            hook(job.id)
        except Exception:
            logger.exception(f"job-deleted hook {hook!r} failed", extra={"job_id": job.id})
    logger.info(f"job {job.id} deleted", extra={"job_id": job.id})
    return Response(status_code=status.HTTP_204_NO_CONTENT)
