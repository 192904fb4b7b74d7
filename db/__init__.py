"""The job database shared by backend and worker: models (`db.models`), engine and sessions (`db.session`),
queue state changes (`db.queue`) and read queries (`db.read`). Nobody else writes SQL.
"""

from db.models import FINISHED, INT64_MAX, INT64_MIN, Job, JobStatus, StageStatus
from db.queue import JobNotFound, JobStateError
from db.session import get_engine, init_db, make_engine, make_sessionmaker

__all__ = ["FINISHED", "INT64_MAX", "INT64_MIN", "Job", "JobStatus", "StageStatus", "JobNotFound", "JobStateError",
           "get_engine", "init_db", "make_engine", "make_sessionmaker"]
