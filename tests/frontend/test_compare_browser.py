"""The Compare page in a real headless Chromium, over two runs of different algorithms trained for real.

The session's service (`finished_service`): two `tiny` jobs with budgets of seconds went through the API, one PPO
and one GRPO, and real workers ran every stage of both. A dashboard process (`edgerlhf frontend`) is started on it,
and the browser opens the Compare page: both jobs are chosen, the `reward_mean` chart overlays PPO's
`ppo/reward_mean` and GRPO's `grpo/reward_mean` with a point per step, the reward-vs-KL frontier shows both
training trajectories and both held-out points, the runs table names both algorithms, and the x-axis switches to
samples seen. Screenshots go to `tests/artifacts/compare-*.png`.
"""

from __future__ import annotations

import httpx
import pytest

from tests.support.browser import ARTIFACTS, edgerlhf_processes

pytestmark = pytest.mark.slow


def test_compare_a_ppo_and_a_grpo_run_in_the_browser(browser, finished_service, tmp_path):
    from playwright.sync_api import expect

    api, jobs = finished_service.url, finished_service.jobs
    for algorithm, job_id in jobs.items():  # each run's own namespace, and its TensorBoard files beside it
        job = httpx.get(f"{api}/api/jobs/{job_id}", timeout=10).json()
        assert job["status"] == "succeeded" and job["config"]["algorithm"] == algorithm, job["error"]
        points = httpx.get(f"{api}/api/jobs/{job_id}/metrics", timeout=10,
                           params={"keys": f"{algorithm}/reward_mean"}).json()["items"]
        assert [p["step"] for p in points] == [1, 2, 3]
        run_dir = finished_service.data_dir / "runs" / f"job-{job_id}"
        assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))

    dashboard = edgerlhf_processes(tmp_path / "dashboard", ("frontend",), "compare", EDGERLHF_BACKEND_URL=api)
    labels = {a: f"#{i} {a}-run" for a, i in jobs.items()}
    with dashboard as service:
        ui = service["ui"]
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
