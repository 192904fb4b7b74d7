"""The errors a person can fix, which runners report as one line instead of a traceback.

Every stage reads what earlier stages wrote into the run directory; when something is not there it raises
`MissingPrerequisite`, whose message names the stage to run first (`require` checks a path). A model that
cannot be loaded is a `ModelLoadError` (here rather than in `edgerlhf.models` so the backend can name it
without importing torch) and a bad data source an `edgerlhf.data.DataError`. All are `StageError`s:
`edgerlhf pipeline` prints a `StageError`'s message and keeps tracebacks for bugs.
"""

from __future__ import annotations

from pathlib import Path


class StageError(Exception):
    """A stage cannot do its work for a reason the person can fix; the message says what to do."""


class MissingPrerequisite(StageError):
    """Something an earlier stage writes is missing from the run directory."""

    def __init__(self, missing: str | Path, stage: str, what: str = "is missing"):
        super().__init__(f"{missing} {what}: run the {stage} stage first")
        self.missing = str(missing)
        self.stage = stage
        """The stage that writes it."""


class ModelLoadError(StageError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says why and what to do instead."""


def require(path: str | Path, stage: str) -> Path:
    """`path` as a `Path` when it exists; else `MissingPrerequisite` naming `stage`, the stage that writes it."""
    path = Path(path)
    if not path.exists():
        raise MissingPrerequisite(path, stage)
    return path
