"""`POST /api/plan` and the memory check of `POST /api/jobs` (TestClient on a real database): the plan is the
planner's, checked against the job's minimum GPU memory or else the largest registered worker's; a job that
does not fit is refused with 409 and the cheapest change unless overridden; CPU jobs are never refused."""

from __future__ import annotations

from fastapi.testclient import TestClient

from backend.main import create_app
from edgerlhf import plan
from edgerlhf.config import load_config

from tests.support.db import row_counts
from .test_gpu_workers_api import beat

QWEN = "qwen2.5-0.5b-8gb"
TOO_BIG = {"ppo": {"mini_batch_size": 8}}
"""Overrides that make qwen2.5-0.5b's PPO update need more than 8 GiB (about 8.8 GiB planned; the preset's
own stages fit 8 GiB, its largest, reward/int8, needs about 7.1)."""


def test_plan_is_the_planners_answer_itemised_per_stage(client):
    response = client.post("/api/plan", json={"preset": QWEN, "gpu_memory_mb": 8192})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["fits"] is True and body["device"] == "cuda" and body["gpu_memory_bytes"] == 8 * plan.GiB
    assert body["gpu_source"] == "the request's gpu_memory_mb"
    expected = plan.plan(load_config(QWEN), 8 * plan.GiB)
    assert [s["stage"] for s in body["stages"]] == ["sft", "reward/bf16", "reward/int8", "reward/int4", "ppo", "evaluate"]
    for got, want in zip(body["stages"], expected.stages):
        assert (got["peak_bytes"], got["tensor_bytes"], got["fits"]) == (want.peak_bytes, want.tensor_bytes, True)
        sizes = [i["bytes"] for i in got["items"]]
        assert sizes == sorted(sizes, reverse=True) and "CUDA context" in [i["name"] for i in got["items"]]


def test_plan_checks_against_the_largest_registered_worker_by_default(client, app):
    body = client.post("/api/plan", json={"preset": QWEN, "overrides": TOO_BIG}).json()
    assert body["fits"] is None and body["gpu_memory_bytes"] is None and "no registered worker" in body["gpu_source"]
    beat(app, "small:1", gpu_index=0, gpu_name="RTX 3050", gpu_memory_mb=4096)
    beat(app, "cpu:2")  # no GPU
    body = client.post("/api/plan", json={"preset": QWEN, "overrides": TOO_BIG}).json()
    assert body["gpu_memory_bytes"] == 4096 * plan.MiB and "small:1" in body["gpu_source"]
    ppo = next(s for s in body["stages"] if s["stage"] == "ppo")
    assert body["fits"] is False and ppo["fits"] is False
    assert ppo["suggestion"]["change"].startswith("ppo.mini_batch_size 8 -> ")
    beat(app, "big:3", gpu_index=0, gpu_name="RTX 4090", gpu_memory_mb=24_564)
    body = client.post("/api/plan", json={"preset": QWEN, "overrides": TOO_BIG}).json()
    assert body["fits"] is True and "big:3" in body["gpu_source"]


def test_plan_of_a_bad_config_or_an_unreadable_model_is_422(client):
    response = client.post("/api/plan", json={"preset": QWEN, "overrides": {"ppo": {"mini_batch_size": 3}}})
    assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "overrides", "ppo",
                                                                                     "mini_batch_size"]
    assert client.post("/api/plan", json={"preset": QWEN, "gpu_memory_mb": 0}).status_code == 422
    assert client.post("/api/plan", json={"preset": QWEN, "surprise": 1}).status_code == 422
    response = client.post("/api/plan", json={"preset": QWEN, "overrides": {"model": {"name_or_path": "nobody/nothing"}}})
    assert response.status_code == 422, response.text
    assert "cannot read the architecture of 'nobody/nothing'" in response.json()["detail"][0]["msg"]


def test_a_job_that_does_not_fit_is_refused_with_the_plan_unless_overridden(client, app):
    beat(app, "eight:1", gpu_index=0, gpu_name="RTX 4060", gpu_memory_mb=8192)
    before = row_counts(app)
    response = client.post("/api/jobs", json={"preset": QWEN, "overrides": TOO_BIG})
    assert response.status_code == 409, response.text
    detail = response.json()["detail"]
    assert detail["field"] == "override_memory_plan"
    assert detail["message"].startswith("the memory plan says this job does not fit a 8.00 GiB GPU: ppo needs ")
    assert "cheapest change that fits: ppo.mini_batch_size 8 -> 4 with ppo.grad_accum 1 -> 2" in detail["message"]
    assert "sft" not in detail["message"], "only the stages that do not fit are named"
    assert detail["plan"]["fits"] is False and row_counts(app) == before, "a refused job stores nothing"

    job = client.post("/api/jobs", json={"preset": QWEN, "overrides": TOO_BIG, "override_memory_plan": True})
    assert job.status_code == 201, job.text
    assert job.json()["config"]["ppo"]["mini_batch_size"] == 8
    assert client.post("/api/jobs", json={"preset": QWEN}).status_code == 201, "the preset fits its 8 GB card"
    fixed = {"ppo": {"mini_batch_size": 4, "grad_accum": 2}}
    assert client.post("/api/jobs", json={"preset": QWEN, "overrides": fixed}).status_code == 201


def test_the_jobs_own_minimum_is_the_gpu_it_is_checked_against(client, app):
    beat(app, "big:3", gpu_index=0, gpu_name="RTX 4090", gpu_memory_mb=24_564)
    assert client.post("/api/jobs", json={"preset": QWEN, "overrides": TOO_BIG}).status_code == 201
    response = client.post("/api/jobs", json={"preset": QWEN, "overrides": TOO_BIG, "min_gpu_memory_mb": 6000})
    assert response.status_code == 409 and "5.86 GiB GPU" in response.json()["detail"]["message"]
    assert client.post("/api/jobs", json={"preset": QWEN, "min_gpu_memory_mb": 16_000}).status_code == 201


def test_without_a_known_gpu_or_on_the_cpu_nothing_is_refused(client, app):
    assert client.post("/api/jobs", json={"preset": QWEN, "overrides": TOO_BIG}).status_code == 201  # no worker
    beat(app, "tiny-gpu:1", gpu_index=0, gpu_name="old card", gpu_memory_mb=512)
    cpu_job = client.post("/api/jobs", json={"preset": "tiny"})
    assert cpu_job.status_code == 201, "a job on the CPU is never refused for memory"
    body = client.post("/api/plan", json={"preset": "tiny"}).json()
    assert body["device"] == "cpu" and body["fits"] is None and body["gpu_source"] == "a CPU job: never refused for memory"
    assert "never refused" in body["note"] and all(s["fits"] is None for s in body["stages"])
    unreadable = {"model": {"name_or_path": "nobody/nothing"}}
    assert client.post("/api/jobs", json={"preset": QWEN, "overrides": unreadable}).status_code == 201


def test_plan_needs_the_api_token_like_every_route(tmp_path, db_url):
    from edgerlhf.settings import Settings

    app = create_app(Settings(data_dir=tmp_path / "data", database_url=db_url, api_token="s3cret"))
    with TestClient(app, base_url="http://localhost") as c:
        assert c.post("/api/plan", json={"preset": QWEN}).status_code == 401
        ok = c.post("/api/plan", json={"preset": QWEN}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def test_a_judge_the_service_serves_on_its_gpu_counts_in_the_plan_and_the_refusal(tmp_path, db_url):
    """A GRPO job judged by an earlier job's model on this service's own /v1: with the backend serving on the GPU,
    the plan holds that model beside the alignment and the evaluation, and a job that fits alone is refused;
    with the backend serving on the CPU, nothing is added."""
    from edgerlhf.settings import Settings

    def judged_job(device: str) -> tuple[TestClient, dict]:
        settings = Settings(data_dir=tmp_path / device / "data", database_url=db_url, api_token=None, device=device)
        client = TestClient(create_app(settings), base_url="http://localhost", raise_server_exceptions=False)
        served = client.post("/api/jobs", json={"preset": QWEN, "override_memory_plan": True}).json()
        judge = {"kind": "judge", "url": settings.api_url + "/v1", "model": f"job-{served['id']}/ppo"}
        return client, {"preset": QWEN, "overrides": {"algorithm": "grpo", "stages": ["ppo", "evaluate"],
                                                      "ppo": {"rewards": [judge]}}}

    client, job = judged_job("cuda")
    with client:
        alone = plan.plan(load_config(QWEN, {"algorithm": "grpo", "stages": ["ppo", "evaluate"]}), 8 * plan.GiB)
        body = client.post("/api/plan", json={**job, "gpu_memory_mb": 8192}).json()
        for got, want in zip(body["stages"], alone.stages):
            assert got["peak_bytes"] > want.peak_bytes + plan.GiB, got["stage"]  # a 0.5B model in bf16 + context
            assert any(i["name"].startswith("judge job-") for i in got["items"])
        between = (alone.stages[0].peak_bytes + body["stages"][0]["peak_bytes"]) // 2 // plan.MiB
        refused = client.post("/api/jobs", json={**job, "min_gpu_memory_mb": between})
        assert refused.status_code == 409 and "ppo needs" in refused.json()["detail"]["message"]
    client, job = judged_job("cpu")
    with client:
        body = client.post("/api/plan", json={**job, "gpu_memory_mb": 8192}).json()
        assert [s["peak_bytes"] for s in body["stages"]] == [s.peak_bytes for s in alone.stages]
