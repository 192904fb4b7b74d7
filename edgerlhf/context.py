"""The callback interface between a pipeline stage and whoever runs it.

A stage receives a `RunContext` and reports through it: metrics (`ctx.log_metric("ppo/kl", 0.3, step)`),
sample generations, log lines, stage progress and artifacts. It calls `ctx.check_cancelled()` between
training steps. The stage never knows whether a terminal (the CLI), a test, or the worker's database
sits behind the context: the worker subclasses it and writes to the job tables.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("edgerlhf")


class Cancelled(Exception):
    """Raised by `RunContext.check_cancelled` when the run was asked to stop."""


@dataclass
class Sample:
    prompt: str
    response: str
    reward: float | None
    step: int
    stage: str
    kind: str = "sample"
    """`sample` (during training), `probe` (fixed probe prompts per checkpoint) or `eval`."""
    checkpoint: str | None = None
    """Which checkpoint produced it, e.g. `sft`, `ppo/step-20`."""


class RunContext:
    """Base context: keeps what it is told in memory and writes log lines through `logging`.

    Subclasses (the worker's database context) override the `_emit_*` hooks; stages only call the
    public methods.
    """

    def __init__(self, run_dir: str | Path, job_id: int | str | None = None):
        self.run_dir = Path(run_dir).resolve()  # stages load from it by absolute path only
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.job_id = job_id
        self.stage: str | None = None
        self.metrics: list[tuple[str, str, int, float]] = []  # (stage, key, step, value)
        self.samples: list[Sample] = []
        self.artifacts: list[tuple[str, str]] = []  # (kind, path)
        self.progress_by_stage: dict[str, float] = {}
        self._cancel_requested = False

    # --- what stages call ----------------------------------------------------------------------

    def stage_dir(self, stage: str | None = None) -> Path:
        """The directory a stage writes its artifacts to: `<run_dir>/<stage>/`."""
        path = self.run_dir / (stage or self.stage or "misc")
        path.mkdir(parents=True, exist_ok=True)
        return path

    def log_metric(self, key: str, value: float, step: int) -> None:
        self.log_metrics({key: value}, step)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        rows = [(self.stage or "", k, int(step), float(v)) for k, v in metrics.items()]
        self.metrics.extend(rows)
        self._emit_metrics(rows)

    def log_sample(self, prompt: str, response: str, reward: float | None, step: int,
                   kind: str = "sample", checkpoint: str | None = None) -> None:
        sample = Sample(prompt, response, None if reward is None else float(reward), int(step),
                        self.stage or "", kind, checkpoint)
        self.samples.append(sample)
        self._emit_sample(sample)

    def log(self, message: str, level: str = "info") -> None:
        self._emit_log(level, message)

    def progress(self, done: int, total: int) -> None:
        """Stage progress: `done` of `total` units (steps, batches ...)."""
        fraction = min(max(done / total, 0.0), 1.0) if total else 1.0
        self.progress_by_stage[self.stage or ""] = fraction
        self._emit_progress(fraction)

    def artifact(self, kind: str, path: str | Path) -> None:
        """Record a file or directory the stage produced (adapter, report, data file ...)."""
        self.artifacts.append((kind, str(path)))
        self._emit_artifact(kind, Path(path))

    def check_cancelled(self) -> None:
        """Raise `Cancelled` if someone asked this run to stop; call it between training steps."""
        if self._cancel_requested or self._poll_cancel():
            raise Cancelled(f"run {self.job_id or ''} cancelled".replace("  ", " "))

    def request_cancel(self) -> None:
        self._cancel_requested = True

    # --- what runners call -----------------------------------------------------------------------

    def begin_stage(self, stage: str) -> None:
        self.stage = stage
        self.progress_by_stage[stage] = 0.0
        self._emit_log("info", f"stage {stage} started")

    def end_stage(self, stage: str, report: dict[str, Any] | None = None) -> None:
        self.progress_by_stage[stage] = 1.0
        self._emit_progress(1.0)
        self._emit_log("info", f"stage {stage} finished")

    # --- hooks for subclasses ------------------------------------------------------------------

    def _emit_metrics(self, rows: list[tuple[str, str, int, float]]) -> None:
        pass

    def _emit_sample(self, sample: Sample) -> None:
        pass

    def _emit_log(self, level: str, message: str) -> None:
        logger.log(logging.getLevelName(level.upper()), message, extra={"job_id": self.job_id})

    def _emit_progress(self, fraction: float) -> None:
        pass

    def _emit_artifact(self, kind: str, path: Path) -> None:
        pass

    def _poll_cancel(self) -> bool:
        return False

    # --- helpers for tests and the CLI ---------------------------------------------------------

    def metric_series(self, key: str) -> list[tuple[int, float]]:
        return [(step, value) for _, k, step, value in self.metrics if k == key]


class ConsoleContext(RunContext):
    """A context for the command line: prints a metric line every `print_every` seconds."""

    def __init__(self, run_dir: str | Path, print_every: float = 5.0):
        super().__init__(run_dir)
        self.print_every = print_every
        self._last_print = 0.0

    def _emit_metrics(self, rows):
        now = time.monotonic()
        if now - self._last_print >= self.print_every:
            self._last_print = now
            step = rows[-1][2]
            shown = ", ".join(f"{k}={v:.4g}" for _, k, _, v in rows[:8])
            logger.info(f"step {step}: {shown}", extra={"job_id": None})
