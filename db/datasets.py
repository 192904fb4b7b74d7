"""Data sets: store, list, read, delete their rows, and find the jobs that may still read one (the backend's
data set routes call these; nobody else writes SQL).

A data set is one row of `datasets` (`db.models.Dataset`); where its file lives and what it means to a job is
`backend.datasets`.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from db.models import INT64_MAX, Dataset, Job, JobStatus

ACTIVE = (JobStatus.queued, JobStatus.running)
"""The statuses of a job that will still read its data sets: a data set they read cannot be deleted."""


def add_dataset(session: Session, **fields: Any) -> Dataset:
    """Insert a data set row (the fields of `db.models.Dataset`) and commit. An upload whose `sha256` is stored
    already raises SQLAlchemy's `IntegrityError` (the caller returns the stored one)."""
    dataset = Dataset(**fields)
    session.add(dataset)
    session.commit()
    return dataset


def list_datasets(session: Session) -> list[Dataset]:
    """Every data set, newest first (a service holds tens, not thousands)."""
    return list(session.scalars(select(Dataset).order_by(Dataset.id.desc())))


def get_dataset(session: Session, dataset_id: int) -> Dataset | None:
    if not 0 < dataset_id <= INT64_MAX:  # beyond 64 bits no engine can even bind it: no such data set
        return None
    return session.get(Dataset, dataset_id)


def dataset_by_sha256(session: Session, sha256: str) -> Dataset | None:
    return session.scalar(select(Dataset).where(Dataset.sha256 == sha256))


def hub_dataset(session: Session, hub_id: str, hub_name: str | None, data_dir: str | None,
                split: str) -> Dataset | None:
    """The registered hub data set with exactly these coordinates (None-aware: SQL's `=` never matches NULL)."""
    query = select(Dataset).where(Dataset.hub_id == hub_id, Dataset.split == split)
    for column, value in ((Dataset.hub_name, hub_name), (Dataset.data_dir, data_dir)):
        query = query.where(column.is_(None) if value is None else column == value)
    return session.scalar(query.order_by(Dataset.id).limit(1))


def delete_dataset(session: Session, dataset_id: int) -> bool:
    """Delete one data set row; False when there was none."""
    if get_dataset(session, dataset_id) is None:
        return False
    session.execute(delete(Dataset).where(Dataset.id == dataset_id))
    session.commit()
    return True


def active_job_configs(session: Session) -> list[tuple[int, dict[str, Any]]]:
    """(id, config) of every queued or running job: the jobs that will still read their data."""
    rows = session.execute(select(Job.id, Job.config).where(Job.status.in_(ACTIVE)).order_by(Job.id))
    return [(job_id, config or {}) for job_id, config in rows]
