"""SQLAlchemy 2.x models of the job service: jobs, their stage runs, metrics, samples, logs, artifacts, workers.

The backend and the worker share nothing but these tables. Every table that a live view reads
incrementally (metrics, samples, logs) numbers a job's rows in `row_seq`, drawn from the job's own counter
`Job.last_row_seq` under a lock on the job row, so that within a job the numbers follow commit order; it is
the read cursor: "everything of job J after N" is one range scan of the unique index `(job_id, row_seq)`.
Why not the autoincrement `id`: on PostgreSQL, ids commit out of order (`db.read` explains). SQLite's
`AUTOINCREMENT` (`sqlite_autoincrement`) stays, so a deleted row's id is never handed out again: on every table
whose ids name something outside its row (jobs: run directories, chat model ids, votes; votes: snapshot files;
metrics, samples, logs: old cursors). PostgreSQL's sequences never go back anyway. A SQLite database made before a
table had it is rebuilt once (`db.session.add_autoincrement`).
The statuses stored here (`JobStatus`, `StageStatus`, `FINISHED`) are the shared contract's
(`edgerlhf.contract`), re-exported so `from db import JobStatus` keeps working.
Layout after fastapi/full-stack-fastapi-template's `models.py`; queue semantics after procrastinate.
"""

from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from edgerlhf.contract import FINISHED, JobStatus, StageStatus
from edgerlhf.votes import VoteChoice

__all__ = ["FINISHED", "INT64_MAX", "INT64_MIN", "MAX_GPU_MEMORY_MB", "JobStatus", "StageStatus", "ArenaVote",
           "Artifact", "Base", "Dataset", "Job", "LogLine", "Metric", "Sample", "StageRun", "VoteChoice", "Worker", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite stores naive text, so we re-attach UTC)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime; use db.models.utcnow()")
        return value.astimezone(timezone.utc).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The range of an id, cursor or offset (`ID64`, `BigInteger`): SQLite cannot even bind an int outside it
(OverflowError), PostgreSQL cannot cast one to BIGINT, so no query may be sent one."""

MAX_GPU_MEMORY_MB = 2**20
"""Upper bound of a GPU memory figure in MB (a job's minimum, a worker's `--gpu-memory-mb`): 1 TiB, far above
any one GPU and far inside a 32-bit INTEGER (PostgreSQL's)."""


ID64 = BigInteger().with_variant(Integer(), "sqlite")
"""The type of every id (and, through the foreign keys, every `job_id`): 64 bits on both engines, so the INT64
range above is the whole story. SQLite's INTEGER is 64-bit already, and only a column declared exactly
`INTEGER PRIMARY KEY` is its rowid (autoincrement); PostgreSQL's INTEGER is 32-bit, where an id past 2**31
(a busy service's metrics) would overflow and an id from a URL past it would not even cast, so there it is
BIGINT (BIGSERIAL)."""


def _enum(cls: type[enum.Enum]) -> Enum:
    # Store the values as plain strings (no native ENUM type, no CHECK constraint), so SQLite and PostgreSQL
    # agree and the column's DDL does not depend on the members: a member added to the contract (such as
    # the API-only `StageStatus.pending`, which is never stored) needs no migration of an existing database.
    return Enum(cls, native_enum=False, length=16, validate_strings=True,
                values_callable=lambda e: [m.value for m in e])


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime, dict[str, Any]: JSON}


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_id", "status", "id"), Index("ix_jobs_parent_id", "parent_id"),
                      {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(ID64, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    status: Mapped[JobStatus] = mapped_column(_enum(JobStatus), default=JobStatus.queued)
    preset: Mapped[str] = mapped_column(String(100))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The full `PipelineConfig.to_dict()`: the job can be reproduced from it alone."""
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    """The stage running now (or the last one that ran)."""
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    """Overall progress in [0, 1] across the job's stages."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    error: Mapped[str | None] = mapped_column(Text, default=None)
    """One-line reason of a failure (`ValueError: ...`)."""
    traceback: Mapped[str | None] = mapped_column(Text, default=None)
    """The full Python traceback of a failure; kept in the database, never sent to API clients."""
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """How many times a worker claimed the job (a clean worker shutdown gives its attempt back)."""
    worker_id: Mapped[str | None] = mapped_column(String(200), default=None)
    heartbeat_at: Mapped[datetime | None] = mapped_column(default=None)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    last_row_seq: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    """The last `row_seq` handed to one of this job's metrics, samples or log lines (`db.queue.next_row_seqs`)."""
    min_gpu_memory_mb: Mapped[int | None] = mapped_column(Integer, default=None)
    """Only a worker whose GPU has at least this much memory (MB) claims the job; None: any worker."""
    parent_id: Mapped[int | None] = mapped_column(ID64, default=None)
    """The job this one continues (`POST /api/jobs/{id}/continue`): the next round of RLHF from its aligned policy;
    None for a round 1. No foreign key: a round keeps its place in the chain when its parent is deleted (its own run
    directory holds all it needs once its SFT stage has written the parent's policy)."""
    round: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    """Which round of RLHF the job is: 1 from a base model, the parent's round + 1 (its config's `round.number`)."""

    stage_runs: Mapped[list[StageRun]] = relationship(
        back_populates="job", cascade="all, delete-orphan", passive_deletes=True, order_by="StageRun.id")


class StageRun(Base):
    __tablename__ = "stage_runs"
    __table_args__ = (UniqueConstraint("job_id", "stage", name="uq_stage_runs_job_stage"),)

    id: Mapped[int] = mapped_column(ID64, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str] = mapped_column(String(32))
    status: Mapped[StageStatus] = mapped_column(_enum(StageStatus))
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    """The job attempt that began this stage last."""
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    """The stage's fraction done in [0, 1]."""
    done: Mapped[int | None] = mapped_column(Integer, default=None)
    """Units of work done, as the stage last reported them (`ctx.progress(done, total)`: steps, batches ...);
    None until it reports."""
    total: Mapped[int | None] = mapped_column(Integer, default=None)
    """Units of work the stage will do, from the same report."""
    first_done: Mapped[int | None] = mapped_column(Integer, default=None)
    """`done` at the stage's first report in this attempt (more than 1 on a resumed stage): its step rate counts
    from there, so the time spent loading and warming up before it is not taken for slow steps."""
    first_progress_at: Mapped[datetime | None] = mapped_column(default=None)
    """When that first report came; None while the stage is still loading (or it never reports)."""
    progress_at: Mapped[datetime | None] = mapped_column(default=None)
    """When the latest report came."""
    started_at: Mapped[datetime | None] = mapped_column(default=None)
    finished_at: Mapped[datetime | None] = mapped_column(default=None)
    report: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """The stage's `report.json`, once it succeeded."""

    job: Mapped[Job] = relationship(back_populates="stage_runs")


class Metric(Base):
    __tablename__ = "metrics"
    __table_args__ = (
        # One value per (job, stage, key, step): a resumed stage re-logging step i replaces the row.
        UniqueConstraint("job_id", "stage", "key", "step", name="uq_metrics_point"),
        Index("ix_metrics_job_row_seq", "job_id", "row_seq", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(ID64, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    row_seq: Mapped[int] = mapped_column(BigInteger)
    """This row's place in its job's stream, the read cursor (from `Job.last_row_seq`; unique per job)."""
    stage: Mapped[str] = mapped_column(String(32))
    key: Mapped[str] = mapped_column(String(100))
    step: Mapped[int] = mapped_column(Integer)
    value: Mapped[float | None] = mapped_column(Float)
    """None for a non-finite value (SQLite stores NaN as NULL anyway; JSON has no NaN)."""
    time: Mapped[float] = mapped_column(Float)
    """Unix time the value was logged."""


class Sample(Base):
    __tablename__ = "samples"
    __table_args__ = (
        # `seq` numbers the samples logged at one (stage, kind, step); deterministic stages log the
        # same prompts in the same order, so a resumed stage replaces its samples instead of doubling them.
        UniqueConstraint("job_id", "stage", "kind", "step", "seq", name="uq_samples_point"),
        Index("ix_samples_job_row_seq", "job_id", "row_seq", unique=True),
        {"sqlite_autoincrement": True},
    )

    id: Mapped[int] = mapped_column(ID64, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    row_seq: Mapped[int] = mapped_column(BigInteger)
    """This row's place in its job's stream, the read cursor (from `Job.last_row_seq`; unique per job)."""
    stage: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(16), default="sample")
    """`sample` (during training), `probe` (fixed prompts per checkpoint) or `eval`."""
    checkpoint: Mapped[str | None] = mapped_column(String(100), default=None)
    step: Mapped[int] = mapped_column(Integer)
    seq: Mapped[int] = mapped_column(Integer, default=0)
    prompt: Mapped[str] = mapped_column(Text)
    response: Mapped[str] = mapped_column(Text)
    reward: Mapped[float | None] = mapped_column(Float, default=None)
    parts: Mapped[dict[str, float] | None] = mapped_column(JSON, default=None)
    """With stated rewards (`ppo.rewards`): each component's score of the response, unweighted."""
    time: Mapped[float] = mapped_column(Float)


class LogLine(Base):
    __tablename__ = "logs"
    __table_args__ = (Index("ix_logs_job_row_seq", "job_id", "row_seq", unique=True), {"sqlite_autoincrement": True})

    id: Mapped[int] = mapped_column(ID64, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    row_seq: Mapped[int] = mapped_column(BigInteger)
    """This row's place in its job's stream, the read cursor (from `Job.last_row_seq`; unique per job)."""
    time: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(10))
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    message: Mapped[str] = mapped_column(Text)


class Artifact(Base):
    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "kind", "path", name="uq_artifacts_path"),)

    id: Mapped[int] = mapped_column(ID64, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    stage: Mapped[str | None] = mapped_column(String(32), default=None)
    kind: Mapped[str] = mapped_column(String(50))
    path: Mapped[str] = mapped_column(Text)
    size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    """Bytes (a directory: the sum of its files)."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Worker(Base):
    """One row per worker process, heartbeated while it lives, so the backend can say whether one is alive."""

    __tablename__ = "workers"

    id: Mapped[str] = mapped_column(String(200), primary_key=True)
    """`<hostname>:<pid>` unless given."""
    hostname: Mapped[str] = mapped_column(String(200))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    state: Mapped[str] = mapped_column(String(16), default="idle")
    """`idle`, `busy` (running `job_id` in process `child_pid`) or `stopped`."""
    job_id: Mapped[int | None] = mapped_column(Integer, default=None)
    child_pid: Mapped[int | None] = mapped_column(Integer, default=None)
    gpu_index: Mapped[int | None] = mapped_column(Integer, default=None)
    """The GPU the worker owns, as nvidia-smi numbers it (`edgerlhf worker --gpu N`); None: none named or found."""
    gpu_name: Mapped[str | None] = mapped_column(String(200), default=None)
    gpu_memory_mb: Mapped[int | None] = mapped_column(Integer, default=None)
    """Its memory (`--gpu-memory-mb`, else nvidia-smi's `memory.total`); None: unknown (a CPU-only machine).
    The worker claims only jobs whose `min_gpu_memory_mb` this meets."""


class ArenaVote(Base):
    """One judgement from the arena: two answers to one prompt, and which the person preferred.

    Votes are the person's data, not a job's: no foreign key, so deleting a job keeps the votes about its
    models (their ids stay as labels). What a vote means as preference pairs is `edgerlhf.votes.vote_pairs`.
    """

    __tablename__ = "arena_votes"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(ID64, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    prompt: Mapped[str] = mapped_column(Text)
    """The prompt in HH form (`"\\n\\nHuman: ...\\n\\nAssistant:"`), as both models saw it."""
    prompt_source: Mapped[str | None] = mapped_column(String(200), default=None)
    """Where the prompt came from: None (typed), or e.g. `job-3 held-out` (its data/test_prefs.jsonl)."""
    model_a: Mapped[str] = mapped_column(String(100))
    """The chat model id of answer A (`job-3/ppo`)."""
    model_b: Mapped[str] = mapped_column(String(100))
    answer_a: Mapped[str] = mapped_column(Text)
    answer_b: Mapped[str] = mapped_column(Text)
    choice: Mapped[VoteChoice] = mapped_column(_enum(VoteChoice))
    better: Mapped[str | None] = mapped_column(Text, default=None)
    """An answer the person wrote, better than both (None: none written)."""


class Feedback(Base):
    """What a person said about one reply while chatting: a thumb up or down, and/or a better answer they wrote.

    The person's data, not a job's (no foreign key: deleting a job keeps what was said about its models). What it
    becomes as training data (unpaired thumbs, demonstrations, preference pairs) is `db.feedback.records`.
    """

    __tablename__ = "feedback"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(ID64, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    model: Mapped[str] = mapped_column(String(100))
    """The chat model that replied (`job-3/ppo`, `job-3/sft`, `job-3/base`)."""
    completion_id: Mapped[str | None] = mapped_column(String(100), default=None)
    """The `/v1/chat/completions` reply's `id`, linking the feedback to that completion."""
    messages: Mapped[list[dict[str, str]]] = mapped_column(JSON)
    """The conversation up to the reply (`{"role", "content"}` messages, the last one the user's)."""
    reply: Mapped[str] = mapped_column(Text)
    rating: Mapped[int | None] = mapped_column(Integer, default=None)
    """1: thumb up, -1: thumb down, None: a better answer only."""
    better: Mapped[str | None] = mapped_column(Text, default=None)
    """A better answer the person wrote (None: none)."""
    sampling: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """The sampling settings of the reply (temperature, top_p, max_tokens, seed)."""
    author: Mapped[str | None] = mapped_column(String(100), default=None)
    """Who gave it, as the client says (the dashboard: its session's name, if any)."""


class Dataset(Base):
    """A data set a job may read by its id: a file uploaded to the backend, or a hub id registered with it.

    An upload is stored once per content (`sha256`, unique) under the data directory, at `path`; a hub data set is
    read from the hub by the job (`hub_id`, `hub_name`, `data_dir`, `split`). The format was detected when it was
    added (`edgerlhf.formats`), so the list can say what each holds without reading it again. What the backend does
    with it is `backend.datasets`.
    """

    __tablename__ = "datasets"
    __table_args__ = ({"sqlite_autoincrement": True},)

    id: Mapped[int] = mapped_column(ID64, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    """What it holds, as detected: preference, demonstration, prompt or unpaired (`edgerlhf.formats.KINDS`)."""
    conversational: Mapped[bool] = mapped_column(Boolean, default=False)
    """Its texts are lists of `{"role", "content"}` messages."""
    reason: Mapped[str] = mapped_column(Text, default="")
    """Why the format was detected as it was (`formats.Detected.reason`)."""
    format: Mapped[str] = mapped_column(String(16), default="auto")
    """The format asked for when it was added (`auto`: detected); a job reads it with this `format`."""
    columns: Mapped[dict[str, Any] | None] = mapped_column(JSON, default=None)
    """The column mapping (its name -> the format's) used to detect it, and that a job applies; None: none."""
    rows: Mapped[int] = mapped_column(BigInteger, default=0)
    """Rows read (a multi-turn demonstration may give several records)."""
    records: Mapped[int] = mapped_column(BigInteger, default=0)
    bad_rows: Mapped[int] = mapped_column(BigInteger, default=0)
    """Rows that could not be read, accepted only when it was added with `skip_bad_rows` (jobs then skip them)."""
    bad_row_examples: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    """The first few bad rows, `file:line: message` each."""
    sha256: Mapped[str | None] = mapped_column(String(64), default=None, unique=True)
    """An upload's content hash (the same file uploaded twice is one data set); None for a hub data set."""
    path: Mapped[str | None] = mapped_column(Text, default=None)
    """An upload's file, relative to the data directory: `datasets/<sha256>/<file name>`."""
    size: Mapped[int | None] = mapped_column(BigInteger, default=None)
    """An upload's bytes."""
    hub_id: Mapped[str | None] = mapped_column(String(200), default=None)
    """A hub data set's id (`org/name`); None for an upload."""
    hub_name: Mapped[str | None] = mapped_column(String(200), default=None)
    """Its configuration name (`datasets.load_dataset(id, name)`)."""
    data_dir: Mapped[str | None] = mapped_column(String(300), default=None)
    split: Mapped[str | None] = mapped_column(String(100), default=None)
