"""Your own data end to end in a real headless Chromium: backend, worker and dashboard as real processes.

The browser uploads a conversational preference file (the shared HH-RLHF sample converted by the test into
UltraFeedback's shape: chosen and rejected as message lists) on the Data sets page, sees it detected and previewed
(prompt and answers in separate columns, the length histograms, the drops at the budgets), then picks it as the
preference data of a data-only job on the New job form and launches it; the worker reads the stored file and the
job succeeds. Screenshots go to `tests/artifacts/datasets-*.png`.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from edgerlhf.config import HH_PREFS_SAMPLE
from edgerlhf.dialogue import normalize_prompt, to_messages

from tests.support.browser import ARTIFACTS, choose, edgerlhf_processes

pytestmark = pytest.mark.slow

N_ROWS = 300
JOB_TIMEOUT_S = 420
"""A data-only job: the job process imports torch and reads the tokenizer on a busy 2-core box."""


@pytest.fixture
def service(tmp_path):
    with edgerlhf_processes(tmp_path / "data", ("backend", "worker", "frontend"), "datasets") as procs:
        yield procs


def chat_pairs(path, n: int) -> list[dict]:
    """The first `n` pairs of the shared sample as conversations, written to `path` as JSON Lines."""
    rows = []
    with open(HH_PREFS_SAMPLE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            turns = to_messages(normalize_prompt(row["prompt"]))
            rows.append({"chosen": [*turns, {"role": "assistant", "content": row["chosen"].strip()}],
                         "rejected": [*turns, {"role": "assistant", "content": row["rejected"].strip()}]})
            if len(rows) == n:
                break
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_upload_preview_and_launch_a_job_on_your_own_data(browser, service, tmp_path):
    from playwright.sync_api import expect

    api, ui = service["api"], service["ui"]
    upload = tmp_path / "chat-prefs.jsonl"
    rows = chat_pairs(upload, N_ROWS)
    first_question, first_answer = rows[0]["chosen"][-2]["content"], rows[0]["chosen"][-1]["content"]
    # Tall enough that neither page scrolls (Streamlit scrolls inside its own container, so a full-page screenshot
    # is the viewport, and a select box's list may close while the container scrolls).
    page = browser.new_page(viewport={"width": 1500, "height": 4000})
    try:
        page.goto(f"{ui}/datasets", wait_until="domcontentloaded")
        uploader = page.locator('[data-testid="stFileUploader"]')
        expect(uploader).to_be_visible(timeout=90_000)
        uploader.locator('input[type="file"]').set_input_files(str(upload))
        expect(uploader).to_contain_text(upload.name, timeout=30_000)  # in the dashboard's hands
        page.locator('[class*="st-key-ds-upload-submit"] button').click()
        stored = page.locator('[data-testid="stAlert"]').filter(has_text=f"Stored {upload.name} as data set #1")
        expect(stored).to_be_visible(timeout=60_000)
        expect(stored).to_contain_text(f"preference data, {N_ROWS} rows")
        (dataset,) = httpx.get(f"{api}/api/datasets", timeout=10).json()["items"]
        assert (dataset["kind"], dataset["conversational"], dataset["rows"]) == ("preference", True, N_ROWS)

        # The preview: the first row's prompt and its answers side by side, the histograms, the drops.
        preview = page.locator('[class*="st-key-ds-preview"]')
        expect(preview).to_contain_text("preference data (conversational)", timeout=120_000)
        expect(preview).to_contain_text("Dropped at these budgets")
        row = page.locator('[class*="st-key-ds-row-0"]')
        prompt_side, answer_side = row.locator('[data-testid="stColumn"]').nth(0), row.locator(
            '[data-testid="stColumn"]').nth(1)
        # The rows stream in after the charts: their code blocks may take a while on a busy box.
        expect(prompt_side).to_contain_text(first_question[:40], timeout=60_000)
        expect(prompt_side).to_contain_text("Assistant:")  # the HH text: the tiny tokenizer has no chat template
        expect(answer_side).to_contain_text(first_answer[:40], timeout=60_000)
        expect(answer_side).to_contain_text("chosen")
        expect(answer_side).to_contain_text("rejected")
        assert first_answer[:40] not in prompt_side.inner_text(), "prompt and answer are apart"
        expect(preview.locator('[data-testid="stPlotlyChart"]')).to_have_count(2, timeout=60_000)
        page.wait_for_timeout(1000)  # let the charts draw
        page.screenshot(path=str(ARTIFACTS / "datasets-preview.png"), full_page=True)

        # The New job form picks it as the preference data of a data-only job.
        page.goto(f"{ui}/new", wait_until="domcontentloaded")
        expect(page.get_by_role("button", name="Launch job")).to_be_visible(timeout=90_000)
        expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)  # the page has run
        choose(page, "Preference data", f"#1 {upload.name} (preference, conversational, {N_ROWS} rows)")
        extra = page.get_by_label("Extra overrides (JSON, applied last)", exact=True)
        extra.fill(json.dumps({"stages": ["data"], "data": {"max_pairs": 20}}))
        extra.press("Tab")
        expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)  # its rerun is over
        page.screenshot(path=str(ARTIFACTS / "datasets-new-job.png"), full_page=True)
        page.get_by_role("button", name="Launch job").click()
        page.wait_for_url("**/job?job=*", timeout=60_000)
        job_id = int(page.url.split("job=")[1].split("&")[0])
        job = httpx.get(f"{api}/api/jobs/{job_id}", timeout=10).json()
        assert job["config"]["stages"] == ["data"] and job["config"]["data"]["source"] == dataset["source"]

        # The worker reads the stored file.
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while (job := httpx.get(f"{api}/api/jobs/{job_id}", timeout=10).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, f"job {job_id} still {job['status']} after {JOB_TIMEOUT_S}s"
            time.sleep(2)
        assert job["status"] == "succeeded", job["error"]
        logs = httpx.get(f"{api}/api/jobs/{job_id}/logs", params={"limit": 500}, timeout=10).json()["items"]
        assert any(dataset["source"] in line["message"] for line in logs), [line["message"] for line in logs][:20]
        page.reload(wait_until="domcontentloaded")
        expect(page.get_by_text(f"✓ Job #{job_id}")).to_be_visible(timeout=60_000)  # the job page says it succeeded
        page.screenshot(path=str(ARTIFACTS / "datasets-job.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "datasets-failure.png"), full_page=True)
        raise
