"""The arena end to end in a real headless Chromium: backend and dashboard as real processes.

A copy of the session service's data (`finished_service`: a PPO job and a GRPO job that real workers trained, so
both serve their SFT and aligned policies) is served by a backend and a dashboard of the test's own. The browser
opens the Arena, picks the PPO job's policy against the GRPO job's SFT policy, takes a held-out prompt of the PPO
job (a dialogue: its last human turn, the question, is shown whole in the prompt box and above the answers, its
earlier turns folded), gets both answers streamed from the chat API with the names hidden, votes "A is better" with a
better answer of its own, and then sees the names, the vote in the list and both models on the leaderboard; exports
the votes as JSONL; launches a job on the votes from the New job form; and deletes the vote. A second battle, typed,
compares two samples of one model and ends in a tie: stored, no pair, no rating. Last, a message on the Chat page.
Screenshots go to `tests/artifacts/arena-*.png`, `new-job.png` and `chat.png`.
"""

from __future__ import annotations

import json
import re

import httpx
import pytest

from edgerlhf.contract import PROMPTS_TEST
from tests.support.backend import CHAT_ENV
from tests.support.browser import ARTIFACTS, edgerlhf_processes

pytestmark = pytest.mark.slow

QUESTION = "How far can a jumping spider jump?"
EARLIER = "Hi, I have a question about spiders."
HELD_OUT = f"Human: {EARLIER}\n\nAssistant: Sure, go ahead.\n\nHuman: {QUESTION}"
BETTER = "Up to about fifty times its own body length."


@pytest.fixture
def service(finished_service, tmp_path):
    """Backend and dashboard over a copy of the session service's data, the PPO job's held-out prompt set to one."""
    data = finished_service.copy_data(tmp_path / "data")
    ppo, grpo = (f"job-{finished_service.jobs[a]}" for a in ("ppo", "grpo"))
    held_out = data / "runs" / ppo / PROMPTS_TEST  # where a job's held-out prompts come from
    held_out.write_text(json.dumps({"prompt": f"\n\n{HELD_OUT}\n\nAssistant:"}))
    env = {k: v for k, v in CHAT_ENV.items() if k != "EDGERLHF_API_TOKEN"}  # the dashboard sends no token here
    with edgerlhf_processes(data, ("backend", "frontend"), "arena", **env) as procs:
        yield {**procs, "ppo": ppo, "grpo": grpo}


def settle(page) -> None:
    """Wait until the app has finished its rerun (Streamlit shows its status widget while a script runs)."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the Streamlit select box labelled `label`."""
    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_vote_in_the_arena_then_train_on_the_votes(browser, service):
    from playwright.sync_api import expect

    api, ui = service["api"], service["ui"]
    ppo, grpo = service["ppo"], service["grpo"]  # "job-<id>" of each
    page = browser.new_page(viewport={"width": 1500, "height": 1600}, accept_downloads=True)
    try:
        page.goto(f"{ui}/arena", wait_until="domcontentloaded")
        expect(page.get_by_text("Model 1", exact=True)).to_be_visible(timeout=90_000)
        choose(page, "Model 1", f"{ppo}/ppo")
        choose(page, "Model 2", f"{grpo}/sft")
        choose(page, "Held-out prompts of", ppo)
        page.get_by_role("button", name="Take a held-out prompt").click()
        prompt_box = page.get_by_label("Prompt", exact=True)
        expect(prompt_box).to_have_value(HELD_OUT, timeout=30_000)
        settle(page)
        assert prompt_box.evaluate("box => box.scrollHeight <= box.clientHeight + 2"), "the box hides part of the prompt"
        page.get_by_role("button", name="Get two answers").click()

        # Both answers arrive; the vote buttons come once both are in, and the names stay hidden.
        expect(page.get_by_role("button", name="A is better")).to_be_visible(timeout=120_000)
        answers = [page.locator(f'[class*="st-key-arena-answer-{side}"]') for side in "ab"]
        for answer in answers:
            expect(answer).to_contain_text("model hidden until you vote")
        for name in (f"{ppo}/ppo", f"{grpo}/sft"):
            expect(page.locator('[class*="st-key-arena-answer-"]').filter(has_text=name)).to_have_count(0)
        shown = [answer.inner_text() for answer in answers]
        # Above the answers, the question voted on in full; the dialogue's earlier turns folded.
        asked = page.locator('[class*="st-key-arena-prompt"]')
        expect(asked.get_by_text(QUESTION, exact=True)).to_be_visible()
        expect(asked.get_by_text("Earlier turns of the dialogue (2)")).to_be_visible()
        expect(asked.get_by_text(EARLIER, exact=True)).to_be_hidden()
        page.screenshot(path=str(ARTIFACTS / "arena-battle.png"), full_page=True)

        better = page.get_by_label("A better answer of your own (optional)", exact=True)
        better.fill(BETTER)
        better.press("Tab")  # a text area sends its value when it loses focus
        page.get_by_role("button", name="A is better").click()
        reveal = page.locator('[data-testid="stAlert"]').filter(has_text="Vote 1 stored")
        expect(reveal).to_be_visible(timeout=30_000)
        expect(reveal).to_contain_text("A is better")
        (vote,) = httpx.get(f"{api}/api/arena/votes", timeout=10).json()["items"]
        expect(reveal).to_contain_text(f"A was {vote['model_a']}, B was {vote['model_b']}")
        assert {vote["model_a"], vote["model_b"]} == {f"{ppo}/ppo", f"{grpo}/sft"}
        assert vote["choice"] == "a" and vote["better"] == BETTER and vote["pairs"] == 3
        assert vote["prompt"] == f"\n\n{HELD_OUT}\n\nAssistant:" and vote["prompt_source"] == f"{ppo} held-out"
        for text, stored in zip(shown, (vote["answer_a"], vote["answer_b"])):  # what was shown was stored
            words = re.findall(r"[A-Za-z]{4,}", stored)
            assert words and sum(w in text for w in words) >= 0.8 * len(words), (stored, text)

        # The vote is in the list, and both models on the leaderboard, A first with one vote each.
        votes_table = page.locator('[class*="st-key-arena-votes"]')
        expect(votes_table).to_contain_text(QUESTION)
        expect(votes_table).to_contain_text("A is better")
        board = page.locator('[class*="st-key-arena-leaderboard"]')
        rows = board.locator("tbody tr")
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_contain_text(vote["model_a"])
        expect(rows.nth(0)).to_contain_text("100%")
        expect(rows.nth(1)).to_contain_text(vote["model_b"])
        page.wait_for_timeout(500)
        page.screenshot(path=str(ARTIFACTS / "arena-voted.png"), full_page=True)

        # A second battle: a typed prompt, two samples of one model, a tie: stored, but no pair and no rating.
        page.get_by_role("button", name="New battle").click()
        expect(prompt_box).to_have_value("", timeout=30_000)
        choose(page, "Model 2", f"{ppo}/ppo")
        prompt_box.fill("Tell me about spiders.")
        page.get_by_role("button", name="Get two answers").click()
        page.get_by_role("button", name="Tie", exact=True).click(timeout=120_000)
        expect(page.locator('[data-testid="stAlert"]').filter(has_text="Vote 2 stored")).to_contain_text(
            f"A was {ppo}/ppo, B was {ppo}/ppo", timeout=30_000)
        expect(votes_table.locator("tbody tr")).to_have_count(2)
        expect(votes_table).to_contain_text("Tell me about spiders.")
        expect(rows).to_have_count(2)
        expect(rows.nth(0)).to_contain_text("100%")  # unchanged: a model against itself rates nothing

        # The export button downloads the votes' preference pairs: the tie made none.
        settle(page)
        with page.expect_download(timeout=120_000) as download:  # a loaded CI machine: the file is made on click
            page.get_by_role("button", name="Export votes (JSONL)").click()
        pairs = [json.loads(line) for line in open(download.value.path(), encoding="utf-8")]
        assert [(p["chosen_by"], p["rejected_by"]) for p in pairs] == [
            ("person", vote["model_a"]), ("person", vote["model_b"]), (vote["model_a"], vote["model_b"])]
        assert all(p["vote_id"] == 1 and p["prompt"] == vote["prompt"] for p in pairs)

        # The New job form trains a job on the votes.
        page.goto(f"{ui}/new", wait_until="domcontentloaded")
        expect(page.get_by_text("Train on the arena's votes")).to_be_visible(timeout=60_000)
        page.get_by_text("Votes only", exact=True).click()
        settle(page)
        # Streamlit scrolls inside its own container: a viewport as tall as the form shows it whole.
        page.set_viewport_size({"width": 1500, "height": 2900})
        page.screenshot(path=str(ARTIFACTS / "new-job.png"), full_page=True)
        page.set_viewport_size({"width": 1500, "height": 1600})
        page.get_by_role("button", name="Launch job").click()
        page.wait_for_url("**/job?job=*", timeout=60_000)
        job_id = int(page.url.split("job=")[1].split("&")[0])
        data_cfg = httpx.get(f"{api}/api/jobs/{job_id}", timeout=10).json()["config"]["data"]
        assert data_cfg["votes_weight"] == 1.0
        with open(data_cfg["votes_file"], encoding="utf-8") as f:
            assert [json.loads(line)["vote_id"] for line in f] == [1, 1, 1]

        # Delete the first vote on the Arena page: the list and the leaderboard follow.
        page.goto(f"{ui}/arena", wait_until="domcontentloaded")
        expect(page.get_by_role("button", name="Delete vote")).to_be_visible(timeout=60_000)
        choose(page, "Vote", "#1")
        page.get_by_role("button", name="Delete vote").click()
        expect(page.get_by_text("Vote 1 deleted.")).to_be_visible(timeout=30_000)
        expect(page.locator('[class*="st-key-arena-votes"] tbody tr')).to_have_count(1)
        expect(page.get_by_text("No vote between two different models yet.")).to_be_visible()
        assert [v["id"] for v in httpx.get(f"{api}/api/arena/votes", timeout=10).json()["items"]] == [2]
        page.screenshot(path=str(ARTIFACTS / "arena-deleted.png"), full_page=True)

        # The Chat page answers a message from the PPO job's policy; the sidebar says the backend is up.
        page.goto(f"{ui}/chat?model={ppo}/ppo", wait_until="domcontentloaded")
        message = page.get_by_test_id("stChatInputTextArea")
        expect(message).to_be_visible(timeout=60_000)
        message.fill("What do jumping spiders eat?")
        message.press("Enter")
        bubbles = page.get_by_test_id("stChatMessage")
        expect(bubbles).to_have_count(2, timeout=120_000)
        expect(bubbles.nth(0)).to_contain_text("What do jumping spiders eat?")
        settle(page)
        expect(page.locator('[class*="st-key-service-status"]')).to_contain_text("backend ✓ · database ✓")
        page.screenshot(path=str(ARTIFACTS / "chat.png"), full_page=True)
    except Exception:
        page.screenshot(path=str(ARTIFACTS / "arena-failure.png"), full_page=True)
        raise
