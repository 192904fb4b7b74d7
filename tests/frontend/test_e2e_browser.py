"""End to end in a real headless Chromium: backend, worker and dashboard as real processes.

The browser opens the dashboard, submits a `tiny` job through the New job form (small overrides so PPO
steps come quickly), lands on the job's page and, without reloading, waits until the reward curve shows
points and a sample generation appears. Screenshots go to `$EDGERLHF_TEST_ARTIFACTS` (default
`tests/artifacts/`, git-ignored).

Chromium is Debian's `chromium` package (`apt-get install -y chromium`); browsers cannot be downloaded
here, so Playwright is pointed at `/usr/bin/chromium`. Without it the test is skipped, except on CI
(`CI=true`), where a missing browser fails it.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from tests.support.browser import ARTIFACTS, edgerlhf_processes
from tests.support.tiny import MODEL

# What the test types into the form (label -> value); everything else stays at the `tiny` preset.
FORM = {
    "SFT steps": "6",
    "Reward steps (per precision)": "6",
    "PPO steps": "4",
    "PPO rollout batch size": "4",
    "PPO minibatch size": "2",
    "Log samples every N steps": "1",
    "Max pairs (empty: all)": "120",
    "Evaluation prompts": "4",
}
# Fields the form has no widget for go through its "Extra overrides (JSON)" box: the budgets above, on the tiny
# budgets' 1-layer model without the warm-up, so the steps come in seconds (what is watched is the page, not learning).
EXTRA = {"model": MODEL, "warmup": {"steps": 0},
         "sft": {"eval_every": 3, "sample_every": 3, "batch_size": 4},
         "reward": {"eval_every": 3, "batch_size": 4},
         "ppo": {"checkpoint_every": 2, "ppo_epochs": 1},
         "evaluate": {"response_length": 16, "samples_per_prompt": 1}}
PIPELINE_TIMEOUT_S = 420

pytestmark = pytest.mark.slow


@pytest.fixture
def service(tmp_path):
    """backend + worker + dashboard on free ports and a temp data dir, as `edgerlhf` commands."""
    with edgerlhf_processes(tmp_path / "data", ("backend", "worker", "frontend"), "e2e") as procs:
        yield procs


def _job_status(api: str, job_id: int) -> dict:
    return httpx.get(f"{api}/api/jobs/{job_id}", timeout=10).json()


def test_submit_tiny_job_and_watch_it_live(browser, service):
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import expect

    api, ui = service["api"], service["ui"]
    page = browser.new_page(viewport={"width": 1500, "height": 1800})
    try:
        page.goto(f"{ui}/new", wait_until="domcontentloaded")
        expect(page.get_by_label("PPO steps", exact=True)).to_be_visible(timeout=90_000)
        page.get_by_label("Job name", exact=True).fill("e2e-tiny")
        for label, value in FORM.items():
            box = page.get_by_label(label, exact=True)
            box.fill(value)
            box.press("Tab")
        # Reward-model precisions: keep bf16 only (remove the int8/int4 tags of the tiny preset).
        precisions = page.locator('[data-testid="stMultiSelect"]').filter(has_text="Reward-model precisions")
        for tag in ("int8", "int4"):
            precisions.get_by_role("button", name=f"Remove {tag}", exact=True).first.click()
        expect(precisions.get_by_role("button", name="Remove int4", exact=True)).to_have_count(0)
        page.get_by_label("Extra overrides (JSON, applied last)", exact=True).fill(json.dumps(EXTRA))
        page.screenshot(path=str(ARTIFACTS / "e2e-new-job-form.png"), full_page=True)
        page.get_by_role("button", name="Launch job").click()

        # Submitting opens the job's page (the job id in the URL, so a reload would re-attach).
        page.wait_for_url("**/job?job=*", timeout=60_000)
        job_id = int(page.url.split("job=")[1].split("&")[0])
        job = _job_status(api, job_id)
        assert job["config"]["ppo"]["steps"] == 4 and job["config"]["reward"]["precisions"] == ["bf16"]
        assert job["config"]["sft"]["max_steps"] == 6 and job["config"]["ppo"]["checkpoint_every"] == 2
        assert job["config"]["warmup"]["steps"] == 0 and job["config"]["model"]["n_embd"] == MODEL["n_embd"]

        # Live, without reloading: the reward curve gets points and a sample generation shows up.
        # (A marker on `window` would be lost by any reload or navigation; it is checked at the end.)
        page.evaluate("window.__no_reload = true")
        reward_chart = page.locator(".js-plotly-plot").filter(has_text="Reward (PPO batch mean")
        deadline = time.monotonic() + PIPELINE_TIMEOUT_S
        while time.monotonic() < deadline:
            status = _job_status(api, job_id)
            assert status["status"] not in ("failed", "cancelled"), status.get("error")
            if reward_chart.locator(".scatterlayer .points path").count() > 0:
                break
            page.wait_for_timeout(2000)
        else:
            page.screenshot(path=str(ARTIFACTS / "e2e-timeout.png"), full_page=True)
            pytest.fail(f"no reward point on the chart after {PIPELINE_TIMEOUT_S}s; job: {status}")
        sample = page.locator('[class*="st-key-sample-card-"]').first
        expect(sample).to_be_visible(timeout=60_000)
        expect(sample).to_contain_text("Response")
        expect(page.get_by_text("Backend unreachable")).to_have_count(0)
        page.wait_for_timeout(1500)  # let plotly finish drawing before the picture
        page.screenshot(path=str(ARTIFACTS / "e2e-job-live.png"), full_page=True)
        try:  # a close-up of the card; an artifact only (a refresh may swap the card mid-shot)
            sample.screenshot(path=str(ARTIFACTS / "e2e-sample.png"), timeout=10_000)
        except PlaywrightError as exc:
            print(f"no close-up of the sample card: {exc}")

        # The job finishes on its own; the page follows it to the end, still without a reload.
        deadline = time.monotonic() + PIPELINE_TIMEOUT_S
        while (status := _job_status(api, job_id))["status"] not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, f"job not finished after {PIPELINE_TIMEOUT_S}s: {status}"
            page.wait_for_timeout(2000)
        assert status["status"] == "succeeded", status.get("error")
        expect(page.get_by_text("evaluation · succeeded")).to_be_visible(timeout=30_000)
        page.get_by_role("tab", name="Report").click()
        expect(page.get_by_text("SFT vs PPO", exact=True)).to_be_visible(timeout=30_000)
        assert page.evaluate("window.__no_reload === true"), "the page was reloaded"
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "e2e-job-report.png"), full_page=True)
        page.get_by_role("tab", name="SFT & reward model").click()
        expect(page.locator(".js-plotly-plot").filter(has_text="Precision study")).to_be_visible(timeout=30_000)
        page.wait_for_timeout(1000)
        page.screenshot(path=str(ARTIFACTS / "e2e-job-training.png"), full_page=True)

        # The probe prompts of the finished job, answered by each checkpoint side by side.
        page.goto(f"{ui}/probes?job={job_id}", wait_until="domcontentloaded")
        expect(page.locator('[class*="st-key-probe-1"]')).to_be_visible(timeout=60_000)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(ARTIFACTS / "e2e-probes.png"), full_page=True)
    finally:
        page.close()
