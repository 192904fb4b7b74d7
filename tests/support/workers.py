"""A data directory, its database (SQLite, or the URL given) and real `edgerlhf worker` processes on it (`Service`),
and the cheapest real jobs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from db import init_db, make_engine, make_sessionmaker, queue, read
from edgerlhf.config import load_config

from .procs import REPO_ROOT


class Service:
    """A data directory, its database, and worker processes started on it (`EDGERLHF_DATABASE_URL`)."""

    def __init__(self, tmp_path: Path, db_url: str | None = None):
        self.data_dir = tmp_path / "data"
        self.tmp_path = tmp_path
        self.db_url = db_url or f"sqlite:///{self.data_dir / 'edgerlhf.db'}"
        self.engine = make_engine(self.db_url)
        init_db(self.engine)
        self.sessions = make_sessionmaker(self.engine)
        self.workers: list[subprocess.Popen] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERLHF_") or k == "EDGERLHF_SHARED_DIR"}
        self.env.update({"EDGERLHF_DATA_DIR": str(self.data_dir), "EDGERLHF_DATABASE_URL": self.db_url,
                         "EDGERLHF_HEARTBEAT_SECONDS": "0.5",
                         "EDGERLHF_STALL_SECONDS": "4", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false",
                         "OMP_NUM_THREADS": "1"})

    def add_job(self, overrides: dict[str, Any], name: str = "test") -> int:
        config = load_config("tiny", overrides).to_dict()
        with self.sessions() as s:
            return queue.create_job(s, name=name, preset="tiny", config=config).id

    def start_worker(self, *args: str, name: str = "worker") -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}-{len(self.workers)}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "edgerlhf.cli", "worker", "--poll-interval", "0.2", *args],
                                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name  # type: ignore[attr-defined]
        self.workers.append(proc)
        return proc

    def job(self, job_id: int):
        with self.sessions() as s:
            return read.get_job(s, job_id)

    def points(self, job_id: int, key: str, stage: str | None = None):
        with self.sessions() as s:
            return read.metric_points(s, job_id, key, stage)

    def logs(self, job_id: int) -> list[str]:
        with self.sessions() as s:
            return [line.message for line in read.logs_after(s, job_id, limit=100_000)]

    def worker_logs(self) -> str:
        return "\n".join(f"--- {p.log_path}\n" + Path(p.log_path).read_text() for p in self.workers)

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.engine.dispose()
