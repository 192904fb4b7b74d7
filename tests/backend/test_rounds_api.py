"""The next round of RLHF through the API (issue 32), in-process on a real database (SQLite and PostgreSQL): a finished
job with an aligned policy is continued by a new job of its config whose `round` names the parent's run directory, on
the data the body asks for (the arena votes about the parent's model, its chat feedback, a data set, the parent's
data, votes mixed with it); the database keeps the parent and the round, `JobPublic` shows them, the chain of rounds
is served, and a parent that a queued round still has to copy cannot be deleted. Every refusal names its reason and
stores nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from db import arena, queue
from edgerlhf.config import load_config

from tests.support.db import row_counts
from tests.support.runs import make_run_dir

STAGES = {"stages": ["data", "sft", "reward", "ppo", "evaluate"], "data": {"max_pairs": 40}}


def finished_job(app, settings, name: str = "round one", with_ppo: bool = True, **overrides) -> int:
    """A job that a worker ran to the end: its row (succeeded) and a run directory with an aligned policy
    (`make_run_dir`: a tiny `sft/merged` and a `ppo/adapter`; without `with_ppo`, the SFT policy only)."""
    with app.state.sessions() as session:
        job = queue.create_job(session, name=name, preset="tiny",
                               config=load_config("tiny", {**STAGES, **overrides}).to_dict())
        assert queue.claim_next(session, "test-worker").id == job.id
        assert queue.finish(session, job.id, "test-worker")
    make_run_dir(settings.runs_dir / f"job-{job.id}", with_ppo=with_ppo)
    return job.id


def vote(app, model_a: str, model_b: str, choice: str = "a", prompt: str = "Where do owls sleep?") -> int:
    with app.state.sessions() as session:
        return arena.add_vote(session, prompt=f"\n\nHuman: {prompt}\n\nAssistant:", model_a=model_a, model_b=model_b,
                              answer_a="In hollow trees.", answer_b="Owls.", choice=choice).id


def give_feedback(client, model: str, **fields) -> dict:
    r = client.post("/api/feedback", json={"model": model, "messages": [{"role": "user", "content": "Is tea good?"}],
                                           "reply": "Yes.", **fields})
    assert r.status_code == 201, r.text
    return r.json()


def stored(settings, source: str) -> Path:
    """A data set's file as a job's config or the data sets list names it (absolute, or under the data dir)."""
    return (Path(source) if Path(source).is_absolute() else settings.data_dir / source).resolve()


def records(source: str) -> list[dict]:
    path = Path(source)
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def continued(client, job_id: int, **body) -> dict:
    r = client.post(f"/api/jobs/{job_id}/continue", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def test_continue_queues_the_next_round_on_the_votes_about_the_parent_and_the_chain_shows_it(client, app, settings):
    parent = finished_job(app, settings)
    about = [vote(app, f"job-{parent}/ppo", f"job-{parent}/sft"), vote(app, f"job-{parent}/sft", f"job-{parent}/ppo",
                                                                       "b", "Is tea good?")]
    vote(app, "job-77/ppo", "job-78/ppo")  # another model's: not this round's
    vote(app, f"job-{parent}/sft", "job-78/ppo")  # this job's SFT policy, not its aligned one

    job = continued(client, parent)
    assert (job["parent_id"], job["round"], job["status"], job["name"]) == (parent, 2, "queued", "round one · round 2")
    config = job["config"]
    assert config["round"] == {"parent_run": str(settings.runs_dir / f"job-{parent}"), "number": 2}
    assert config["algorithm"] == "ppo" and config["stages"] == STAGES["stages"]
    assert config["data"]["source"] == client.get(f"/api/jobs/{parent}").json()["config"]["data"]["source"]
    votes_file = Path(config["data"]["votes_file"])
    assert votes_file.is_relative_to(settings.data_dir) and config["data"]["votes_weight"] == 1.0
    pairs = [json.loads(line) for line in votes_file.read_text().splitlines()]
    assert sorted({p["vote_id"] for p in pairs}) == about, "only the votes about the parent's aligned model"

    listed = {j["id"]: j for j in client.get("/api/jobs").json()["items"]}
    assert (listed[job["id"]]["parent_id"], listed[job["id"]]["round"]) == (parent, 2)
    assert (listed[parent]["parent_id"], listed[parent]["round"]) == (None, 1)
    for member in (parent, job["id"]):
        chain = client.get(f"/api/jobs/{member}/rounds")
        assert chain.status_code == 200, chain.text
        assert [(j["id"], j["round"]) for j in chain.json()["items"]] == [(parent, 1), (job["id"], 2)]
    assert client.get("/api/jobs/999999/rounds").status_code == 404

    # A clone of round 2 (the New job form's, or any job naming a parent run) is a round 2 of the same parent.
    clone = client.post("/api/jobs", json={"preset": "tiny", "overrides": {**STAGES, "round": config["round"]}})
    assert clone.status_code == 201, clone.text
    assert (clone.json()["parent_id"], clone.json()["round"]) == (parent, 2)
    elsewhere = client.post("/api/jobs", json={"preset": "tiny", "overrides": {
        **STAGES, "round": {"parent_run": str(settings.data_dir / "mine" / f"job-{parent}"), "number": 2}}})
    assert (elsewhere.json()["parent_id"], elsewhere.json()["round"]) == (None, 2), "not a run of this service's"
    for extra in (clone.json()["id"], elsewhere.json()["id"]):
        assert client.post(f"/api/jobs/{extra}/cancel").status_code == 202

    # Round 3 waits for round 2 to finish.
    waiting = client.post(f"/api/jobs/{job['id']}/continue", json={})
    assert waiting.status_code == 409 and "queued" in waiting.json()["detail"]

    # The parent's run directory is what round 2 starts from: not deleted before round 2 has copied it.
    refused = client.delete(f"/api/jobs/{parent}")
    assert refused.status_code == 409 and f"#{job['id']}" in refused.json()["detail"], refused.text
    assert (settings.runs_dir / f"job-{parent}").is_dir()
    with app.state.sessions() as session:
        assert queue.claim_next(session, "test-worker").id == job["id"]
        queue.begin_stage(session, job["id"], "sft", attempt=1)
        queue.end_stage(session, job["id"], "sft", {"round": 2}, 0.4)
    assert client.delete(f"/api/jobs/{parent}").status_code == 204
    orphan = client.get(f"/api/jobs/{job['id']}/rounds").json()["items"]
    assert [(j["id"], j["parent_id"], j["round"]) for j in orphan] == [(job["id"], parent, 2)]


def test_continue_reads_the_feedback_about_the_parent_a_data_set_or_votes_mixed_with_the_parents_data(
        client, app, settings):
    parent = finished_job(app, settings, name="chatty", algorithm="grpo")
    parent_config = client.get(f"/api/jobs/{parent}").json()["config"]
    better = give_feedback(client, f"job-{parent}/ppo", better="Green tea is, in moderation.")
    give_feedback(client, "job-55/ppo", better="Not this one.")

    on_feedback = continued(client, parent, reward_data="feedback", algorithm="dpo", name="on feedback")
    data = on_feedback["config"]["data"]
    assert on_feedback["config"]["algorithm"] == "dpo" and on_feedback["name"] == "on feedback"
    assert data["labels"] == "human" and data["votes_file"] is None and data["format"] == "preference"
    feedback_set = next(d for d in client.get("/api/datasets").json()["items"] if d["kind"] == "preference")
    assert stored(settings, feedback_set["source"]) == stored(settings, data["source"])
    assert [r["feedback_id"] for r in records(data["source"])] == [better["id"]], \
        "only the feedback about the parent's model"

    # KTO reads thumbs: the thumb about the parent's model, not the better answer.
    none = client.post(f"/api/jobs/{parent}/continue", json={"reward_data": "feedback", "algorithm": "kto"})
    assert none.status_code == 409 and "unpaired" in none.json()["detail"], none.text
    thumb = give_feedback(client, f"job-{parent}/ppo", rating=1)
    on_thumbs = continued(client, parent, reward_data="feedback", algorithm="kto")
    assert on_thumbs["config"]["data"]["format"] == "unpaired"
    assert [r["feedback_id"] for r in records(on_thumbs["config"]["data"]["source"])] == [thumb["id"]]

    demos = client.post("/api/feedback/snapshot", json={"kind": "demonstration", "model": f"job-{parent}/ppo"}).json()
    on_dataset = continued(client, parent, reward_data="dataset", dataset=feedback_set["id"], sft_dataset=demos["id"],
                           overrides={"ppo": {"steps": 3}})
    config = on_dataset["config"]
    assert config["data"]["source"] == data["source"] and config["ppo"]["steps"] == 3
    assert stored(settings, config["sft_data"]["source"]) == stored(settings, demos["source"])
    assert config["algorithm"] == "grpo"

    vote(app, f"job-{parent}/ppo", f"job-{parent}/sft")
    mixed = continued(client, parent, votes_weight=0.5)["config"]["data"]
    assert (mixed["source"], mixed["labels"]) == (parent_config["data"]["source"], parent_config["data"]["labels"])
    assert mixed["votes_weight"] == 0.5 and Path(mixed["votes_file"]).is_file()

    again = continued(client, parent, reward_data="parent")["config"]
    assert again["data"] == parent_config["data"] and again["round"]["number"] == 2


@pytest.mark.parametrize("body, loc, words", [
    ({"reward_data": "dataset"}, ["body", "dataset"], "needs the id"),
    ({"reward_data": "votes", "dataset": 1}, ["body", "dataset"], "reward_data=dataset"),
    ({"reward_data": "parent", "votes_weight": 0.5}, ["body", "votes_weight"], "only with reward_data=votes"),
    ({"reward_data": "parent", "overrides": {"round": {"number": 7}}}, ["body", "overrides"], "continuation's own"),
    ({"reward_data": "parent", "overrides": {"ppo": {"steps": 0}}}, ["body", "overrides", "ppo", "steps"], "must be"),
    ({"reward_data": "parent", "algorithm": "sarsa"}, ["body", "algorithm"], "ppo"),
    ({"reward_data": "parent", "votes_weight": 0}, ["body", "votes_weight"], "greater than 0"),
    ({"reward_data": "dataset", "dataset": 424242}, ["body", "datasets", "data"], "no data set"),
    ({"reward_data": "parent", "name": "a\x00b"}, ["body", "name"], "NUL"),
    ({"reward_data": "parent", "surprise": 1}, ["body", "surprise"], "not permitted"),
])
def test_bad_continue_bodies_get_422_naming_the_field_and_store_nothing(client, app, settings, body, loc, words):
    parent = finished_job(app, settings)
    before = row_counts(app)
    r = client.post(f"/api/jobs/{parent}/continue", json=body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"][0]
    assert detail["loc"] == loc and words in detail["msg"], detail
    assert row_counts(app) == before


def test_only_a_finished_job_with_an_aligned_policy_and_something_to_learn_from_is_continued(client, app, settings):
    assert client.post("/api/jobs/424242/continue", json={}).status_code == 404
    no_policy = finished_job(app, settings, name="failed before ppo", with_ppo=False)
    with app.state.sessions() as session:
        running = queue.create_job(session, name="running", preset="tiny", config=load_config("tiny").to_dict()).id
        assert queue.claim_next(session, "test-worker").id == running
    parent = finished_job(app, settings)
    before = row_counts(app)
    for job_id, body, words in ((running, {}, "running"), (no_policy, {}, "no aligned policy"),
                                (parent, {}, f"no vote about job-{parent}/ppo"),
                                (parent, {"reward_data": "feedback"}, f"no feedback about job-{parent}/ppo")):
        r = client.post(f"/api/jobs/{job_id}/continue", json=body)
        assert r.status_code == 409 and words in r.json()["detail"], (job_id, body, r.text)
    assert row_counts(app) == before
