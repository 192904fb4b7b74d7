"""What a job list and a job carry for the dashboard's progress and results (`StagePublic`, `JobSummary.result`):
each stage's step counts and when its first and latest steps came, and a finished job's headline numbers computed
from its evaluate stage's stored report, so a list of jobs needs no report per job."""

from __future__ import annotations

from datetime import timedelta

from db import make_engine, make_sessionmaker, queue
from db.models import utcnow

from tests.support.runs import ev_report

PROMPTS = ["\n\nHuman: Where do owls sleep?\n\nAssistant:", "\n\nHuman: Is tea good?\n\nAssistant:"]


def test_stages_carry_their_step_counts_and_a_finished_job_its_result(client, settings):
    job = client.post("/api/jobs", json={"preset": "tiny", "overrides": {"algorithm": "grpo"}}).json()
    assert job["result"] is None and all(s["done"] is None and s["total"] is None for s in job["stages"])
    engine = make_engine(settings.database_url)
    sessions = make_sessionmaker(engine)
    first = utcnow() - timedelta(seconds=40)
    with sessions() as s:
        queue.claim_next(s, "w")
        queue.begin_stage(s, job["id"], "ppo", attempt=1)
        queue.record(s, job["id"], progress=("ppo", 0.3, 0.6),
                     steps=queue.StepProgress(3, 10, 1, first, first + timedelta(seconds=20)))

    listed = client.get("/api/jobs").json()["items"][0]
    ppo = next(s for s in listed["stages"] if s["stage"] == "ppo")
    assert (ppo["status"], ppo["done"], ppo["total"], ppo["first_done"]) == ("running", 3, 10, 1)
    assert ppo["first_progress_at"] and ppo["progress_at"] > ppo["first_progress_at"]
    assert listed["result"] is None, "no result before the evaluate stage has finished"

    with sessions() as s:
        queue.end_stage(s, job["id"], "ppo", None)
        queue.begin_stage(s, job["id"], "evaluate", attempt=1)
        queue.end_stage(s, job["id"], "evaluate", ev_report("grpo", 0.8, -0.2, 0.3, PROMPTS))
        queue.finish(s, job["id"], "w")
    engine.dispose()

    for body in (client.get("/api/jobs").json()["items"][0], client.get(f"/api/jobs/{job['id']}").json()):
        result = body["result"]
        # ev_report: reward +0.5 in [+0.4, +0.6], gold +0.4 in [+0.3, +0.5], length -3 tokens, KL 0.8; no judge.
        assert result["reward_diff"]["mean"] == 0.5 and result["reward_diff"]["low"] == 0.4
        assert result["gold_diff"]["high"] == 0.5 and result["length_diff"]["mean"] == -3.0
        assert result["kl"] == 0.8 and result["judge_win_rate"] is None


def test_an_evaluate_report_of_an_older_shape_gives_no_result_instead_of_an_error(client, settings):
    job = client.post("/api/jobs", json={"preset": "tiny"}).json()
    engine = make_engine(settings.database_url)
    with make_sessionmaker(engine)() as s:
        queue.claim_next(s, "w")
        queue.begin_stage(s, job["id"], "evaluate", attempt=1)
        queue.end_stage(s, job["id"], "evaluate", {"reward_gain": 0.5})  # a field since renamed
        queue.finish(s, job["id"], "w")
    engine.dispose()
    listed = client.get("/api/jobs")
    assert listed.status_code == 200 and listed.json()["items"][0]["result"] is None
