"""Dependencies shared by the routers: the database session, the settings, a job by id.

`Annotated` aliases (`SessionDep`, `SettingsDep`) as in fastapi/full-stack-fastapi-template's `deps.py`.
The app built by `backend.main.create_app` keeps its settings and session factory on `app.state`, so
tests can build apps on different databases side by side. Integers from a URL meet the 64-bit range of
ids and cursors (SQLite's INTEGER, PostgreSQL's BIGINT: `db.models.ID64`) in one of two places: a path id
in `db.read.get_job` (beyond the range: no such job, 404), a query offset or cursor in the `RowOffset` type
(beyond the range: 422).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from annotated_types import Ge, Le
from fastapi import Depends, HTTPException, Request, status
from sqlalchemy.orm import Session

from db import INT64_MAX, read
from db.models import Job
from edgerlhf.settings import Settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.sessions() as session:
        yield session


def get_app_settings(request: Request) -> Settings:
    return request.app.state.settings


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_app_settings)]

RowOffset = Annotated[int, Ge(0), Le(INT64_MAX)]
"""A query's offset or row cursor: 422 beyond 64 bits (what SQLite can bind, PostgreSQL's BIGINT). Use as
`Annotated[RowOffset, Query(...)]`."""


def get_job_or_404(job_id: int, session: SessionDep) -> Job:
    job = read.get_job(session, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} not found")
    return job


JobDep = Annotated[Job, Depends(get_job_or_404)]
