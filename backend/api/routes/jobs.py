"""Jobs: create (validated), list, read, cancel, retry, delete. The backend only enqueues and reads.

A job lives in the database and the worker, never in a browser session: closing a tab changes nothing,
and any client can re-attach to a running job by its id. A job may ask for a minimum GPU memory; only a
worker whose GPU has it claims the job, and while no live worker has it, `waiting_for` says so. A job the
memory planner says cannot fit the GPU it would get is refused unless the person overrides the plan
(`backend.api.routes.plan`). A job may name uploaded or registered data sets by id per config section
(`datasets`): they become the sections' sources before the config is checked (`backend.datasets`).

**The next round** (`POST /api/jobs/{id}/continue`): a finished job with an aligned policy is continued by a new job
of the same config whose `round` section names the parent's run directory (`edgerlhf.config.RoundConfig`: its SFT
policy is the parent's aligned policy, merged), whose data are what the body asks (the arena votes about the
parent's model, the chat feedback about it, a data set, or the parent's own), and which aligns again. The database
keeps the parent and the round (`Job.parent_id`, `Job.round`); `GET /api/jobs/{id}/rounds` gives the chain. A job
that a queued or running round still has to copy cannot be deleted (`db.queue.waiting_rounds`).
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status

from backend import chat_models, datasets
from backend.api.deps import JobDep, RowOffset, SessionDep, SettingsDep
from backend.api.routes import arena, export, feedback
from backend.api.routes.plan import gpu_to_check, planned, refusal, served_judges
from backend.api.errors import SafeJSONResponse
from backend.api.schemas import ContinueCreate, JobCreate, JobPublic, JobsPublic, JobSummary, RoundsPublic
from backend.api.validation import JobInvalid, validate_job
from db import FINISHED, JobNotFound, JobStateError, JobStatus, queue, read
from db.models import Job, Worker
from edgerlhf.config import next_round
from edgerlhf.contract import algorithm_traits, job_run_dir, merge_overrides
from edgerlhf.settings import Settings, get_settings

logger = logging.getLogger("edgerlhf.backend")

router = APIRouter(prefix="/jobs", tags=["jobs"])

JOB_DIR = re.compile(r"job-(\d{1,18})")
"""A job's run directory's name (`contract.job_run_dir`)."""
ROUND_SUFFIX = re.compile(r" · round \d+$")
"""The end of a round's default name (`… · round 2`), replaced by the next round's."""
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
    return _queue(session, settings, name=body.name or body.preset, preset=body.preset, overrides=body.overrides,
                  refs=refs, min_gpu_memory_mb=body.min_gpu_memory_mb, override_memory_plan=body.override_memory_plan)


def _queue(session, settings: Settings, *, name: str, preset: str, overrides: dict[str, Any], refs: dict[str, int],
           min_gpu_memory_mb: int | None, override_memory_plan: bool, base: dict[str, Any] | None = None,
           parent: Job | None = None):
    """Check and queue a job of `preset` with `overrides` (over the config `base` when given: a parent's, for the next
    round) and the data sets `refs`; the `JobPublic`, or the 422 or 409 response that refuses it."""
    try:
        if refs:
            overrides = datasets.job_overrides(session, settings, refs, overrides)
        config = validate_job(preset, merge_overrides(base, overrides) if base is not None else overrides,
                              [*settings.allowed_roots, settings.data_dir], settings.allowed_judge_urls)
    except JobInvalid as exc:
        return SafeJSONResponse(status_code=422, content={"detail": exc.errors})
    if parent is None and config.round.parent_run is not None:  # a cloned round: the job whose run it continues
        parent = parent_job(session, settings, config.round.parent_run)
    if not override_memory_plan:
        gpu, source = gpu_to_check(session, min_gpu_memory_mb)
        try:
            result = planned(config, gpu, source, served=served_judges(session, settings, config))
        except ValueError as exc:  # what cannot be planned is not refused
            logger.warning(f"no memory plan for a {preset} job: {exc}")
        else:
            why = refusal(result)
            if why:
                return SafeJSONResponse(status_code=409, content={"detail": {
                    "field": "override_memory_plan", "message": why, "plan": result.model_dump(mode="json")}})
    try:
        with datasets.reading(session, settings, refs):  # no delete of its data sets until the job is queued
            job = queue.create_job(session, name=name, preset=preset, config=config.to_dict(),
                                   min_gpu_memory_mb=min_gpu_memory_mb, parent_id=parent.id if parent else None,
                                   round=config.round.number)
    except JobInvalid as exc:
        return SafeJSONResponse(status_code=422, content={"detail": exc.errors})
    except datasets.DatasetRefused as exc:  # the store's lock not had in time
        raise HTTPException(exc.status, exc.message) from None
    continues = f", round {job.round} continuing job {parent.id}" if parent is not None else ""
    logger.info(f"job {job.id} queued ({preset}{continues})", extra={"job_id": job.id})
    return job_public(session, job, settings.worker_alive_seconds)


def parent_job(session, settings: Settings, parent_run: str) -> Job | None:
    """The job whose run directory `parent_run` is (`<runs dir>/job-N`), if it is one of this service's jobs."""
    path = Path(parent_run)
    match = JOB_DIR.fullmatch(path.name)
    if match is None or path.parent.resolve() != settings.runs_dir.resolve():
        return None
    return read.get_job(session, int(match.group(1)))


def _invalid(field: str, message: str) -> SafeJSONResponse:
    return SafeJSONResponse(status_code=422, content={"detail": [{"loc": ["body", field], "type": "value_error",
                                                                  "msg": message}]})


@router.post("/{job_id}/continue", status_code=status.HTTP_201_CREATED, response_model=JobPublic,
             responses={404: {"description": "No such job"},
                        409: {"description": "The job has not finished, has no aligned policy, or there is no vote or "
                                             "feedback about its model yet; or the memory plan refuses the round"},
                        422: {"description": "A field of the body or of the resulting config is invalid"}})
def continue_job(job: JobDep, body: ContinueCreate, request: Request, session: SessionDep, settings: SettingsDep):
    """The next round of RLHF from a finished job: a new job whose SFT policy is this job's aligned policy (merged, as
    an export merges it; SFT trains only on `sft_dataset`'s demonstrations), whose reward model trains on
    `reward_data` (the arena votes or chat feedback about `job-N/ppo`, a data set, or the parent's data again;
    votes optionally mixed with the parent's data), and which aligns again (`algorithm`, `overrides`). It is checked
    and planned as a new job; its `parent_id` is this job and its `round` this job's + 1."""
    if job.status not in FINISHED:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} is {job.status.value}: a round continues the "
                                                      "aligned policy of a finished job; wait until it has finished")
    run_dir = job_run_dir(settings.runs_dir, job.id)
    if "ppo" not in chat_models.available_kinds(run_dir):
        raise HTTPException(status.HTTP_409_CONFLICT, f"job {job.id} has no aligned policy (its alignment stage did "
                                                      "not finish): there is nothing to continue from")
    if body.reward_data == "dataset" and body.dataset is None:
        return _invalid("dataset", "reward_data=dataset needs the id of the data set to read")
    if body.reward_data != "dataset" and body.dataset is not None:
        return _invalid("dataset", f"a data set is read with reward_data=dataset, not {body.reward_data}")
    if body.reward_data != "votes" and body.votes_weight != 1:
        return _invalid("votes_weight", "mixes arena votes with the parent's data: only with reward_data=votes")
    if "round" in body.overrides:
        return _invalid("overrides", "the round (round.parent_run, round.number) is the continuation's own")
    algorithm = body.algorithm or job.config.get("algorithm", "ppo")
    aligned = chat_models.model_id(job.id, "ppo")
    changes: dict[str, Any] = {"algorithm": algorithm}
    refs: dict[str, int] = {}
    if body.reward_data == "votes":
        snapshot = arena.write_snapshot(request, settings, models={aligned})  # 409 without a pair about it
        changes["data"] = {"votes_file": snapshot.path, "votes_weight": body.votes_weight}
    elif body.reward_data == "feedback":
        kind = "preference" if algorithm_traits(algorithm).section != "kto" else "unpaired"
        try:
            dataset, _, _ = feedback.make_snapshot(session, settings, kind, model=aligned)
        except feedback.NoFeedback as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, f"{exc}: give it in Chat (a better answer"
                                                          f"{'' if kind == 'preference' else ' or a thumb'}) first")
        except datasets.DatasetRefused as exc:
            raise HTTPException(exc.status, exc.message) from None
        refs["data"] = dataset.id
    elif body.reward_data == "dataset":
        refs["data"] = body.dataset
    if "data" in refs:  # the person's data, not the parent's votes; a gold relabels it only when asked
        changes["data"] = {"votes_file": None, "labels": "human"}
    if body.sft_dataset is not None:
        refs["sft_data"] = body.sft_dataset
    base = {k: v for k, v in job.config.items() if k != "preset"}
    base["round"] = next_round(run_dir, job.config)
    name = body.name or f"{ROUND_SUFFIX.sub('', job.name)[:180]} · round {base['round']['number']}"
    return _queue(session, settings, name=name, preset=job.preset, overrides=merge_overrides(changes, body.overrides),
                  refs=refs, min_gpu_memory_mb=job.min_gpu_memory_mb, override_memory_plan=body.override_memory_plan,
                  base=base, parent=job)


@router.get("/{job_id}/rounds", response_model=RoundsPublic, responses={404: {"description": "No such job"}})
def job_rounds(job: JobDep, session: SessionDep, settings: SettingsDep):
    """The chain of rounds the job belongs to: the jobs it continues, back to round 1, itself, and every job
    continued from it (and from those), by round then id; one item for a job nobody continued."""
    live = read.alive_workers(session, settings.worker_alive_seconds)
    positions = read.queue_positions(session)
    return RoundsPublic(items=[JobSummary.of(j, read.stage_runs(session, j.id), positions.get(j.id),
                                             waiting_for(j, live)) for j in read.rounds(session, job.id)])


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
