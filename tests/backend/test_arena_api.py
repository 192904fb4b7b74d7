"""The arena API in-process (TestClient) on both engines (`db_url`): votes round-trip, validation that stores
nothing, the export as preference pairs, the leaderboard, held-out prompts, and the next round: a snapshot of
the votes becomes a job's `data.votes_file`, and that job's data stage uses exactly those votes.

The jobs are real rows moved through `db.queue` (succeeded, failed after SFT, running) and their run
directories hold real tiny models (`make_run_dir`): job 1 serves `sft` and `ppo`, job 2 only `sft`, job 3
nothing yet.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from backend.api.routes.arena import MAX_ANSWER_CHARS
from db import queue
from edgerlhf.config import HH_PREFS_SAMPLE, PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.data import parse_record, read_prefs
from edgerlhf.pipeline import run_pipeline
from edgerlhf.settings import Settings

from tests.support.db import row_counts
from tests.support.runs import make_run_dir

HELD_OUT = ["Human: What is a good name for a cat?", "Human: Hi\n\nAssistant: Hello!\n\nHuman: How do magnets work?"]


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory) -> Path:
    """Run directories of jobs 1 (sft + ppo) and 2 (sft), built once and copied into each test's data dir."""
    runs = tmp_path_factory.mktemp("arena-runs")
    make_run_dir(runs / "job-1")
    make_run_dir(runs / "job-2", with_ppo=False)
    rows = [{"prompt": "\n\n" + p + "\n\nAssistant:", "chosen": "Yes.", "rejected": "No."} for p in HELD_OUT]
    (runs / "job-1" / "data").mkdir()
    (runs / "job-1" / "data" / "test_prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    return runs


@pytest.fixture
def jobs(app, settings, run_dirs) -> None:
    """Job 1 succeeded, job 2 failed after its sft stage, job 3 is running."""
    shutil.copytree(run_dirs, settings.runs_dir)
    config = PipelineConfig().to_dict() | {"preset": "tiny"}
    with app.state.sessions() as session:
        for name in ("done", "failed-in-ppo", "running"):
            queue.create_job(session, name=name, preset="tiny", config=config)
        for job_id in (1, 2, 3):
            assert queue.claim_next(session, "w").id == job_id
        assert queue.finish(session, 1, "w")
        assert queue.fail(session, 2, "RuntimeError: ppo diverged", worker_id="w")


def vote(**fields) -> dict:
    body = {"prompt": "How far can spiders jump?", "model_a": "job-1/ppo", "model_b": "job-1/sft",
            "answer_a": "About a metre.", "answer_b": "Spiders.", "choice": "a"}
    return body | fields


def post(client, **fields) -> dict:
    response = client.post("/api/arena/votes", json=vote(**fields))
    assert response.status_code == 201, response.text
    return response.json()


def test_votes_round_trip(client, jobs):
    first = post(client)
    assert first["prompt"] == "\n\nHuman: How far can spiders jump?\n\nAssistant:"
    assert first["choice"] == "a" and first["pairs"] == 1 and first["better"] is None
    second = post(client, prompt=HELD_OUT[1], prompt_source="job-1 held-out", model_a="job-2/sft",
                  model_b="job-2/sft", answer_a="By magic.", answer_b="", choice="both_bad",
                  better="  Moving charges make magnetic fields.  ")
    assert second["prompt"] == "\n\n" + HELD_OUT[1] + "\n\nAssistant:"
    assert second["better"] == "Moving charges make magnetic fields." and second["pairs"] == 2
    assert second["prompt_source"] == "job-1 held-out"

    listed = client.get("/api/arena/votes").json()
    assert listed["total"] == 2 and [v["id"] for v in listed["items"]] == [second["id"], first["id"]]
    assert listed["items"][1] == first
    assert client.get(f"/api/arena/votes/{first['id']}").json() == first
    assert client.get("/api/arena/votes", params={"limit": 1, "offset": 1}).json()["items"] == [first]

    assert client.delete(f"/api/arena/votes/{first['id']}").status_code == 204
    assert client.get(f"/api/arena/votes/{first['id']}").status_code == 404
    assert client.delete(f"/api/arena/votes/{first['id']}").status_code == 404
    assert client.get(f"/api/arena/votes/{2**70}").status_code == 404
    assert [v["id"] for v in client.get("/api/arena/votes").json()["items"]] == [second["id"]]


@pytest.mark.parametrize("fields, loc, words", [
    ({"model_a": "job-99/sft"}, "model_a", "there is no job 99"),
    ({"model_b": "job-3/ppo"}, "model_b", "job 3 is running"),
    ({"model_b": "job-2/ppo"}, "model_b", "no completed ppo stage"),
    ({"model_a": "job-1/base"}, "model_a", "compares sft and ppo"),
    ({"model_a": "gpt-4"}, "model_a", "does not exist"),
    ({"prompt": ""}, "prompt", "at least 1 character"),
    ({"prompt": "  \n "}, "prompt", "empty prompt"),
    ({"prompt": "x" * 8001}, "prompt", "at most 8000"),
    ({"answer_a": "x" * (MAX_ANSWER_CHARS + 1)}, "answer_a", f"at most {MAX_ANSWER_CHARS}"),
    ({"better": "x" * (MAX_ANSWER_CHARS + 1)}, "better", f"at most {MAX_ANSWER_CHARS}"),
    ({"choice": "c"}, "choice", "'a', 'b', 'tie' or 'both_bad'"),
    ({"answer_b": None}, "answer_b", "valid string"),
    ({"surprise": 1}, "surprise", "not permitted"),
    ({"answer_a": "nul \x00 byte"}, "answer_a", "NUL"),
    ({"better": "\ud800"}, "better", "valid string"),  # a lone surrogate: not UTF-8
])
def test_invalid_votes_are_422_naming_the_field_and_store_nothing(client, app, jobs, fields, loc, words):
    before = row_counts(app)
    # JSON with ASCII escapes, as a client may send a lone surrogate ("\\ud800").
    response = client.post("/api/arena/votes", content=json.dumps(vote(**fields)),
                           headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", loc] and words in error["msg"], error
    assert row_counts(app) == before


def test_oversized_bodies_are_413_and_store_nothing(client, app, jobs, settings):
    before = row_counts(app)
    response = client.post("/api/arena/votes", json=vote(better="x" * settings.max_body_bytes))
    assert response.status_code == 413
    assert row_counts(app) == before


def test_arena_routes_need_the_token(db_url, tmp_path):
    from fastapi.testclient import TestClient

    from backend.main import create_app

    app = create_app(Settings(data_dir=tmp_path / "data", database_url=db_url, api_token="s3cret"))
    with TestClient(app, base_url="http://localhost") as client:
        for method, path in (("GET", "/api/arena/votes"), ("POST", "/api/arena/votes"),
                             ("GET", "/api/arena/leaderboard"), ("GET", "/api/arena/votes/export"),
                             ("POST", "/api/arena/votes/snapshot"), ("GET", "/api/arena/prompts?job_id=1")):
            assert client.request(method, path).status_code == 401, path
        ok = client.get("/api/arena/votes", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["total"] == 0


def test_export_gives_valid_preference_pairs(client, jobs, tmp_path):
    post(client, choice="a")
    post(client, choice="b", answer_a="One.", answer_b="Two.")
    post(client, choice="tie")                                                   # no pair
    post(client, choice="both_bad")                                              # no pair
    post(client, choice="tie", better="Up to 50 times their length.")          # 2 pairs
    post(client, choice="b", better="Written.", answer_a="A.", answer_b="B.")    # 3 pairs
    response = client.get("/api/arena/votes/export")
    assert response.status_code == 200 and response.headers["content-type"].startswith("application/x-ndjson")
    assert "arena-votes.jsonl" in response.headers["content-disposition"]
    rows = [json.loads(line) for line in response.text.splitlines()]
    assert [r["vote_id"] for r in rows] == [1, 2, 5, 5, 6, 6, 6]
    for row in rows:  # exactly what the data stage reads as processed pairs
        assert parse_record(row) == {k: row[k] for k in ("prompt", "chosen", "rejected")}
        assert row["prompt"] == "\n\nHuman: How far can spiders jump?\n\nAssistant:"
    assert [(r["chosen"], r["rejected"]) for r in rows] == [
        ("About a metre.", "Spiders."), ("Two.", "One."),
        ("Up to 50 times their length.", "About a metre."), ("Up to 50 times their length.", "Spiders."),
        ("Written.", "A."), ("Written.", "B."), ("B.", "A.")]
    assert [(r["chosen_by"], r["rejected_by"]) for r in rows][4:] == [
        ("person", "job-1/ppo"), ("person", "job-1/sft"), ("job-1/sft", "job-1/ppo")]
    # The export is a data set as it is: the data stage's reader takes it as `data.source`.
    from edgerlhf.config import load_config
    from edgerlhf.data import read_pairs

    path = tmp_path / "export.jsonl"
    path.write_text(response.text)
    pairs, info = read_pairs(load_config("tiny", {"data": {"source": str(path)}}).data)
    assert len(pairs) == 7 and info["bad_lines"] == 0


def test_leaderboard_counts_the_votes_each_model_rests_on(client, jobs):
    for choice in ("a", "a", "a", "b", "tie"):
        post(client, choice=choice)                                  # job-1/ppo (A) vs job-1/sft (B)
    post(client, model_a="job-2/sft", model_b="job-1/ppo", choice="b")
    post(client, model_a="job-2/sft", model_b="job-2/sft", choice="a")  # two samples of one model: unrated
    board = client.get("/api/arena/leaderboard").json()
    assert board["votes"] == 7 and board["rated_votes"] == 6
    assert [m["model"] for m in board["models"]] == ["job-1/ppo", "job-1/sft", "job-2/sft"]
    ppo, sft, other = board["models"]
    assert (ppo["votes"], ppo["wins"], ppo["losses"], ppo["ties"]) == (6, 4, 1, 1)
    assert ppo["win_rate"] == pytest.approx(4.5 / 6)
    assert (sft["votes"], sft["wins"], sft["losses"], sft["ties"]) == (5, 1, 3, 1)
    assert (other["votes"], other["wins"], other["losses"]) == (1, 0, 1)
    assert ppo["rating"] > 1000 > sft["rating"]
    head = {(p["model_a"], p["model_b"]): p for p in board["pairs"]}
    assert head[("job-1/ppo", "job-1/sft")] == {"model_a": "job-1/ppo", "model_b": "job-1/sft", "votes": 5,
                                                 "a_wins": 3, "b_wins": 1, "ties": 1, "a_win_rate": 0.7}


def test_held_out_prompts_of_a_job(client, jobs):
    answer = client.get("/api/arena/prompts", params={"job_id": 1}).json()
    assert answer == {"job_id": 1, "prompts": HELD_OUT, "total": 2}  # distinct, in file order
    assert client.get("/api/arena/prompts", params={"job_id": 1, "limit": 1}).json()["prompts"] == HELD_OUT[:1]
    assert client.get("/api/arena/prompts", params={"job_id": 3}).status_code == 409
    assert client.get("/api/arena/prompts", params={"job_id": 42}).status_code == 404
    # A held-out prompt goes back as the vote's prompt unchanged.
    assert post(client, prompt=answer["prompts"][1])["prompt"] == "\n\n" + HELD_OUT[1] + "\n\nAssistant:"


def test_a_job_on_a_snapshot_of_the_votes_uses_exactly_those_votes(client, app, jobs, settings):
    assert client.post("/api/arena/votes/snapshot").status_code == 409  # nothing to train on yet
    prompts = [f"Question number {i} about spiders?" for i in range(8)]
    ids = [post(client, prompt=p, choice="a" if i % 2 else "b", answer_a=f"Answer {i}.",
                answer_b=f"Other answer {i}, longer.")["id"] for i, p in enumerate(prompts)]
    tie = post(client, prompt="A tie?", choice="tie")["id"]
    written = post(client, prompt=prompts[0], choice="tie", better="A written answer.")["id"]  # 2 pairs
    snapshot = client.post("/api/arena/votes/snapshot")
    assert snapshot.status_code == 201, snapshot.text
    snap = snapshot.json()
    assert snap["vote_ids"] == [*ids, written] and tie not in snap["vote_ids"]
    assert snap["votes"] == 9 and snap["pairs"] == 10
    assert Path(snap["path"]).parent == settings.data_dir / "arena"
    # Votes cast or deleted after the snapshot do not change what the job reads.
    assert client.delete(f"/api/arena/votes/{ids[0]}").status_code == 204
    post(client, prompt="Too late?", choice="a")

    overrides = {"stages": ["data"], "data": {"source": HH_PREFS_SAMPLE, "labels": "human", "max_pairs": 60,
                                              "votes_file": snap["path"], "votes_weight": 1.0}}
    before = row_counts(app)
    refused = client.post("/api/jobs", json={"preset": "tiny", "overrides": {
        "stages": ["data"], "data": {"votes_file": "/etc/passwd"}}})
    assert refused.status_code == 422 and refused.json()["detail"][0]["loc"] == [
        "body", "overrides", "data", "votes_file"]
    assert row_counts(app) == before
    created = client.post("/api/jobs", json={"preset": "tiny", "name": "on votes", "overrides": overrides})
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["config"]["data"]["votes_file"] == snap["path"] and job["config"]["data"]["votes_weight"] == 1.0

    # The data stage of that job, from its stored config, as the worker runs it.
    run_dir = settings.runs_dir / f"job-{job['id']}"
    report = run_pipeline(PipelineConfig.from_dict(job["config"]), RunContext(run_dir))["data"].votes
    assert report.vote_ids == snap["vote_ids"] and report.votes_used == 9
    assert report.pairs_read == 10 and report.votes_read == 9 and report.dropped == {}
    assert report.train_pairs + report.test_pairs == 10 and report.test_pairs >= 1 and not report.with_data_set
    # What the job wrote is those pairs and nothing else (votes alone: the HH pairs are set aside).
    written_pairs = [*read_prefs(run_dir / "data" / "train_prefs.jsonl"),
                     *read_prefs(run_dir / "data" / "test_prefs.jsonl")]
    exported = [json.loads(line) for line in Path(snap["path"]).read_text().splitlines()]
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    assert sorted(map(key, written_pairs)) == sorted(map(key, exported))
    recorded = [json.loads(line) for line in (run_dir / "data" / "votes.jsonl").read_text().splitlines()]
    assert sorted({r["vote_id"] for r in recorded}) == snap["vote_ids"]
