"""One trained tiny run for the session: data -> warm-up + sft -> reward (bf16, int8, int4) -> ppo -> evaluate, with
the `TRAINED` budget (seconds), run once and copied (`TrainedRun.copy_to`) into each test that writes.

Under pytest-xdist the workers share it: the first to need it builds it under a file lock in the run's common
temp dir, the others wait for it and read what it wrote.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from edgerlhf.config import PipelineConfig
from edgerlhf.contract import STAGES

from .tiny import TRAINED, tiny_config


@dataclass(frozen=True)
class TrainedRun:
    run_dir: Path
    """The run directory: read it, never write it (`copy_to` gives a copy to write)."""
    config: PipelineConfig

    def report(self, stage: str) -> dict:
        return json.loads((self.run_dir / stage / "report.json").read_text())

    def copy_to(self, dest: Path, parts: tuple[str, ...] | None = None) -> Path:
        """A copy of the run directory at `dest` (only `parts`, its top-level entries such as "data" or "sft", and
        its config.json, when given); returns `dest`."""
        if parts is None:
            shutil.copytree(self.run_dir, dest)
            return dest
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(self.run_dir / "config.json", dest / "config.json")
        for part in parts:
            shutil.copytree(self.run_dir / part, dest / part)
        return dest


def trained_run(shared_root: Path) -> TrainedRun:
    """The trained run under `shared_root/trained-run`, built by the first caller (a file lock keeps others out)."""
    from filelock import FileLock

    root = shared_root / "trained-run"
    root.mkdir(parents=True, exist_ok=True)
    config = tiny_config(TRAINED)
    with FileLock(str(root / "lock")):
        done = root / "done"
        if not done.exists():
            run_dir = root / "run"
            shutil.rmtree(run_dir, ignore_errors=True)  # what a build killed midway left
            _train(config, run_dir)
            done.write_text(str(os.getpid()))
    return TrainedRun(root / "run", config)


def _train(config: PipelineConfig, run_dir: Path) -> None:
    import torch

    from edgerlhf.context import RunContext
    from edgerlhf.pipeline import run_pipeline

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as a worker's job process (OMP_NUM_THREADS=1): on 2 shared cores a second waits
    try:
        reports = run_pipeline(config, RunContext(run_dir))
    finally:
        torch.set_num_threads(threads)
    assert list(reports) == list(STAGES), list(reports)
