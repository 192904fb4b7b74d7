"""The backend's API docs work offline (issue 33): `/docs` (Swagger UI) and `/redoc` load their scripts and styles from
the backend itself, not from a CDN, and in a real headless Chromium that may reach nothing but the backend `/docs`
draws the API's operations. The screenshot goes to `tests/artifacts/docs.png`.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin, urlsplit

import httpx
import pytest

from tests.support.browser import ARTIFACTS

ASSET = re.compile(r"""(?:src|href)=["']([^"']+)["']""")


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_the_docs_pages_load_only_assets_the_backend_serves(backend, page):
    html = httpx.get(backend.url + page, timeout=30)
    assert html.status_code == 200, html.text
    assets = ASSET.findall(html.text)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        assert not urlsplit(asset).netloc, f"{page} loads {asset} from another host"
        answer = httpx.get(urljoin(backend.url + page, asset), timeout=30)
        assert answer.status_code == 200 and answer.content, (asset, answer.status_code)
    assert "cdn" not in html.text.lower(), html.text


@pytest.mark.slow
def test_docs_render_the_operations_in_chromium_without_a_network(browser, backend):
    from playwright.sync_api import expect

    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    refused: list[str] = []

    def only_the_backend(route) -> None:  # as on a machine without internet: nothing else answers
        if route.request.url.startswith(backend.url):
            route.continue_()
        else:
            refused.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_backend)
    try:
        page.goto(f"{backend.url}/docs", wait_until="domcontentloaded")
        operations = page.locator(".opblock")
        expect(operations.first).to_be_visible(timeout=60_000)
        expect(page.locator(".opblock-summary-path").filter(has_text=re.compile(r"^/api/jobs$")).first).to_be_visible()
        assert operations.count() > 20, "every route of the API is listed"
        page.screenshot(path=str(ARTIFACTS / "docs.png"), full_page=False)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "docs-failure.png"), full_page=True)
        raise
    finally:
        page.close()
    assert not refused, f"the docs asked for {refused}"
