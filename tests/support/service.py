"""The session's finished jobs of two algorithms, served: real `edgerlhf worker` processes ran a PPO and a GRPO job,
created through a real `edgerlhf backend` with the seconds-long `PIPELINE` budget, over a data directory built once
per test run (under pytest-xdist the first worker to need it builds it under a file lock; the others wait for it).
Each worker then serves it with a backend of its own (`serve`). The report-contract, Compare and arena tests read
it; a test that writes works on a copy (`FinishedService.copy_data`).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgerlhf.contract import merge_overrides

from .backend import Backend, start_backend
from .procs import REPO_ROOT, service_env
from .tiny import PIPELINE

WORKER_TIMEOUT_S = 480
"""Both jobs take about a minute of CPU each; the rest is imports on a busy 2-core box."""

JOBS = {
    # Two precisions, so the study has two rows and int8 has a Spearman correlation with bf16; 3 steps to draw.
    "ppo": merge_overrides(PIPELINE, {"algorithm": "ppo", "ppo": {"steps": 3}}),
    # Groups of 2 answers per prompt.
    "grpo": merge_overrides(PIPELINE, {"algorithm": "grpo", "reward": {"precisions": ["bf16"]},
                                       "ppo": {"steps": 3, "samples_per_prompt": 2}}),
}
"""algorithm -> the overrides of its job (named `<algorithm>-run`)."""


@dataclass
class FinishedService:
    backend: Backend
    jobs: dict[str, int]
    """algorithm -> job id."""
    reports: dict[str, dict]
    """algorithm -> its job's reports as `GET /api/jobs/{id}/report` serves them."""

    @property
    def url(self) -> str:
        return self.backend.url

    @property
    def data_dir(self) -> Path:
        return self.backend.data_dir

    def copy_data(self, dest: Path) -> Path:
        """A copy of the data directory at `dest` (the database through SQLite's backup, consistent while the
        backend runs); returns `dest`."""
        shutil.copytree(self.data_dir, dest, ignore=shutil.ignore_patterns("edgerlhf.db*", "export"))
        with sqlite3.connect(self.data_dir / "edgerlhf.db") as source, sqlite3.connect(dest / "edgerlhf.db") as copy:
            source.backup(copy)
        return dest


def finished_jobs(shared_root: Path) -> tuple[Path, dict[str, int]]:
    """(data directory, algorithm -> job id) under `shared_root/service`, built by the first caller."""
    from filelock import FileLock

    root = shared_root / "service"
    root.mkdir(parents=True, exist_ok=True)
    data_dir, done = root / "data", root / "jobs.json"
    with FileLock(str(root / "lock")):
        if not done.exists():
            shutil.rmtree(data_dir, ignore_errors=True)  # what a build killed midway left
            backend = start_backend(data_dir, data_dir.parent / "build-backend.log")
            try:
                jobs = _run_jobs(backend)
            finally:
                backend.stop()
            done.write_text(json.dumps(jobs))
    return data_dir, json.loads(done.read_text())


def _run_jobs(backend: Backend) -> dict[str, int]:
    data_dir = backend.data_dir
    jobs = {}
    for algorithm, overrides in JOBS.items():
        created = httpx.post(f"{backend.url}/api/jobs", timeout=30, json={
            "preset": "tiny", "name": f"{algorithm}-run", "overrides": overrides})
        assert created.status_code == 201, created.text
        jobs[algorithm] = created.json()["id"]
    # Two workers, a job each on 2 cores; each drains the queue (`--once`) and exits.
    logs = [open(data_dir.parent / f"worker-{i}.log", "w") for i in range(2)]
    workers = [subprocess.Popen([sys.executable, "-m", "edgerlhf.cli", "worker", "--once", "--poll-interval", "0.2",
                                 "--worker-id", f"service-{i}"], cwd=REPO_ROOT, env=service_env(data_dir),
                                stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    try:
        for worker in workers:
            worker.wait(timeout=WORKER_TIMEOUT_S)
    finally:
        for worker, log in zip(workers, logs):
            if worker.poll() is None:
                worker.kill()
                worker.wait()
            log.close()
    states = {a: httpx.get(f"{backend.url}/api/jobs/{i}", timeout=30).json() for a, i in jobs.items()}
    tails = "\n".join((data_dir.parent / f"worker-{i}.log").read_text()[-3000:] for i in range(2))
    assert all(s["status"] == "succeeded" for s in states.values()), ({a: s["error"] for a, s in states.items()}, tails)
    return jobs


def serve(data_dir: Path, jobs: dict[str, int], log_path: Path) -> FinishedService:
    """A backend of its own over the finished jobs' data directory (stop it with `.backend.stop()`)."""
    backend = start_backend(data_dir, log_path)
    try:
        reports = {a: httpx.get(f"{backend.url}/api/jobs/{i}/report", timeout=30).json() for a, i in jobs.items()}
    except BaseException:
        backend.stop()
        raise
    return FinishedService(backend, jobs, reports)
