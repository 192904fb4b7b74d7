"""Fixtures of the dashboard tests: a real backend process on a real SQLite file, and helpers to write
what a running job would write (through the `db.queue` functions the worker itself uses)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
APP = REPO / "frontend" / "streamlit_app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with `start_new_session=True`, and whatever it started."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=timeout)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def service_env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERLHF_") or k == "EDGERLHF_SHARED_DIR"}
    env.update({"EDGERLHF_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                # The checkout first on the path: the processes import this tree's packages, however (or
                # whether) it was pip-installed.
                "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])})
    env.update(extra)
    return env


@dataclass
class Backend:
    url: str
    data_dir: Path
    proc: subprocess.Popen
    log: Path

    @property
    def db_url(self) -> str:
        return f"sqlite:///{self.data_dir / 'edgerlhf.db'}"

    def stop(self) -> None:
        stop(self.proc)


def start_backend(data_dir: Path, **env: str) -> Backend:
    port = free_port()
    log = data_dir / "backend.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "backend.main:app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "warning"],
        cwd=REPO, env=service_env(data_dir, **env), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    backend = Backend(f"http://127.0.0.1:{port}", data_dir, proc, log)
    try:
        wait_http(backend.url + "/healthz", proc, timeout=60)
    except Exception:
        stop(proc)
        raise RuntimeError(f"backend did not start:\n{log.read_text()[-3000:]}")
    return backend


def answering(routes: dict[str, object]):
    """An `ApiClient` whose backend answers `routes` (path -> JSON body), for shapes the real backend never
    sends (a renamed field): the client must refuse them."""
    from frontend.api_client import ApiClient

    client = ApiClient("http://backend.test")
    client._http = httpx.Client(base_url=client.base_url, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json=routes[request.url.path])))
    return client


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    b = start_backend(tmp_path_factory.mktemp("data"))
    yield b
    b.stop()


@pytest.fixture
def dashboard_env(monkeypatch):
    """Point the in-process dashboard (AppTest runs it in this process) at a backend URL."""
    from edgerlhf.settings import get_settings

    def point_at(url: str, token: str | None = None) -> None:
        for key in [k for k in os.environ if k.startswith("EDGERLHF_") and k != "EDGERLHF_SHARED_DIR"]:
            monkeypatch.delenv(key)
        monkeypatch.setenv("EDGERLHF_BACKEND_URL", url)
        if token:
            monkeypatch.setenv("EDGERLHF_API_TOKEN", token)
        get_settings.cache_clear()

    yield point_at
    get_settings.cache_clear()


def sft_report(**fields) -> dict:
    """An SFT stage's report as the stage writes it (`edgerlhf.reports.SFTReport`, as JSON data)."""
    from edgerlhf.reports import SFTReport

    report = {"seconds": 12.5, "device": "cpu", "compute_dtype": "float32", "parameters": 120_000,
              "trainable_parameters": 4_096, "train_examples": 480, "eval_examples": 120, "steps": 10,
              "train_seconds": 11.0, "first_loss": 3.0, "final_loss": 2.1, "train_loss": 2.4, "eval_loss": 2.2,
              "perplexity": 9.03, "completion_only_loss": True, "memory": {"mem/rss_mb": 509.0},
              "probes": [{"step": 10, "prompt": "\n\nHuman: hi\n\nAssistant:", "response": "hello", "gold": -1.0}]}
    return SFTReport.model_validate({**report, **fields}).model_dump(mode="json")


class JobWriter:
    """Writes what a worker running a job writes, with the worker's own queue functions."""

    def __init__(self, db_url: str, job_id: int, worker_id: str = "test-worker"):
        from db.session import make_engine, make_sessionmaker

        self.engine = make_engine(db_url)
        self.Session = make_sessionmaker(self.engine)
        self.job_id = job_id
        self.worker_id = worker_id
        self.t = time.time()

    def claim(self) -> None:
        from db import queue

        with self.Session() as s:
            job = queue.claim_next(s, self.worker_id)
            assert job is not None and job.id == self.job_id, "expected to claim the test's job"

    def begin(self, stage: str) -> None:
        from db import queue

        with self.Session() as s:
            queue.begin_stage(s, self.job_id, stage, attempt=1)

    def end(self, stage: str, report: dict | None = None, overall: float | None = None) -> None:
        """End a stage with its report (the JSON data of its `edgerlhf.reports` model, as the worker stores it)."""
        from db import queue

        with self.Session() as s:
            queue.end_stage(s, self.job_id, stage, report, overall)

    def metrics(self, stage: str, rows: dict[str, list[float | None]], start: int = 0) -> int:
        """rows: key -> values for steps start, start+1, ...; returns the number of points written."""
        from db import queue

        batch = []
        for key, values in rows.items():
            for i, v in enumerate(values):
                self.t += 0.01
                batch.append((stage, key, start + i, v, self.t))
        with self.Session() as s:
            queue.record(s, self.job_id, metrics=batch, progress=(stage, 0.5, 0.5))
        return len(batch)

    def samples(self, stage: str, samples: list[dict]) -> None:
        from db import queue

        rows = [{"stage": stage, "kind": "sample", "checkpoint": None, "seq": 0, "time": time.time(), **s}
                for s in samples]
        with self.Session() as s:
            queue.record(s, self.job_id, samples=rows)

    def log(self, message: str, stage: str | None = None) -> None:
        from db import queue

        with self.Session() as s:
            queue.record(s, self.job_id, logs=[(time.time(), "info", stage, message)])

    def finish(self) -> None:
        from db import queue

        with self.Session() as s:
            queue.finish(s, self.job_id, self.worker_id)

    def close(self) -> None:
        self.engine.dispose()
