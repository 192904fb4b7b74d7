"""Feedback in chat end to end in a real headless Chromium: backend and dashboard as real processes (issue 32).

The backend serves the tiny random models of `tests/support/runs.py`'s `make_jobs` (nothing trained: seconds). The
browser opens the Chat page on job 1's PPO policy, sends a message, gives the reply a thumb up and writes a better
answer in the reply's popover; both are stored through the real API with the conversation, the reply and the model.
Then the Feedback page lists them, reads the better answer whole, and deletes the thumb after asking. Screenshots go
to `tests/artifacts/chat-feedback.png` and `feedback-page.png`.
"""

from __future__ import annotations

import re

import httpx
import pytest

from tests.support.backend import CHAT_ENV
from tests.support.browser import ARTIFACTS, edgerlhf_processes
from tests.support.runs import make_jobs

pytestmark = pytest.mark.slow

MODEL = "job-1/ppo"
QUESTION = "What do jumping spiders eat?"
BETTER = "Mostly insects and other spiders, caught by a jump."


@pytest.fixture
def service(tmp_path):
    data = tmp_path / "data"
    make_jobs(data, running=False)
    env = {k: v for k, v in CHAT_ENV.items() if k != "EDGERLHF_API_TOKEN"}  # the dashboard sends no token here
    with edgerlhf_processes(data, ("backend", "frontend"), "chat-feedback", **env) as procs:
        yield procs


def settle(page) -> None:
    """Wait until the app has finished its rerun (Streamlit shows its status widget while a script runs)."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)


def test_a_thumb_and_a_better_answer_in_chat_are_stored_and_listed_on_the_feedback_page(browser, service):
    from playwright.sync_api import expect

    api, ui = service["api"], service["ui"]
    page = browser.new_page(viewport={"width": 1500, "height": 1600})
    try:
        page.goto(f"{ui}/chat?model={MODEL}", wait_until="domcontentloaded")
        message = page.get_by_test_id("stChatInputTextArea")
        expect(message).to_be_visible(timeout=90_000)
        message.fill(QUESTION)
        message.press("Enter")
        bubbles = page.get_by_test_id("stChatMessage")
        expect(bubbles).to_have_count(2, timeout=120_000)
        expect(bubbles.nth(0)).to_contain_text(QUESTION)
        # The reply drawn again with its feedback row once it has streamed in.
        row = page.locator(f'[class*="st-key-chat-{MODEL.replace("/", "-")}-1-row"]')
        expect(row).to_be_visible(timeout=60_000)
        settle(page)
        shown = bubbles.nth(1).inner_text()  # the reply (as markdown draws it) and its feedback row

        # A thumb up under the reply: stored at once, and the row says so.
        row.get_by_role("radio", name="Thumbs up").click()
        expect(row.get_by_text(re.compile(r"Feedback saved: #\d+$"))).to_be_visible(timeout=30_000)
        settle(page)

        # A better answer, written in the reply's popover and saved.
        row.get_by_role("button", name="Write a better answer").click()
        better = page.get_by_label("A better answer", exact=True)
        expect(better).to_be_visible(timeout=30_000)
        better.fill(BETTER)
        better.press("Tab")  # a text area sends its value when it loses focus
        page.get_by_role("button", name="Save", exact=True).click()
        expect(row.get_by_text(re.compile(r"Feedback saved: #\d+, #\d+$"))).to_be_visible(timeout=30_000)
        page.keyboard.press("Escape")  # close the popover for the screenshot
        settle(page)
        page.screenshot(path=str(ARTIFACTS / "chat-feedback.png"), full_page=True)

        # Both are in the backend: the thumb and the better answer, each with the conversation, the reply and model.
        listing = httpx.get(f"{api}/api/feedback", timeout=10).json()
        assert listing["total"] == 2, listing
        written, thumb = listing["items"]  # newest first
        assert thumb["rating"] == 1 and thumb["better"] is None
        assert written["better"] == BETTER and written["rating"] is None
        for row_ in (thumb, written):
            assert row_["model"] == MODEL and row_["messages"] == [{"role": "user", "content": QUESTION}]
            assert row_["completion_id"] and row_["sampling"]["max_tokens"] > 0
            words = re.findall(r"[A-Za-z]{4,}", row_["reply"])  # what was shown is what was stored
            assert words and sum(w in shown for w in words) >= 0.8 * len(words), (row_["reply"], shown)

        # The Feedback page lists both, newest first, and reads the newest (the better answer) whole.
        page.goto(f"{ui}/feedback", wait_until="domcontentloaded")
        rows = page.locator('[class*="st-key-fb-list"] tbody tr')
        expect(rows).to_have_count(2, timeout=60_000)
        expect(rows.nth(0).locator("td").first).to_have_text(str(written["id"]))
        expect(rows.nth(0)).to_contain_text(BETTER)
        expect(rows.nth(1).locator("td").nth(3)).to_have_text("up")
        for r in range(2):
            expect(rows.nth(r)).to_contain_text(MODEL)
            expect(rows.nth(r)).to_contain_text(QUESTION)
        expect(page.locator('[class*="st-key-fb-count"]')).to_contain_text("2 feedback row(s).")
        item = page.locator('[class*="st-key-fb-item"]')
        expect(item).to_contain_text(f"Feedback #{written['id']}")
        expect(item.locator('[class*="st-key-fb-better"]')).to_contain_text(BETTER)
        settle(page)
        page.screenshot(path=str(ARTIFACTS / "feedback-page.png"), full_page=True)

        # Filtered to thumbs up, then the thumb deleted after the question.
        page.locator('[data-testid="stSelectbox"]').filter(has_text="Rating").click()
        page.get_by_role("option", name="Thumbs up", exact=True).click()
        expect(rows).to_have_count(1, timeout=30_000)
        expect(page.locator('[class*="st-key-fb-count"]')).to_contain_text("1 feedback row(s) match (of 2 in all).")
        page.get_by_role("button", name="Delete feedback").click()
        expect(page.get_by_text("Data sets made from it before keep it")).to_be_visible(timeout=30_000)
        page.get_by_role("button", name="Yes, delete it").click()
        expect(page.get_by_text(f"Feedback #{thumb['id']} deleted.")).to_be_visible(timeout=30_000)
        expect(page.get_by_text("No feedback matches these filters.")).to_be_visible()
        assert [i["id"] for i in httpx.get(f"{api}/api/feedback", timeout=10).json()["items"]] == [written["id"]]
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "chat-feedback-failure.png"), full_page=True)
        raise
