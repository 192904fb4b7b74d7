"""The browser tests' machinery: Debian's Chromium for Playwright (browsers cannot be downloaded here), and the
`edgerlhf` processes (backend, worker, dashboard) a browser drives, on free ports over a data directory.

Without Chromium a browser test is skipped, except on CI (`CI=true`), where a missing browser fails it: there a skip
would let the browser tests pass by never running. Screenshots and the processes' logs go to
`$EDGERLHF_TEST_ARTIFACTS` (default `tests/artifacts/`, git-ignored).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .backend import start_backend
from .procs import REPO_ROOT, free_port, service_env, stop, wait_http

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# The `edgerlhf` console script of this interpreter's environment (else its `python -m` equivalent).
_SCRIPT = Path(sys.executable).parent / "edgerlhf"
EDGERLHF = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "edgerlhf.cli"]
ARTIFACTS = Path(os.environ.get("EDGERLHF_TEST_ARTIFACTS", REPO_ROOT / "tests" / "artifacts"))


def require_chromium() -> None:
    """Skip the calling test without Chromium, or fail it on CI."""
    if CHROMIUM.exists():
        return
    missing = (f"Debian's chromium is not installed ({CHROMIUM}); install it with `apt-get install -y chromium` "
               "(`make browser` does)")
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{missing}; CI=true, so the browser test may not be skipped", pytrace=False)
    pytest.skip(missing)


@contextmanager
def edgerlhf_processes(data_dir: Path, names: tuple[str, ...], log_prefix: str, **env: str) -> Iterator[dict]:
    """The `edgerlhf` processes `names` (backend, worker, frontend) over `data_dir`, each in its own process group,
    logging to `ARTIFACTS/<log_prefix>-<name>.log`: the backend as every test starts one (`start_backend`), the
    dashboard on a free port pointed at it (or at `env`'s EDGERLHF_BACKEND_URL). Yields {"api", "ui", "procs"} once
    the backend and the dashboard answer, and stops them all after."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    fport = free_port()
    procs: dict[str, subprocess.Popen] = {}
    backend = None
    try:
        if "backend" in names:
            backend = start_backend(data_dir, ARTIFACTS / f"{log_prefix}-backend.log", **env)
            procs["backend"] = backend.proc
            env = {"EDGERLHF_BACKEND_URL": backend.url, **env}
        environ = service_env(data_dir, EDGERLHF_FRONTEND_PORT=str(fport), **env)
        for name in (n for n in names if n != "backend"):
            with (ARTIFACTS / f"{log_prefix}-{name}.log").open("w") as log:
                procs[name] = subprocess.Popen([*EDGERLHF, name], cwd=REPO_ROOT, env=environ, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)
        if "frontend" in procs:
            wait_http(f"http://127.0.0.1:{fport}/_stcore/health", procs["frontend"], timeout=90)
        yield {"api": environ.get("EDGERLHF_BACKEND_URL"), "ui": f"http://127.0.0.1:{fport}", "procs": procs}
    finally:
        for proc in procs.values():
            stop(proc)


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the Streamlit select box whose label holds `label`: the box is clicked; if its list does not
    show the option (a scroll may close it), the option's start is typed into the box, which opens the list narrowed
    to it. Then the option is clicked (the box shows the pick in an input, not as text: what the pick did is for the
    caller to check)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    box = page.locator('[data-testid="stSelectbox"]').filter(has_text=label)
    box.click()
    choice = page.get_by_role("option").filter(has_text=option).first
    try:
        choice.wait_for(state="visible", timeout=5_000)
    except PlaywrightTimeout:
        page.keyboard.type(option[:24])
    choice.click()
