"""Processes and ports: the repository root, a free port, waiting for a URL or a condition, stopping a process and
whatever it started, and the environment of an `edgerlhf` service process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    """The first true value of `predicate()`, polled every `interval` seconds; an AssertionError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def wait_http(url: str, proc: subprocess.Popen | None = None, timeout: float = 90.0) -> None:
    """Until `url` answers below 500; a RuntimeError if `proc` exits first, a TimeoutError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args} exited with {proc.returncode} before answering {url}")
        try:
            if httpx.get(url, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a process started with `start_new_session=True`, and whatever it started (its process group)."""
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
    """The environment of an `edgerlhf` process on `data_dir`: no EDGERLHF_* setting of the developer's shell (but
    the shared directory's), one torch thread, the checkout first on the import path, then `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGERLHF_") or k == "EDGERLHF_SHARED_DIR"}
    env.update({"EDGERLHF_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                # The checkout first on the path: the processes import this tree's packages, however (or
                # whether) it was pip-installed.
                "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    env.update(extra)
    return env
