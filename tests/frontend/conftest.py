"""Fixtures of the dashboard tests: a fresh real backend process on a real SQLite file and a real headless Chromium
(the session's service with a finished PPO and GRPO job, `finished_service`, is the root conftest's).

How they are started lives in `tests/support/` (`backend.py`, `browser.py`); what a running job would write is
written with `tests/support/runs.py`'s `JobWriter` (the worker's own queue functions).
"""

from __future__ import annotations

import pytest

from tests.support.backend import start_backend
from tests.support.browser import CHROMIUM, CHROMIUM_ARGS, require_chromium


@pytest.fixture
def backend(tmp_path):
    """`edgerlhf backend` over an empty data directory of the test's own."""
    b = start_backend(tmp_path / "data")
    yield b
    b.stop()


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
