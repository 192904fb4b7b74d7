"""Feedback from chat (issue 32), on a real database (SQLite and PostgreSQL): a thumb and/or a better answer about a
reply is stored with its conversation, model, sampling and completion id; listed and filtered; deleted; and made into
a data set of unpaired thumbs, demonstrations or preference pairs whose records name their feedback, which a job
reads. Deleting feedback leaves an earlier snapshot as it was."""

from __future__ import annotations

import json
from pathlib import Path

CONVERSATION = [{"role": "user", "content": "How do I boil an egg?"}]


def give(client, **fields) -> dict:
    body = {"model": "job-3/ppo", "messages": CONVERSATION, "reply": "Put it in water.", **fields}
    r = client.post("/api/feedback", json=body)
    assert r.status_code == 201, r.text
    return r.json()


def records_of(settings, dataset: dict) -> list[dict]:
    path = Path(settings.data_dir) / dataset["source"] if not Path(dataset["source"]).is_absolute() else \
        Path(dataset["source"])
    files = [path] if path.is_file() else sorted(path.glob("*.jsonl"))
    return [json.loads(line) for f in files for line in f.read_text().splitlines()]


def test_feedback_is_stored_listed_filtered_and_deleted(client):
    up = give(client, rating=1, sampling={"temperature": 0.7, "max_tokens": 64}, completion_id="chatcmpl-1")
    down = give(client, rating=-1, better="Simmer it for nine minutes.", model="job-3/sft")
    only_better = give(client, better="Boil water, add the egg, wait nine minutes.")
    assert up["sampling"] == {"temperature": 0.7, "max_tokens": 64} and up["completion_id"] == "chatcmpl-1"
    assert up["messages"] == CONVERSATION and up["created_at"]
    listed = client.get("/api/feedback").json()
    assert listed["total"] == 3 and [f["id"] for f in listed["items"]] == [only_better["id"], down["id"], up["id"]]
    assert [f["id"] for f in client.get("/api/feedback", params={"rating": -1}).json()["items"]] == [down["id"]]
    assert [f["id"] for f in client.get("/api/feedback", params={"model": "job-3/sft"}).json()["items"]] == [down["id"]]
    assert {f["id"] for f in client.get("/api/feedback", params={"has_better": True}).json()["items"]} == \
        {down["id"], only_better["id"]}
    assert client.delete(f"/api/feedback/{up['id']}").status_code == 204
    assert client.get(f"/api/feedback/{up['id']}").status_code == 404
    assert client.get("/api/feedback").json()["total"] == 2


def test_feedback_that_says_nothing_or_is_malformed_is_a_422_naming_the_field(client):
    nothing = client.post("/api/feedback", json={"model": "job-3/ppo", "messages": CONVERSATION, "reply": "x"})
    assert nothing.status_code == 422 and "rating, a better answer" in nothing.text
    sideways = client.post("/api/feedback", json={"model": "job-3/ppo", "messages": CONVERSATION, "reply": "x",
                                                  "rating": 2})
    assert sideways.status_code == 422 and sideways.json()["detail"][0]["loc"][:2] == ["body", "rating"]
    ends_with_reply = client.post("/api/feedback", json={
        "model": "m", "messages": [*CONVERSATION, {"role": "assistant", "content": "hm"}], "reply": "x", "rating": 1})
    assert ends_with_reply.status_code == 422 and "end with the user's message" in ends_with_reply.text
    assert client.get("/api/feedback").json()["total"] == 0


def test_snapshots_are_data_sets_a_job_reads_and_deleting_feedback_leaves_earlier_ones_whole(client, settings):
    up = give(client, rating=1)
    down = give(client, rating=-1, better="Simmer it for nine minutes.")
    better = give(client, better="Boil water, add the egg, wait nine minutes.", model="job-4/ppo")

    r = client.post("/api/feedback/snapshot", json={"kind": "unpaired"})
    assert r.status_code == 201, r.text
    thumbs = r.json()
    assert thumbs["feedback_ids"] == [up["id"], down["id"]] and thumbs["kind"] == "unpaired"
    assert [(x["feedback_id"], x["label"]) for x in records_of(settings, thumbs)] == [(up["id"], True),
                                                                                     (down["id"], False)]
    again = client.post("/api/feedback/snapshot", json={"kind": "unpaired"})
    assert again.status_code == 200 and again.json()["id"] == thumbs["id"]  # the same records: the same data set

    pairs = client.post("/api/feedback/snapshot", json={"kind": "preference"}).json()
    assert pairs["feedback_ids"] == [down["id"], better["id"]] and pairs["kind"] == "preference"
    first = records_of(settings, pairs)[0]
    assert first["chosen"][0]["content"] == "Simmer it for nine minutes." and first["rejected"][0]["content"] == \
        "Put it in water." and first["prompt"] == CONVERSATION
    demos = client.post("/api/feedback/snapshot", json={"kind": "demonstration", "model": "job-4/ppo"}).json()
    assert demos["feedback_ids"] == [better["id"]]

    job = client.post("/api/jobs", json={"preset": "tiny", "name": "next round", "overrides": {"stages": ["data"]},
                                         "datasets": {"data": pairs["id"], "sft_data": demos["id"]}})
    assert job.status_code == 201, job.text

    assert client.delete(f"/api/feedback/{down['id']}").status_code == 204
    later = client.post("/api/feedback/snapshot", json={"kind": "unpaired"}).json()
    assert later["feedback_ids"] == [up["id"]] and later["id"] != thumbs["id"]
    assert [x["feedback_id"] for x in records_of(settings, thumbs)] == [up["id"], down["id"]]  # immutable
    none = client.post("/api/feedback/snapshot", json={"kind": "demonstration", "model": "job-3/ppo"})
    assert none.status_code == 422 and none.json()["detail"][0]["loc"] == ["body", "kind"]
