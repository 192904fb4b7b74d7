"""The dashboard in the tests: Streamlit's AppTest on the real app (run in the test's process, pointed at a backend by
the `dashboard_env` fixture), what it drew, and API clients that answer fixed bodies."""

from __future__ import annotations

import json

import httpx

from .procs import REPO_ROOT

APP = REPO_ROOT / "frontend" / "streamlit_app.py"
TIMEOUT = 60
"""Seconds per AppTest script run: the first import of plotly/pandas on a busy 2-core box is slow."""


def walk(node):
    """Every element of an AppTest tree in display order."""
    yield node
    children = getattr(node, "children", None)
    if isinstance(children, dict):
        for key in sorted(children):
            yield from walk(children[key])


def open_job_page(job_id: int, check: bool = True):
    """A fresh browser session (a reload) opening `/job?job=<id>`, run once (and, with `check`, without exception)."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["job"] = str(job_id)
    at.run()
    at.switch_page("app_pages/job.py").run()
    if check:
        assert not at.exception, at.exception
    return at


def plotly_trace(at, title: str, trace: str) -> dict:
    """The trace named `trace` of the plotly chart whose title holds `title`."""
    for el in at.get("plotly_chart"):
        spec = json.loads(el.proto.spec)
        if title in json.dumps(spec["layout"].get("title", "")):
            for t in spec["data"]:
                if t.get("name") == trace:
                    return t
    raise AssertionError(f"no chart {title!r} with trace {trace!r}")


def answering(routes: dict[str, object]):
    """An `ApiClient` whose backend answers `routes` (path -> JSON body), for shapes the real backend never
    sends (a renamed field): the client must refuse them."""
    from frontend.api_client import ApiClient

    client = ApiClient("http://backend.test")
    client._http = httpx.Client(base_url=client.base_url, transport=httpx.MockTransport(
        lambda request: httpx.Response(200, json=routes[request.url.path])))
    return client
