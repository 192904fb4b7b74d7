"""Live job history kept in the browser session: rows are fetched after a cursor, never twice.

A `JobFeed` holds everything the dashboard has downloaded for one job (metrics, samples, log lines) and
the cursors to ask for what came after. `pull(client, feed)` downloads only the new rows; the feed lives
in `st.session_state`, so a fragment that refreshes every few seconds costs one small request per table.
A reloaded page starts a new session and an empty feed, pulls the whole history once from the backend
(where the job lives), and is then back to only new rows.

Metric rows are keyed by (stage, key, step): a resumed stage re-logs step i and the newer value replaces
the older one, as it does in the database.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from frontend.api_client import ApiClient

TERMINAL = ("succeeded", "failed", "cancelled")
"""Job statuses after which nothing new arrives."""
MAX_LOG_LINES = 500
"""Log lines kept per job in the session (the log tail)."""
PAGE_LIMIT = 5000
"""Rows asked for per request."""
MAX_PAGES = 50
"""Pages fetched per pull before handing control back to the page (a huge history loads over a few refreshes)."""


def _value(v: Any) -> float | None:
    """A metric value; NaN/inf may arrive as null or as a string."""
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def row_time(row: dict[str, Any]) -> Any:
    for name in ("time", "created_at", "ts", "timestamp", "logged_at"):
        if row.get(name) is not None:
            return row[name]
    return None


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
    report: dict[str, Any] | None = None
    report_key: tuple | None = None
    """(status, finished stages) when the report was fetched: fetch again only when it changes."""
    rows_downloaded: int = 0
    """Total rows received, to show (and test) that refreshes download only new rows."""
    pulls: int = 0
    last_pull: float = 0.0

    # --- views -----------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        return (self.job or {}).get("status", "unknown")

    @property
    def active(self) -> bool:
        return self.status not in TERMINAL

    def series(self, key: str, stage: str | None = None) -> list[tuple[int, float | None]]:
        """(step, value) of one metric, sorted by step; all stages unless `stage` is given."""
        points = [(k[2], _value(row.get("value"))) for k, row in self.metrics.items()
                  if k[1] == key and (stage is None or k[0] == stage)]
        return sorted(points, key=lambda p: p[0])

    def timed(self, key: str) -> list[tuple[Any, int, str, float | None]]:
        """(time, step, stage, value) of one metric across stages, in the order it was logged."""
        rows = [row for k, row in self.metrics.items() if k[1] == key]
        rows.sort(key=lambda r: (r.get("id") or 0, row_time(r) or ""))
        return [(row_time(r), r.get("step"), r.get("stage"), _value(r.get("value"))) for r in rows]

    def keys(self) -> list[str]:
        return sorted({k[1] for k in self.metrics})

    def all_series(self) -> dict[str, list[tuple[int, float | None]]]:
        """Every metric key -> series; memory keys span stages, the others belong to one."""
        return {key: self.series(key) for key in self.keys()}

    def samples_of(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [s for s in self.samples if kind is None or s.get("kind", "sample") == kind]

    def last(self, key: str) -> float | None:
        s = [v for _, v in self.series(key) if v is not None and math.isfinite(v)]
        return s[-1] if s else None

    # --- merging (pure) --------------------------------------------------------------------------

    def add_metrics(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            stage = row.get("stage") or ""
            self.metrics[(stage, row["key"], int(row.get("step") or 0))] = row
        self.rows_downloaded += len(rows)

    def add_samples(self, rows: list[dict[str, Any]]) -> None:
        seen = {s.get("id") for s in self.samples if s.get("id") is not None}
        self.samples.extend(r for r in rows if r.get("id") is None or r.get("id") not in seen)
        self.rows_downloaded += len(rows)

    def add_logs(self, rows: list[dict[str, Any]]) -> None:
        self.logs.extend(rows)
        self.rows_downloaded += len(rows)


def _drain(fetch, cursor: int) -> tuple[list[dict[str, Any]], int]:
    """Follow the cursor until the backend has nothing more (bounded by MAX_PAGES)."""
    rows: list[dict[str, Any]] = []
    for _ in range(MAX_PAGES):
        page = fetch(cursor)
        rows.extend(page.items)
        advanced = page.cursor > cursor
        cursor = page.cursor
        if not page.items or not advanced or (not page.more and len(page.items) < PAGE_LIMIT):
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
    """Names of the job's stages that completed, from the job JSON's `stages`."""
    stages = (job or {}).get("stages") or []
    if isinstance(stages, dict):
        items = [{"name": k, **(v if isinstance(v, dict) else {"status": v})} for k, v in stages.items()]
    else:
        items = stages
    return tuple(s.get("name") or s.get("stage") for s in items
                 if isinstance(s, dict) and s.get("status") in ("succeeded", "completed", "done", "finished"))


def refresh_report(client: ApiClient, feed: JobFeed) -> dict[str, Any]:
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
