"""`edgerlhf up` (behind `make run`): three real processes come up, answer, and all go away on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from .conftest import REPO_ROOT, free_port


def wait_for(url: str, deadline: float) -> httpx.Response:
    last = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if response.status_code == 200:
                return response
            last = response.status_code
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer 200 in time (last: {last})")


@pytest.mark.slow
def test_up_serves_backend_and_dashboard_and_stops_cleanly_on_ctrl_c(tmp_path):
    backend_port, frontend_port = free_port(), free_port()
    env = {**os.environ, "EDGERLHF_DATA_DIR": str(tmp_path / "data"),
           "EDGERLHF_BACKEND_PORT": str(backend_port), "EDGERLHF_FRONTEND_PORT": str(frontend_port)}
    env.pop("EDGERLHF_API_TOKEN", None)
    up = subprocess.Popen([sys.executable, "-m", "edgerlhf.cli", "up"], cwd=REPO_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        health = wait_for(f"http://127.0.0.1:{backend_port}/healthz", deadline)
        assert health.json()["status"] == "ok"
        page = wait_for(f"http://127.0.0.1:{frontend_port}/", deadline)
        assert "<html" in page.text.lower()
        # The worker announces itself through the database; the backend reports it.
        while time.monotonic() < deadline:
            system = httpx.get(f"http://127.0.0.1:{backend_port}/api/system", timeout=5).json()
            if system["worker"]["alive"]:
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"worker never reported alive: {system}")
        children = psutil.Process(up.pid).children(recursive=True)
        assert len(children) >= 3
    finally:
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
    assert up.returncode == 0, output
    assert "backend:" in output and "dashboard:" in output
    time.sleep(0.5)
    alive = [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    assert not alive, f"left behind: {[c.cmdline() for c in alive]}"
