"""Live job history kept in the browser session: rows are fetched after a cursor, never twice.

A `JobFeed` holds everything the dashboard has downloaded for one job (metrics, samples, log lines) and
the cursors to ask for what came after. `pull(client, feed)` downloads only the new rows; the feed lives
in `st.session_state`, so a fragment that refreshes every few seconds costs one small request per table.
A reloaded page starts a new session and an empty feed, pulls the whole history once from the backend
(where the job lives), and is then back to only new rows.

Metric rows are keyed by (stage, key, step): a resumed stage re-logs step i and the newer value replaces
the older one, as it does in the database.

Rows are the backend's `MetricPublic`, `SamplePublic` and `LogPublic`, the job its `JobPublic`, read by
their field names; statuses are `edgerlhf.contract`'s. The stage reports are `edgerlhf.reports.JobReports`.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from edgerlhf.contract import FINISHED, JobStatus, StageStatus, algorithm_metric, algorithm_traits
from edgerlhf.reports import JobReports
from frontend.api_client import ApiClient

MAX_LOG_LINES = 500
"""Log lines kept per job in the session (the log tail)."""
PAGE_LIMIT = 5000
"""Rows asked for per request."""
MAX_PAGES = 50
"""Pages fetched per pull before handing control back to the page (a huge history loads over a few refreshes)."""


def _value(v: float | None) -> float | None:
    """A metric value; a NaN or infinity arrives as null (JSON has neither)."""
    return None if v is None else float(v)


@dataclass
class JobFeed:
    """What this session has downloaded of one job."""

    job_id: int
    job: dict[str, Any] | None = None
    metrics: dict[tuple[str, str, int], dict[str, Any]] = field(default_factory=dict)
    samples: list[dict[str, Any]] = field(default_factory=list)
    logs: deque = field(default_factory=lambda: deque(maxlen=MAX_LOG_LINES))
    metric_cursor: int = 0
    sample_cursor: int = 0
    log_cursor: int = 0
    report: JobReports | None = None
    report_key: tuple | None = None
    """(status, finished stages) when the report was fetched: fetch again only when it changes."""
    rows_downloaded: int = 0
    """Total rows received, to show (and test) that refreshes download only new rows."""
    pulls: int = 0
    last_pull: float = 0.0

    # --- views -----------------------------------------------------------------------------------

    @property
    def status(self) -> JobStatus | None:
        """The job's status; None before the first pull."""
        return None if self.job is None else JobStatus(self.job["status"])

    @property
    def active(self) -> bool:
        """Something may still change: not yet pulled, or not finished."""
        return self.status not in FINISHED

    @property
    def algorithm(self) -> str:
        """The alignment algorithm the job's config names (`PipelineConfig.algorithm`); `ppo` before the first
        pull and for jobs stored before there was a choice."""
        return job_algorithm(self.job)

    def key(self, name: str) -> str:
        """The metric key of `name`: an alignment metric (`reward_mean`, `kl`) in the job's algorithm's namespace
        (`grpo/reward_mean`); a key with a namespace (`sft/loss`) as it is."""
        return name if "/" in name else algorithm_metric(self.algorithm, name)

    def samples_per_step(self, name: str) -> int | None:
        """What one step of metric `name` (a name as `key` takes it) consumed, from the job's stored config: for
        the alignment stage a rollout batch (`ppo.batch_size` responses) or, for DPO, `dpo.batch_size x
        dpo.grad_accum` preference pairs; for SFT, warm-up and the reward model their batch x accumulation;
        None for keys without a training step (memory, evaluation) or before the first pull."""
        if self.job is None:
            return None
        config, namespace = self.job["config"], self.key(name).split("/", 1)[0]
        if namespace == self.algorithm:
            section = algorithm_traits(namespace).section
        elif namespace in ("sft", "reward", "warmup"):
            section = namespace
        else:
            return None
        cfg = config.get(section) or {}
        if "batch_size" not in cfg:
            return None
        # A PPO step is one rollout batch, whatever its minibatches; the others step once per accumulated batch.
        return int(cfg["batch_size"]) * (1 if section == "ppo" else int(cfg.get("grad_accum", 1)))

    def series(self, key: str, stage: str | None = None) -> list[tuple[int, float | None]]:
        """(step, value) of one metric, sorted by step; all stages unless `stage` is given."""
        points = [(k[2], _value(row["value"])) for k, row in self.metrics.items()
                  if k[1] == key and (stage is None or k[0] == stage)]
        return sorted(points, key=lambda p: p[0])

    def timed(self, key: str) -> list[tuple[Any, int, str, float | None]]:
        """(time, step, stage, value) of one metric across stages, in the order it was logged."""
        rows = [row for k, row in self.metrics.items() if k[1] == key]
        rows.sort(key=lambda r: r["id"])
        return [(r["time"], r["step"], r["stage"], _value(r["value"])) for r in rows]

    def keys(self) -> list[str]:
        return sorted({k[1] for k in self.metrics})

    def names(self) -> list[str]:
        """The job's metrics as the Compare page matches them across jobs: its algorithm's by name
        (`grpo/reward_mean` -> `reward_mean`, what `key` takes back), every other key as it is."""
        prefix = algorithm_metric(self.algorithm, "")
        return sorted({key.removeprefix(prefix) for key in self.keys()})

    def all_series(self) -> dict[str, list[tuple[int, float | None]]]:
        """Every metric key -> series; memory keys span stages, the others belong to one."""
        return {key: self.series(key) for key in self.keys()}

    def samples_of(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [s for s in self.samples if kind is None or s["kind"] == kind]

    def last(self, key: str) -> float | None:
        s = [v for _, v in self.series(key) if v is not None and math.isfinite(v)]
        return s[-1] if s else None

    # --- merging (pure) --------------------------------------------------------------------------

    def add_metrics(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            self.metrics[(row["stage"], row["key"], row["step"])] = row
        self.rows_downloaded += len(rows)

    def add_samples(self, rows: list[dict[str, Any]]) -> None:
        seen = {s["id"] for s in self.samples}
        self.samples.extend(r for r in rows if r["id"] not in seen)
        self.rows_downloaded += len(rows)

    def add_logs(self, rows: list[dict[str, Any]]) -> None:
        self.logs.extend(rows)
        self.rows_downloaded += len(rows)


def job_algorithm(job: dict[str, Any] | None) -> str:
    """The alignment algorithm of a job (`JobSummary.algorithm`, a list item; `JobPublic` has it too), `ppo` for
    no job yet."""
    return (job or {}).get("algorithm") or (job or {}).get("config", {}).get("algorithm", "ppo")


def _drain(fetch, cursor: int) -> tuple[list[dict[str, Any]], int]:
    """Follow the cursor until the backend has nothing more (bounded by MAX_PAGES)."""
    rows: list[dict[str, Any]] = []
    for _ in range(MAX_PAGES):
        page = fetch(cursor)
        rows.extend(page.items)
        advanced = page.cursor > cursor  # a cursor that stands still would loop forever
        cursor = page.cursor
        if not page.more or not advanced:
            break
    return rows, cursor


def pull(client: ApiClient, feed: JobFeed, metrics: bool = True, samples: bool = True, logs: bool = True) -> int:
    """Download the job and every row after the feed's cursors; returns how many new rows came.

    Raises `BackendDown`/`ApiError` with the feed unchanged except for what was already merged, so a
    failing refresh never loses history.
    """
    feed.job = client.get_job(feed.job_id)
    new = 0
    if metrics:
        rows, feed.metric_cursor = _drain(
            lambda c: client.metrics(feed.job_id, after=c, limit=PAGE_LIMIT), feed.metric_cursor)
        feed.add_metrics(rows)
        new += len(rows)
    if samples:
        rows, feed.sample_cursor = _drain(
            lambda c: client.samples(feed.job_id, after=c, limit=PAGE_LIMIT), feed.sample_cursor)
        feed.add_samples(rows)
        new += len(rows)
    if logs:
        rows, feed.log_cursor = _drain(
            lambda c: client.logs(feed.job_id, after=c, limit=PAGE_LIMIT), feed.log_cursor)
        feed.add_logs(rows)
        new += len(rows)
    feed.pulls += 1
    feed.last_pull = time.time()
    return new


def finished_stages(job: dict[str, Any] | None) -> tuple[str, ...]:
    """Names of the job's stages that succeeded, from `JobPublic.stages` (none before the first pull)."""
    if job is None:
        return ()
    return tuple(s["stage"] for s in job["stages"] if StageStatus(s["status"]) == StageStatus.succeeded)


@dataclass(frozen=True)
class StageClock:
    """Where one stage of a job stands in time (`job_clock`)."""

    stage: str
    status: StageStatus
    phase: str
    """`pending` (not begun in this attempt), `loading` (begun, no step reported yet: loading and warm-up),
    `stepping`, `done` (succeeded) or `stopped` (failed, cancelled, interrupted in a finished job)."""
    done: int | None
    total: int | None
    elapsed_s: float | None
    """Loading: seconds since the stage began; stepping: seconds since its first step; else None."""
    remaining_s: float | None
    """Seconds left at its own step rate; 0 once done; None where not known (pending, loading, one step so far)."""


@dataclass(frozen=True)
class JobClock:
    stages: list[StageClock]
    remaining_s: float | None
    """The sum of the remaining stages' known times; None when none is known (or the job is not running)."""
    untimed: list[str]
    """Stages still to run whose time is not known yet (not begun, or still loading): the job's ETA is at least
    `remaining_s`."""


def _seconds(later: Any, earlier: Any) -> float | None:
    if later is None or earlier is None:
        return None
    return (_when(later) - _when(earlier)).total_seconds()


def _when(value: Any) -> datetime:
    """A `StagePublic` time (ISO text from the API, or a datetime) as an aware datetime."""
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    parsed = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def job_clock(job: dict[str, Any], now: datetime) -> JobClock:
    """Each stage's step count, phase and time left, and the job's time left, from `JobPublic.stages` at `now`.

    A running stage's rate is its own: steps since its first report over the time since it
    (`(done - first_done) / (progress_at - first_progress_at)`), so loading and warm-up before the first step do not
    pass for slow steps; its time left is `(total - done) / rate` less the time since its latest report (never below
    0). Until a second step is reported the rate, and so the time left, is unknown. Stages not begun have no rate of
    their own: they are listed in `untimed`, and the job's time left is the sum of what is known, not a guess.
    """
    running = JobStatus(job["status"]) == JobStatus.running
    clocks = []
    for s in job["stages"]:
        status = StageStatus(s["status"])
        done, total = s.get("done"), s.get("total")
        elapsed = left = None
        if status == StageStatus.succeeded:
            phase, left = "done", 0.0
        elif status == StageStatus.running and running:
            if s.get("first_progress_at") is None:
                phase, elapsed = "loading", _seconds(now, s["started_at"])
            else:
                phase, elapsed = "stepping", _seconds(now, s["first_progress_at"])
                span, stepped = _seconds(s["progress_at"], s["first_progress_at"]), done - s["first_done"]
                if total is not None and done >= total:
                    left = 0.0
                elif span and span > 0 and stepped > 0:
                    left = max(0.0, (total - done) * span / stepped - _seconds(now, s["progress_at"]))
        elif running and status in (StageStatus.pending, StageStatus.interrupted):
            phase = "pending"
        else:
            phase = "stopped" if status != StageStatus.pending else "pending"
        clocks.append(StageClock(s["stage"], status, phase, done, total, elapsed, left))
    if not running:
        return JobClock(clocks, None, [])
    ahead = [c for c in clocks if c.phase != "done"]
    timed = [c.remaining_s for c in ahead if c.remaining_s is not None]
    return JobClock(clocks, sum(timed) if timed or not ahead else None,
                    [c.stage for c in ahead if c.remaining_s is None])


def refresh_report(client: ApiClient, feed: JobFeed) -> JobReports:
    """The job's stage reports, fetched again only when a stage finished or the status changed."""
    key = (feed.status, finished_stages(feed.job))
    if feed.report is None or key != feed.report_key:
        feed.report = client.report(feed.job_id)
        feed.report_key = key
    return feed.report


def feed_for(state: Any, job_id: int) -> JobFeed:
    """The session's feed of a job (`state` is `st.session_state`), created empty on first use."""
    name = f"feed:{job_id}"
    if name not in state:
        state[name] = JobFeed(job_id)
    return state[name]
