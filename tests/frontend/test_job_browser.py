"""The Jobs list and a finished job's page in a real headless Chromium, over runs trained for real.

The session's service (`finished_service`): a PPO and a GRPO `tiny` job that real workers ran through every stage.
A dashboard process is started on it; in a 1,400 px wide window the Jobs list shows both jobs with their result
columns (reward change, its reading, KL) within the window, the PPO job's page opens with its verdict card (reading,
interval, KL from SFT) and every stage done, and its Config tab shows what differs from the preset and the
"Clone into New job" button. Screenshots go to `tests/artifacts/`: `jobs-list.png`, `job-finished.png`,
`job-config.png`.
"""

from __future__ import annotations

import re

import httpx
import pytest

from frontend.reports import BETTER, NO_CHANGE, WORSE
from tests.support.browser import ARTIFACTS, edgerlhf_processes

pytestmark = pytest.mark.slow

WIDTH = 1400
READING = re.compile("|".join(re.escape(r) for r in (BETTER, WORSE, NO_CHANGE)))


def test_jobs_list_and_a_finished_jobs_verdict_and_config_in_the_browser(browser, finished_service, tmp_path):
    from playwright.sync_api import expect

    api, jobs = finished_service.url, finished_service.jobs
    for job_id in jobs.values():  # the list's result columns come from the summary the backend computes
        summary = next(j for j in httpx.get(f"{api}/api/jobs", timeout=10).json()["items"] if j["id"] == job_id)
        assert summary["result"] is not None and summary["result"]["kl"] is not None, summary

    dashboard = edgerlhf_processes(tmp_path / "dashboard", ("frontend",), "job", EDGERLHF_BACKEND_URL=api)
    with dashboard as service:
        ui = service["ui"]
        page = browser.new_page(viewport={"width": WIDTH, "height": 1400})
        try:
            page.goto(ui, wait_until="domcontentloaded")
            table = page.locator('[data-testid="stDataFrame"]').first
            expect(table).to_be_visible(timeout=90_000)
            expect(table).to_contain_text("reading", timeout=30_000)
            page.wait_for_timeout(1500)
            box = table.bounding_box()
            assert box is not None and box["x"] + box["width"] <= WIDTH, f"the Jobs table overflows: {box}"
            scroller = table.locator(".dvn-scroller").first  # the grid's scrolling box: no sideways scroll
            widths = scroller.evaluate("e => [e.scrollWidth, e.clientWidth]")
            assert widths[0] <= widths[1] + 1, f"the Jobs table scrolls sideways: {widths}"
            page.screenshot(path=str(ARTIFACTS / "jobs-list.png"), full_page=True)

            page.goto(f"{ui}/job?job={jobs['ppo']}", wait_until="domcontentloaded")
            card = page.locator(".st-key-verdict")
            expect(card).to_be_visible(timeout=90_000)
            expect(card).to_contain_text("Result: PPO vs SFT")
            expect(card).to_contain_text(READING)
            expect(card).to_contain_text(re.compile(r"95% interval"))
            expect(card).to_contain_text("KL from SFT")
            expect(card).to_contain_text("nats per answer")
            expect(page.get_by_text("evaluation · succeeded")).to_be_visible()
            expect(page.get_by_text("\ufffd")).to_have_count(0)
            expect(page.get_by_text("Backend unreachable")).to_have_count(0)
            page.wait_for_timeout(1500)  # let plotly finish drawing before the picture
            page.screenshot(path=str(ARTIFACTS / "job-finished.png"), full_page=True)

            page.get_by_role("tab", name="Config").click()
            expect(page.get_by_text("What differs from the preset")).to_be_visible(timeout=30_000)
            expect(page.get_by_role("button", name="Clone into New job")).to_be_visible()
            expect(page.get_by_text("Resolved configuration")).to_be_visible()
            page.wait_for_timeout(1000)
            page.screenshot(path=str(ARTIFACTS / "job-config.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "job-failure.png"), full_page=True)
            raise
