"""Fixtures of the dashboard tests: a fresh real backend process on a real SQLite file, the session's service with a
finished PPO and GRPO job, and a real headless Chromium.

How they are started lives in `tests/support/` (`backend.py`, `browser.py`); what a running job would write is
written with `tests/support/runs.py`'s `JobWriter` (the worker's own queue functions).
"""

from __future__ import annotations

import os

import pytest

from tests.support.backend import start_backend
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium
from tests.support.service import finished_jobs, serve


@pytest.fixture
def backend(tmp_path):
    """`edgerlhf backend` over an empty data directory of the test's own."""
    b = start_backend(tmp_path / "data")
    yield b
    b.stop()


@pytest.fixture(scope="session")
def finished_service(tmp_path_factory):
    """The session's backend over a PPO and a GRPO job that real workers ran (`tests/support/service.py`). Its
    tests read it; one that writes takes `copy_data`. Under pytest-xdist the workers share the jobs (built once) and
    each serves them with a backend of its own."""
    base = tmp_path_factory.getbasetemp()
    data_dir, jobs = finished_jobs(base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base)
    service = serve(data_dir, jobs, tmp_path_factory.mktemp("service-backend") / "backend.log")
    yield service
    service.backend.stop()


@pytest.fixture
def browser():
    """A headless Chromium (Debian's, through Playwright); skips without it, or fails on CI."""
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()
