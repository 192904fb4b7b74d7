"""The Compare page in a real headless Chromium, over two runs of different algorithms trained for real.

Backend, worker and dashboard run as `edgerlhf` processes on a temp data dir. Two `tiny` jobs with budgets of
seconds go through the API, one PPO and one GRPO, and the real worker runs every stage of both. The browser
opens the Compare page: both jobs are chosen, the `reward_mean` chart overlays PPO's `ppo/reward_mean` and
GRPO's `grpo/reward_mean` with a point per step, the reward-vs-KL frontier shows both training trajectories
and both held-out points, the runs table names both algorithms, and the x-axis switches to samples seen.
Screenshots go to `tests/artifacts/compare-*.png`.
"""

from __future__ import annotations

import subprocess
import time

import httpx
import pytest

from edgerlhf.contract import FINISHED
from tests.frontend.conftest import REPO, free_port, service_env, stop, wait_http
from tests.frontend.test_e2e_browser import ARTIFACTS, CHROMIUM, CHROMIUM_ARGS, EDGERLHF, chromium_installed  # noqa: F401
from tests.frontend.test_report_contract import TINY

pytestmark = pytest.mark.slow

RUN_TIMEOUT_S = 240  # both jobs take about a minute of CPU on 2 shared cores
RUNS = {  # algorithm -> overrides on top of the report-contract test's seconds-long `tiny` budget
    "ppo": {**TINY, "reward": {**TINY["reward"], "precisions": ["bf16"]}, "ppo": {**TINY["ppo"], "steps": 3}},
    "grpo": {**TINY, "reward": {**TINY["reward"], "precisions": ["bf16"]},
             "ppo": {**TINY["ppo"], "steps": 3, "samples_per_prompt": 2}},  # groups of 2 answers per prompt
}


@pytest.fixture
def service(tmp_path):
    """backend + worker + dashboard on free ports over a temp data dir, as `edgerlhf` commands."""
    data = tmp_path / "data"
    data.mkdir()
    bport, fport = free_port(), free_port()
    env = service_env(data, EDGERLHF_BACKEND_PORT=str(bport), EDGERLHF_FRONTEND_PORT=str(fport), EDGERLHF_DEVICE="cpu",
                      HF_HUB_OFFLINE="1")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name in ("backend", "worker", "frontend"):
        log = (ARTIFACTS / f"compare-{name}.log").open("w")
        procs[name] = subprocess.Popen([*EDGERLHF, name], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{bport}/healthz", procs["backend"], timeout=90)
        wait_http(f"http://127.0.0.1:{fport}/_stcore/health", procs["frontend"], timeout=90)
        yield {"api": f"http://127.0.0.1:{bport}", "ui": f"http://127.0.0.1:{fport}", "runs": data / "runs"}
    finally:
        for proc in procs.values():
            stop(proc)


def test_compare_a_ppo_and_a_grpo_run_in_the_browser(service):
    from playwright.sync_api import expect, sync_playwright

    api, ui = service["api"], service["ui"]
    jobs = {}
    for algorithm, overrides in RUNS.items():
        created = httpx.post(f"{api}/api/jobs", timeout=30, json={
            "preset": "tiny", "name": f"{algorithm}-run", "overrides": {"algorithm": algorithm, **overrides}})
        assert created.status_code == 201, created.text
        jobs[algorithm] = created.json()["id"]

    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        states = {a: httpx.get(f"{api}/api/jobs/{i}", timeout=10).json() for a, i in jobs.items()}
        if all(s["status"] in FINISHED for s in states.values()):
            break
        assert time.monotonic() < deadline, {a: (s["status"], s["stage"]) for a, s in states.items()}
        time.sleep(2)
    assert all(s["status"] == "succeeded" for s in states.values()), {a: s["error"] for a, s in states.items()}
    for algorithm, job_id in jobs.items():  # each run's own namespace, and its TensorBoard files beside it
        points = httpx.get(f"{api}/api/jobs/{job_id}/metrics", timeout=10,
                           params={"keys": f"{algorithm}/reward_mean"}).json()["items"]
        assert [p["step"] for p in points] == [1, 2, 3]
        assert list((service["runs"] / f"job-{job_id}" / "tensorboard").glob("events.out.tfevents.*"))

    labels = {a: f"#{i} {a}-run" for a, i in jobs.items()}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1500, "height": 2200})
        try:
            page.goto(f"{ui}/compare", wait_until="domcontentloaded")
            reward = page.locator(".js-plotly-plot").filter(has_text="reward_mean (")
            expect(reward).to_be_visible(timeout=90_000)
            for algorithm, label in labels.items():  # both runs' curves, each with a point per step
                expect(reward.locator(".legendtext").filter(has_text=f"{label} ({algorithm})")).to_have_count(1)
            expect(reward.locator(".scatterlayer .trace")).to_have_count(2)
            for trace in reward.locator(".scatterlayer .trace").all():
                expect(trace.locator(".points path")).to_have_count(3)

            frontier = page.locator(".js-plotly-plot").filter(has_text="Reward vs KL")
            expect(frontier).to_be_visible(timeout=30_000)
            for algorithm, label in labels.items():
                expect(frontier.locator(".legendtext").filter(has_text=f"{label} ({algorithm}) training")).to_have_count(1)
                expect(frontier.locator(".legendtext").filter(
                    has_text=f"{label} ({algorithm}) held-out: SFT → {algorithm.upper()}")).to_have_count(1)
            runs_table = page.locator('[class*="st-key-cmp-runs"]')
            expect(runs_table).to_contain_text("grpo")
            expect(runs_table).to_contain_text("ppo")
            expect(page.locator('[class*="st-key-cmp-prompt-0"]')).to_be_visible()
            expect(page.get_by_text("Backend unreachable")).to_have_count(0)
            page.wait_for_timeout(1500)  # let plotly finish drawing before the pictures
            page.screenshot(path=str(ARTIFACTS / "compare-page.png"), full_page=True)
            frontier.screenshot(path=str(ARTIFACTS / "compare-frontier.png"))

            # The common x-axis in samples seen: step x each job's rollout batch.
            page.get_by_text("samples seen", exact=True).click()
            by_samples = reward.filter(has=page.locator(".g-xtitle", has_text="samples seen"))
            expect(by_samples).to_be_visible(timeout=30_000)
            expect(reward).to_have_count(1, timeout=30_000)  # the redrawn chart has replaced the one by steps
            expect(by_samples.locator(".scatterlayer .trace")).to_have_count(2)
            page.wait_for_timeout(1000)
            by_samples.screenshot(path=str(ARTIFACTS / "compare-samples.png"))
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "compare-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
