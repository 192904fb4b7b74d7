"""One way to start a real backend: `edgerlhf backend` in its own process (and process group) on a free 127.0.0.1
port over a data directory, returned once `/healthz` answers."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .procs import REPO_ROOT, free_port, service_env, stop, wait_http

CHAT_TOKEN = "chat-test-token"
CHAT_MAX_TOKENS = 48
CHAT_ENV = {"EDGERLHF_API_TOKEN": CHAT_TOKEN, "EDGERLHF_DEVICE": "cpu", "EDGERLHF_CHAT_MAX_TOKENS": str(CHAT_MAX_TOKENS),
            "EDGERLHF_CHAT_CACHE_SIZE": "2"}
"""The chat tests' backend: their API token, chat on the CPU, at most 48 new tokens, two models cached."""


@dataclass
class Backend:
    url: str
    data_dir: Path
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(repr=False, default_factory=dict)

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    @property
    def db_url(self) -> str:
        return self.env.get("EDGERLHF_DATABASE_URL") or f"sqlite:///{self.data_dir / 'edgerlhf.db'}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        stop(self.proc)


def start_backend(data_dir: Path, log_path: Path | None = None, timeout: float = 90, **env: str) -> Backend:
    """`edgerlhf backend` over `data_dir` (created if missing) with the settings `env` (EDGERLHF_API_TOKEN,
    EDGERLHF_DATABASE_URL, ...); its output goes to `log_path` (default `<data_dir>/backend.log`)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_path or data_dir / "backend.log"
    port = free_port()
    environ = service_env(data_dir, **env)
    with open(log_path, "wb") as log:  # the child keeps its own copy of the handle
        proc = subprocess.Popen([sys.executable, "-m", "edgerlhf.cli", "backend", "--port", str(port)], cwd=REPO_ROOT,
                                env=environ, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    backend = Backend(f"http://127.0.0.1:{port}", data_dir, proc, log_path, env)
    try:
        wait_http(f"{backend.url}/healthz", proc, timeout=timeout)
    except (RuntimeError, TimeoutError) as exc:
        stop(proc)
        raise AssertionError(f"the backend did not start ({exc}):\n{backend.log()[-3000:]}") from None
    return backend
