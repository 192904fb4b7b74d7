"""Issue 31 on the job page (Streamlit's AppTest against a real backend process and SQLite file, the rows written with
the worker's own queue functions): a GRPO job whose proxy reward climbs while its validation reward model's score and
its gold fall shows the "Proxy vs independent signal" chart and the divergence warning; a job without an independent
signal shows neither."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.support.dashboard import open_job_page, plotly_trace, walk
from tests.support.runs import JobWriter

STEPS = 12
PROXY = [0.1 * i + (0.03 if i % 2 else -0.03) for i in range(STEPS)]
VALIDATION = [0.2 * min(i, 4) - 0.1 * max(0, i - 4) + (0.02 if i % 3 else -0.02) for i in range(STEPS)]


def create(backend, name: str, **overrides) -> dict:
    response = httpx.post(f"{backend.url}/api/jobs", timeout=30,
                          json={"preset": "tiny", "name": name, "overrides": overrides})
    assert response.status_code == 201, response.text
    return response.json()


def warnings(at) -> list[str]:
    return [str(el.value) for el in walk(at._tree) if getattr(el, "type", None) == "warning" and hasattr(el, "value")]


def charts(at) -> list[str]:
    return [json.dumps(json.loads(c.proto.spec)["layout"].get("title", "")) for c in at.get("plotly_chart")]


@pytest.mark.parametrize("independent", [True, False])
def test_the_job_page_shows_the_proxy_against_the_independent_signals(backend, dashboard_env, independent):
    dashboard_env(backend.url)
    job = create(backend, "hacking", algorithm="grpo", stages=["data", "sft", "reward", "ppo", "evaluate"],
                 reward={"validation": True})
    writer = JobWriter(backend.db_url, job["id"])
    writer.claim()
    writer.begin("ppo")
    rows = {"grpo/reward_mean": PROXY, "grpo/reward_std": [0.5] * STEPS, "grpo/kl": [0.5 * i for i in range(STEPS)]}
    if independent:
        rows |= {"grpo/validation_reward_mean": VALIDATION, "grpo/validation_reward_std": [0.4] * STEPS,
                 "grpo/gold_mean": [-10.0 - 0.5 * i for i in range(STEPS)], "grpo/gold_std": [2.0] * STEPS}
    writer.metrics("ppo", rows, start=1)
    at = open_job_page(job["id"])
    found = [w for w in warnings(at) if "proxy reward rose" in w]
    if not independent:
        assert not any("Proxy vs independent signal" in c for c in charts(at)) and found == []
        writer.close()
        return
    proxy = plotly_trace(at, "Proxy vs independent signal", "proxy reward (RM score)")
    assert proxy["y"][0] == 0 and proxy["y"][-1] == pytest.approx((PROXY[-1] - PROXY[0]) / 0.5)
    gold = plotly_trace(at, "Proxy vs independent signal", "gold (concise)")
    assert gold["y"][-1] == pytest.approx(-0.5 * (STEPS - 1) / 2.0)
    plotly_trace(at, "Proxy vs independent signal", "validation reward model")
    assert len(found) == 2, warnings(at)  # the validation reward model's and the gold's
    assert any("validation reward model" in w for w in found) and any("gold score" in w for w in found)
    writer.close()
