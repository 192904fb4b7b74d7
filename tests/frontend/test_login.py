"""The dashboard's login (issue 28, finding 1), with Streamlit's AppTest against a real backend that needs a token.

The dashboard is no proxy holding the token for every visitor: each browser session types the token once, keeps it
in its own session state and calls the backend with it; the server's `EDGERLHF_API_TOKEN` (which `edgerlhf up`
hands every child, the dashboard included) is never used for a visitor. Until a session has logged in it sees the
login form and nothing else: no job list, no launch button, and the backend gets no request that it accepts.
"""

from __future__ import annotations

import httpx
import pytest
from streamlit.testing.v1 import AppTest

from tests.support.backend import start_backend
from tests.support.dashboard import APP, TIMEOUT
from tests.support.tiny import DATA_ONLY

TOKEN = "dashboard-login-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A backend whose every route needs the token, holding one job."""
    b = start_backend(tmp_path_factory.mktemp("login") / "data", EDGERLHF_API_TOKEN=TOKEN)
    httpx.post(f"{b.url}/api/jobs", json={"preset": "tiny", "name": "guarded", "overrides": DATA_ONLY},
               headers=AUTH, timeout=30).raise_for_status()
    yield b
    b.stop()


def jobs(backend) -> list[str]:
    return [j["name"] for j in httpx.get(f"{backend.url}/api/jobs", headers=AUTH, timeout=30).json()["items"]]


def launch_buttons(at) -> list:
    return [b for b in at.button if "Launch" in (b.label or "")]


def log_in(at, token: str) -> None:
    at.text_input(key="login_token").input(token)
    at.button(key="login_submit").click().run()
    assert not at.exception, at.exception


def test_an_anonymous_session_can_do_nothing_until_it_types_the_token(guarded, dashboard_env):
    # The server's environment holds the token, as under `edgerlhf up`: a visitor must type it all the same.
    dashboard_env(guarded.url, token=TOKEN)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    assert at.text_input(key="login_token").proto.type == at.text_input(key="login_token").proto.PASSWORD
    assert not at.dataframe, "no job list before the login"
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    assert not launch_buttons(at), "no launch button before the login"
    assert at.text_input(key="login_token") is not None

    log_in(at, "not-the-token")
    assert any("wrong" in e.value.lower() for e in at.error), [e.value for e in at.error]
    assert not launch_buttons(at)
    assert jobs(guarded) == ["guarded"]

    log_in(at, TOKEN)
    assert not at.error, [e.value for e in at.error]
    launch_buttons(at)[0].click().run()
    assert not at.exception, at.exception
    assert len(jobs(guarded)) == 2, "a logged-in session launches jobs"
    at.switch_page("app_pages/jobs.py").run()
    assert sorted(at.dataframe[0].value["name"].tolist()) == sorted(jobs(guarded))

    # The token stays in that session: another browser session starts anonymous.
    other = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not other.dataframe and other.text_input(key="login_token") is not None

    # Logging out forgets it.
    at.button(key="logout").click().run()
    at.switch_page("app_pages/jobs.py").run()
    assert not at.dataframe and at.text_input(key="login_token") is not None


def test_a_backend_without_a_token_needs_no_login(tmp_path, dashboard_env):
    b = start_backend(tmp_path / "data")
    try:
        httpx.post(f"{b.url}/api/jobs", json={"preset": "tiny", "name": "open", "overrides": DATA_ONLY},
                   timeout=30).raise_for_status()
        dashboard_env(b.url)
        at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
        assert not at.exception, at.exception
        assert not [t for t in at.text_input if t.key == "login_token"]
        assert at.dataframe[0].value["name"].tolist() == ["open"]
    finally:
        b.stop()
