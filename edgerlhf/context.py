"""The callback interface between a pipeline stage and whoever runs it.

A stage receives a `RunContext` and reports through it: metrics (`ctx.log_metric("ppo/kl", 0.3, step)`),
sample generations, log lines, stage progress and artifacts. It calls `ctx.check_cancelled()` between
training steps. The stage never knows whether a terminal (the CLI), a test, or the worker's database
sits behind the context: the worker subclasses it and writes to the job tables.

Whatever sits behind it, every metric also goes to TensorBoard event files under `<run_dir>/tensorboard/`
(`torch.utils.tensorboard`), so `tensorboard --logdir <data dir>/runs` shows and compares every run with no
extra step. The writer is made on the first metric, so importing this module stays cheap.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgerlhf.contract import MEMORY_PREFIX, TENSORBOARD_DIR

logger = logging.getLogger("edgerlhf")

TENSORBOARD_FLUSH_SECONDS = 5
"""The writer's own flush interval: how stale a live `tensorboard` may be (a stage's end and `close` flush too)."""


def tensorboard_tag(stage: str, key: str) -> str:
    """The TensorBoard tag of metric `key` logged by `stage`: the key itself, except memory readings, which every
    stage logs at its own steps (`mem/peak_mb` -> `mem/sft/peak_mb`), so that each tag has one stage's steps."""
    if key.startswith(MEMORY_PREFIX) and stage:
        return f"{MEMORY_PREFIX}{stage}/{key[len(MEMORY_PREFIX):]}"
    return key


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
    parts: dict[str, float] | None = None
    """With stated rewards (`ppo.rewards`): each component's score of it, unweighted."""


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
        self.steps_by_stage: dict[str, tuple[int, int]] = {}  # (done, total) of each stage's latest `progress`
        self._cancel_requested = False
        self._tensorboard: Any = None  # a SummaryWriter once the first metric comes; False if it cannot be made

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
        self._write_tensorboard(rows)
        self._emit_metrics(rows)

    def log_sample(self, prompt: str, response: str, reward: float | None, step: int,
                   kind: str = "sample", checkpoint: str | None = None, parts: dict[str, float] | None = None) -> None:
        sample = Sample(prompt, response, None if reward is None else float(reward), int(step),
                        self.stage or "", kind, checkpoint, parts)
        self.samples.append(sample)
        self._emit_sample(sample)

    def log(self, message: str, level: str = "info") -> None:
        self._emit_log(level, message)

    def progress(self, done: int, total: int) -> None:
        """Stage progress: `done` of `total` units (steps, batches ...). Call it after each unit; the first call
        marks the end of loading and warm-up, and the dashboard's ETA counts the step rate from there."""
        fraction = min(max(done / total, 0.0), 1.0) if total else 1.0
        self.progress_by_stage[self.stage or ""] = fraction
        self.steps_by_stage[self.stage or ""] = (int(done), int(total))
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
        self.steps_by_stage.pop(stage, None)  # a stage run again counts its own steps
        self._emit_log("info", f"stage {stage} started")

    def end_stage(self, stage: str, report: dict[str, Any] | None = None) -> None:
        self.progress_by_stage[stage] = 1.0
        if self._tensorboard:
            self._tensorboard.flush()  # a finished stage's curves are whole on disk
        self._emit_progress(1.0)
        self._emit_log("info", f"stage {stage} finished")

    def close(self) -> None:
        """Write out and close the TensorBoard event file (later metrics still reach the subclass, not the file)."""
        if self._tensorboard:
            self._tensorboard.close()
        self._tensorboard = False

    # --- TensorBoard -----------------------------------------------------------------------------

    def _write_tensorboard(self, rows: list[tuple[str, str, int, float]]) -> None:
        if self._tensorboard is None:
            try:
                from torch.utils.tensorboard import SummaryWriter  # loads tensorboard: only once metrics come

                self._tensorboard = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR),
                                                  flush_secs=TENSORBOARD_FLUSH_SECONDS)
            except Exception as exc:  # TensorBoard is a view of the metrics: never a reason to stop training
                self._tensorboard = False
                self._emit_log("warning", f"no TensorBoard event files for this run ({type(exc).__name__}: {exc})")
        if self._tensorboard:
            for stage, key, step, value in rows:
                self._tensorboard.add_scalar(tensorboard_tag(stage, key), value, step)

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
