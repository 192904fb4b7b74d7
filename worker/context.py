"""The worker's `RunContext`: what a stage reports goes to the job's tables, in batches, from a background thread.

A stage calls `ctx.log_metric(...)` thousands of times; each call only appends to an in-memory buffer.
A background thread flushes the buffers in one transaction every `flush_interval` seconds (sooner when
`flush_rows` rows are waiting), polls the job's cancel flag, and samples memory every `memory_interval`
seconds (`edgerlhf.memory.sampled`). So the training loop never waits on the database, `check_cancelled()`
costs a flag read, and a browser still sees a new point within about a second.

One writer per metric key: the sampler writes `sys/*` (`contract.SAMPLED_PREFIX`) and nothing else; the
stages write `mem/*` at their own steps. Both write at a stage's step, so a shared key would silently
replace one writer's point with the other's (a point is unique per stage, key and step).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import queue
from db.models import utcnow
from edgerlhf.context import RunContext, Sample

logger = logging.getLogger("edgerlhf.worker")

_QUIET_LOGGERS = ("sqlalchemy", "edgerlhf.db", "edgerlhf.worker")
"""Never copied to the logs table: the flusher's own trouble must not feed the flusher."""


def _size(path: Path) -> int | None:
    try:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size
    except OSError:
        return None


class _CaptureHandler(logging.Handler):
    """Copies log records of library code (`edgerlhf.*` at INFO, anything at WARNING) into the logs table."""

    def __init__(self, ctx: DBContext):
        super().__init__(logging.INFO)
        self.ctx = ctx

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "from_ctx", False) or record.name.startswith(_QUIET_LOGGERS):
            return
        if record.levelno < logging.WARNING and not record.name.startswith("edgerlhf"):
            return
        try:
            self.ctx._buffer_log(record.levelname.lower(), record.getMessage())
        except Exception:  # a log line must never break training
            pass


class DBContext(RunContext):
    """Writes a job's metrics, samples, logs, progress, artifacts and stage runs to the database."""

    def __init__(self, sessions: sessionmaker[Session], job_id: int, run_dir: str | Path, *,
                 stages: list[str], attempt: int = 1, memory_device: str | None = None,
                 flush_interval: float = 0.5, flush_rows: int = 2000, memory_interval: float = 2.0,
                 cancel_interval: float = 0.5):
        super().__init__(run_dir, job_id)
        self.sessions = sessions
        self.stages = list(stages)
        self.attempt = attempt
        self.memory_device = memory_device
        self.flush_interval = flush_interval
        self.flush_rows = flush_rows
        self.memory_interval = memory_interval
        self.cancel_interval = cancel_interval

        self._lock = threading.Lock()          # guards the buffers
        self._flush_lock = threading.Lock()    # one flush at a time, so batches land in order
        self._metrics: list[tuple[str, str, int, float, float]] = []
        self._samples: list[dict[str, Any]] = []
        self._logs: list[tuple[float, str, str | None, str]] = []
        self._artifacts: list[tuple[str | None, str, str, int | None]] = []
        self._progress: tuple[str, float, float] | None = None
        self._steps: queue.StepProgress | None = None  # the step counts of `_progress`'s stage, when it gave them
        self._first_step: dict[str, tuple[int, datetime]] = {}  # stage -> (done, time) of its first `progress`
        self._sample_seq: dict[tuple[str, str, int], int] = {}
        self._last_step: dict[str, int] = {}
        self._cancel_seen = False
        self._last_cancel_poll = 0.0
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._handler = _CaptureHandler(self)
        self.flush_failures = 0

    # --- life cycle --------------------------------------------------------------------------------

    def start(self) -> DBContext:
        logging.getLogger().addHandler(self._handler)
        self._thread = threading.Thread(target=self._loop, name="db-flusher", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop the background thread and write whatever is still buffered (the TensorBoard file too)."""
        logging.getLogger().removeHandler(self._handler)
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            self.flush()
        finally:
            super().close()

    def __enter__(self) -> DBContext:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # --- RunContext hooks --------------------------------------------------------------------------

    def _emit_metrics(self, rows: list[tuple[str, str, int, float]]) -> None:
        now = time.time()
        with self._lock:
            self._metrics.extend((stage, key, step, value, now) for stage, key, step, value in rows)
            for stage, _, step, _ in rows:
                if step > self._last_step.get(stage, -1):
                    self._last_step[stage] = step
            full = len(self._metrics) >= self.flush_rows
        if full:
            self._wake.set()

    def _emit_sample(self, sample: Sample) -> None:
        with self._lock:
            # The n-th sample logged at (stage, kind, step): the same on a resumed run, so it replaces.
            seq_key = (sample.stage, sample.kind, sample.step)
            seq = self._sample_seq.get(seq_key, 0)
            self._sample_seq[seq_key] = seq + 1
            self._samples.append({"stage": sample.stage, "kind": sample.kind, "checkpoint": sample.checkpoint,
                                  "step": sample.step, "seq": seq, "prompt": sample.prompt,
                                  "response": sample.response, "reward": sample.reward, "parts": sample.parts,
                                  "time": time.time()})

    def _emit_log(self, level: str, message: str) -> None:
        logger.log(logging.getLevelName(level.upper()), message, extra={"job_id": self.job_id, "from_ctx": True})
        self._buffer_log(level, message)

    def _emit_progress(self, fraction: float) -> None:
        stage = self.stage or ""
        index = self.stages.index(stage) if stage in self.stages else 0
        overall = (index + fraction) / max(len(self.stages), 1)
        steps = None
        if stage in self.steps_by_stage:  # stamped now, not when the batch is written: the ETA is a rate
            done, total = self.steps_by_stage[stage]
            now = utcnow()
            first_done, first_at = self._first_step.setdefault(stage, (done, now))
            steps = queue.StepProgress(done, total, first_done, first_at, now)
        with self._lock:
            self._progress = (stage, fraction, overall)
            self._steps = steps

    def _emit_artifact(self, kind: str, path: Path) -> None:
        path = Path(path).absolute()
        with self._lock:
            self._artifacts.append((self.stage, kind, str(path), _size(path)))

    def _poll_cancel(self) -> bool:
        if self._thread is None or not self._thread.is_alive():
            # No flusher (a context used without `start`): ask the database, at most twice a second.
            now = time.monotonic()
            if now - self._last_cancel_poll >= self.cancel_interval:
                self._last_cancel_poll = now
                self._check_cancel_flag()
        return self._cancel_seen

    def begin_stage(self, stage: str) -> None:
        # A cancel that came while the job process was starting stops it before the stage, not after it.
        self._check_cancel_flag()
        self.check_cancelled()
        self.flush()
        with self.sessions() as session:
            queue.begin_stage(session, int(self.job_id), stage, self.attempt)
        self._first_step.pop(stage, None)
        super().begin_stage(stage)
        self._emit_progress(0.0)

    def end_stage(self, stage: str, report: dict[str, Any] | None = None) -> None:
        super().end_stage(stage, report)
        self.flush()  # the stage's last points land before the stage counts as done
        overall = (self.stages.index(stage) + 1) / len(self.stages) if stage in self.stages else None
        with self.sessions() as session:
            queue.end_stage(session, int(self.job_id), stage, report, overall)

    # --- buffers and the background thread ---------------------------------------------------------

    def _buffer_log(self, level: str, message: str) -> None:
        with self._lock:
            self._logs.append((time.time(), level, self.stage, message[:10_000]))

    def pending(self) -> int:
        with self._lock:
            return len(self._metrics) + len(self._samples) + len(self._logs) + len(self._artifacts)

    def flush(self) -> None:
        """Write everything buffered in one transaction; on failure the rows go back to the buffer."""
        with self._flush_lock:
            with self._lock:
                metrics, self._metrics = self._metrics, []
                samples, self._samples = self._samples, []
                logs, self._logs = self._logs, []
                artifacts, self._artifacts = self._artifacts, []
                progress, self._progress = self._progress, None
                steps, self._steps = self._steps, None
            if not (metrics or samples or logs or artifacts or progress):
                return
            try:
                with self.sessions() as session:
                    queue.record(session, int(self.job_id), metrics=metrics, samples=samples, logs=logs,
                                 artifacts=artifacts, progress=progress, steps=steps)
            except Exception:
                with self._lock:  # keep order: the failed batch goes before anything newer
                    self._metrics[:0] = metrics
                    self._samples[:0] = samples
                    self._logs[:0] = logs
                    self._artifacts[:0] = artifacts
                    if self._progress is None:
                        self._progress, self._steps = progress, steps
                raise

    def _check_cancel_flag(self) -> None:
        with self.sessions() as session:
            if queue.cancel_requested(session, int(self.job_id)):
                self._cancel_seen = True

    def sample_memory(self) -> list[tuple[str, str, int, float]]:
        """Record `edgerlhf.memory.sampled()` (`sys/*`) at the stage's latest step; returns the rows."""
        if not self.stage:
            return []
        from edgerlhf.memory import sampled

        readings = sampled(self.memory_device)
        now = time.time()
        with self._lock:
            step = self._last_step.get(self.stage, 0)
            rows = [(self.stage, key, step, float(value)) for key, value in readings.items()]
            self._metrics.extend((*row, now) for row in rows)
        return rows

    def _loop(self) -> None:
        next_memory = time.monotonic()
        while not self._stop.is_set():
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            try:
                if self.memory_interval and time.monotonic() >= next_memory:
                    next_memory = time.monotonic() + self.memory_interval
                    self.sample_memory()
                self.flush()
                self._check_cancel_flag()
            except Exception as exc:  # the database is busy or gone for a moment: try again next tick
                self.flush_failures += 1
                logger.warning(f"could not write to the database ({type(exc).__name__}: {exc}); retrying",
                               extra={"job_id": self.job_id})
                time.sleep(min(self.flush_interval * 2, 2.0))

