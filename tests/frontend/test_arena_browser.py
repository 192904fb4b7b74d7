"""The arena end to end in a real headless Chromium: backend and dashboard as real processes.

Two finished jobs serve tiny real models (random GPT-2 weights, `make_jobs`): job 1 its SFT and PPO
policies, job 2 its SFT policy. The browser opens the Arena, picks job-1/ppo against job-2/sft, takes a
held-out prompt of job 1, gets both answers streamed from the chat API with the names hidden, votes "A is
better" with a better answer of its own, and then sees the names, the vote in the list and both models on
the leaderboard; exports the votes as JSONL; launches a job on the votes from the New job form; and
deletes the vote. A second battle, typed, compares two samples of one model and ends in a tie: stored,
no pair, no rating. Screenshots go to `tests/artifacts/arena-*.png`.
"""

from __future__ import annotations

import json
import re
import subprocess

import httpx
import pytest

from tests.backend.test_chat_api import make_jobs
from tests.frontend.conftest import REPO, free_port, service_env, stop, wait_http
from tests.frontend.test_e2e_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, EDGERLHF, chromium_installed  # noqa: F401

pytestmark = pytest.mark.slow

HELD_OUT = "Human: How far can a jumping spider jump?"
BETTER = "Up to about fifty times its own body length."


@pytest.fixture
def service(tmp_path):
    """Backend and dashboard on free ports over a data dir whose jobs 1 and 2 have finished."""
    data = tmp_path / "data"
    data.mkdir()
    make_jobs(data)
    held_out = data / "runs" / "job-1" / "data" / "test_prefs.jsonl"
    held_out.parent.mkdir(parents=True)
    held_out.write_text(json.dumps({"prompt": f"\n\n{HELD_OUT}\n\nAssistant:", "chosen": "Far.", "rejected": "No."}))
    bport, fport = free_port(), free_port()
    env = service_env(data, EDGERLHF_BACKEND_PORT=str(bport), EDGERLHF_FRONTEND_PORT=str(fport),
                      EDGERLHF_DEVICE="cpu", EDGERLHF_CHAT_MAX_TOKENS="48", HF_HUB_OFFLINE="1")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in ("backend", "frontend"):
        log = (ARTIFACTS / f"arena-{name}.log").open("w")
        procs[name] = subprocess.Popen([*EDGERLHF, name], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{bport}/healthz", procs["backend"], timeout=90)
        wait_http(f"http://127.0.0.1:{fport}/_stcore/health", procs["frontend"], timeout=90)
        yield {"api": f"http://127.0.0.1:{bport}", "ui": f"http://127.0.0.1:{fport}"}
    finally:
        for proc in procs.values():
            stop(proc)


def settle(page) -> None:
    """Wait until the app has finished its rerun (Streamlit shows its status widget while a script runs)."""
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stStatusWidget")).to_have_count(0, timeout=60_000)


def choose(page, label: str, option: str) -> None:
    """Pick `option` in the Streamlit select box labelled `label`."""
    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_vote_in_the_arena_then_train_on_the_votes(service):
    from playwright.sync_api import expect, sync_playwright

    api, ui = service["api"], service["ui"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 1600}, accept_downloads=True)
        try:
            page.goto(f"{ui}/arena", wait_until="domcontentloaded")
            expect(page.get_by_text("Model 1", exact=True)).to_be_visible(timeout=90_000)
            choose(page, "Model 1", "job-1/ppo")
            choose(page, "Model 2", "job-2/sft")
            choose(page, "Held-out prompts of", "job-1")
            page.get_by_role("button", name="Take a held-out prompt").click()
            prompt_box = page.get_by_label("Prompt", exact=True)
            expect(prompt_box).to_have_value(HELD_OUT, timeout=30_000)
            page.get_by_role("button", name="Get two answers").click()

            # Both answers arrive; the vote buttons come once both are in, and the names stay hidden.
            expect(page.get_by_role("button", name="A is better")).to_be_visible(timeout=120_000)
            answers = [page.locator(f'[class*="st-key-arena-answer-{side}"]') for side in "ab"]
            for answer in answers:
                expect(answer).to_contain_text("model hidden until you vote")
            for name in ("job-1/ppo", "job-2/sft"):
                expect(page.locator('[class*="st-key-arena-answer-"]').filter(has_text=name)).to_have_count(0)
            shown = [answer.inner_text() for answer in answers]
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
            assert {vote["model_a"], vote["model_b"]} == {"job-1/ppo", "job-2/sft"}
            assert vote["choice"] == "a" and vote["better"] == BETTER and vote["pairs"] == 3
            assert vote["prompt"] == f"\n\n{HELD_OUT}\n\nAssistant:" and vote["prompt_source"] == "job-1 held-out"
            for text, stored in zip(shown, (vote["answer_a"], vote["answer_b"])):  # what was shown was stored
                words = re.findall(r"[A-Za-z]{4,}", stored)
                assert words and sum(w in text for w in words) >= 0.8 * len(words), (stored, text)

            # The vote is in the list, and both models on the leaderboard, A first with one vote each.
            votes_table = page.locator('[class*="st-key-arena-votes"]')
            expect(votes_table).to_contain_text("How far can a jumping spider jump?")
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
            choose(page, "Model 2", "job-1/ppo")
            prompt_box.fill("Tell me about spiders.")
            page.get_by_role("button", name="Get two answers").click()
            page.get_by_role("button", name="Tie", exact=True).click(timeout=120_000)
            expect(page.locator('[data-testid="stAlert"]').filter(has_text="Vote 2 stored")).to_contain_text(
                "A was job-1/ppo, B was job-1/ppo", timeout=30_000)
            expect(votes_table.locator("tbody tr")).to_have_count(2)
            expect(votes_table).to_contain_text("Tell me about spiders.")
            expect(rows).to_have_count(2)
            expect(rows.nth(0)).to_contain_text("100%")  # unchanged: a model against itself rates nothing

            # The export button downloads the votes' preference pairs: the tie made none.
            settle(page)
            with page.expect_download() as download:
                page.get_by_role("button", name="Export votes (JSONL)").click()
            pairs = [json.loads(line) for line in open(download.value.path(), encoding="utf-8")]
            assert [(p["chosen_by"], p["rejected_by"]) for p in pairs] == [
                ("person", vote["model_a"]), ("person", vote["model_b"]), (vote["model_a"], vote["model_b"])]
            assert all(p["vote_id"] == 1 and p["prompt"] == vote["prompt"] for p in pairs)

            # The New job form trains a job on the votes.
            page.goto(f"{ui}/new", wait_until="domcontentloaded")
            expect(page.get_by_text("Train on the arena's votes")).to_be_visible(timeout=60_000)
            page.get_by_text("Votes only", exact=True).click()
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
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "arena-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
