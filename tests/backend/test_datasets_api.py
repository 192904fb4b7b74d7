"""The data set API in-process (TestClient on the real app and database, SQLite and PostgreSQL): uploads of every
file type, dedupe by content, the size limit, bad rows refused with their file, line and column and nothing stored,
previews through a chat template, hub ids offline, jobs that name data sets by id, and deletes refused while a job
reads one.

The files are the shared HH-RLHF sample converted by the test into each format (never copied into the repository).
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from backend.main import create_app
from db import queue
from edgerlhf import formats
from edgerlhf.config import HH_PREFS_SAMPLE, TINY_TOKENIZER_DIR
from edgerlhf.dialogue import normalize_prompt, to_messages

from tests.support.db import row_counts
from tests.support.tiny import DATA_ONLY, chat_template_tokenizer

N_ROWS = 24


def sample(n: int = N_ROWS) -> list[dict[str, str]]:
    """The first `n` pairs of the shared sample: {"prompt" (HH, canonical), "chosen", "rejected"}."""
    rows = []
    with open(HH_PREFS_SAMPLE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            rows.append({"prompt": normalize_prompt(row["prompt"]), "chosen": row["chosen"].strip(),
                         "rejected": row["rejected"].strip()})
            if len(rows) == n:
                return rows
    return rows


def conversational(rows: list[dict[str, str]]) -> list[dict]:
    """Pairs as UltraFeedback-binarized has them: chosen and rejected are whole conversations (implicit prompt)."""
    return [{"chosen": [*to_messages(r["prompt"]), {"role": "assistant", "content": r["chosen"]}],
             "rejected": [*to_messages(r["prompt"]), {"role": "assistant", "content": r["rejected"]}]} for r in rows]


def last_question(prompt: str) -> str:
    return to_messages(prompt)[-1]["content"]


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def csv_bytes(rows: list[dict[str, str]], columns: list[str]) -> bytes:
    import csv
    import io

    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue().encode()


def parquet_bytes(rows: list[dict]) -> bytes:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), out)
    return out.getvalue()


def upload(client, file_name: str, content: bytes, **form) -> httpx.Response:
    """POST the file with the form fields `form` (a dict as JSON, a bool as true/false)."""
    data = {k: (json.dumps(v) if isinstance(v, dict) else str(v).lower() if isinstance(v, bool) else v)
            for k, v in form.items()}
    return client.post("/api/datasets", files={"file": (file_name, content)}, data=data)


def stored_dirs(settings) -> list[Path]:
    """What the store holds on disk: the data sets' directories, and anything left in the incoming area."""
    root = settings.datasets_dir
    if not root.exists():
        return []
    return sorted(p for p in [*root.iterdir(), *(root / ".incoming").glob("*")] if p.is_dir() and p.name != ".incoming")


def test_every_file_type_is_stored_with_its_format_detected_and_the_same_content_is_one_data_set(client, settings):
    rows = sample()
    questions = [{"question": last_question(r["prompt"]), "reference": r["chosen"]} for r in rows]
    feedback = [{"prompt": q["question"], "completion": r["chosen"], "label": i % 2 == 0}
                for i, (q, r) in enumerate(zip(questions, rows))]
    files = {  # file name -> (content, form, expected kind, conversational)
        "prefs.jsonl": (jsonl(rows), {}, "preference", False),
        "prefs.json": (json.dumps(rows).encode(), {}, "preference", False),
        "chat-prefs.parquet": (parquet_bytes(conversational(rows)), {}, "preference", True),
        "demos.jsonl.gz": (gzip.compress(jsonl([{"messages": c["chosen"]} for c in conversational(rows)])), {},
                           "demonstration", True),
        "questions.csv": (csv_bytes(questions, ["question", "reference"]), {"columns": {"question": "prompt"}},
                          "prompt", False),
        "feedback.csv.gz": (gzip.compress(csv_bytes(feedback, ["prompt", "completion", "label"])), {}, "unpaired",
                            False),
    }
    ids = {}
    for name, (content, form, kind, conv) in files.items():
        r = upload(client, name, content, **form)
        assert r.status_code == 201, (name, r.text)
        body = r.json()
        assert (body["kind"], body["conversational"], body["rows"], body["duplicate"]) == (kind, conv, N_ROWS, False), \
            (name, body)
        assert body["file_name"] == name and body["name"] == name and body["size"] == len(content)
        assert body["reason"] and body["columns"] == (form.get("columns"))
        source = Path(body["source"])
        assert source == settings.datasets_dir / body["sha256"] / name and source.read_bytes() == content
        ids[name] = body["id"]
    demos = client.get(f"/api/datasets/{ids['demos.jsonl.gz']}").json()
    assert demos["records"] >= N_ROWS and demos["sections"] == ["data", "sft_data", "prompt_data"]
    assert client.get(f"/api/datasets/{ids['questions.csv']}").json()["sections"] == ["data", "prompt_data"]

    # The same bytes again, under another name: the stored data set, nothing new on disk or in the database.
    before = row_counts(client.app)
    again = upload(client, "copy of prefs.jsonl", jsonl(rows), name="another name")
    assert again.status_code == 200 and again.json()["duplicate"] is True and again.json()["id"] == ids["prefs.jsonl"]
    assert row_counts(client.app) == before
    assert len(stored_dirs(settings)) == len(files)
    # ... but read another way it is refused: one data set per content.
    other = upload(client, "prefs.jsonl", jsonl(rows), format="prompt")
    assert other.status_code == 409 and f"data set #{ids['prefs.jsonl']}" in other.json()["detail"]
    listed = client.get("/api/datasets").json()["items"]
    assert [d["id"] for d in listed] == sorted(ids.values(), reverse=True)
    spec = client.get("/openapi.json").json()
    assert {"/api/datasets", "/api/datasets/hub", "/api/datasets/{dataset_id}",
            "/api/datasets/{dataset_id}/preview"} <= set(spec["paths"])
    assert "datasets" in spec["components"]["schemas"]["JobCreate"]["properties"]
    assert {"DatasetPublic", "DatasetPreview", "DatasetRefs", "DatasetHubCreate"} <= set(spec["components"]["schemas"])


@pytest.mark.parametrize("name, content, where, column", [
    ("bad.jsonl", jsonl(sample(6)[:4] + [{"prompt": "Human: hi", "chosen": "Hello."}] + sample(6)[4:]), "bad.jsonl:5",
     "'rejected'"),
    ("bad.jsonl", jsonl(sample(3)) + b'{"prompt": "Human: hi", "chosen": \n' + jsonl(sample(3)), "bad.jsonl:4",
     "invalid JSON"),
    # CSV: line 1 is the header, so the third row is line 4; its prompt cell is empty.
    ("bad.csv", csv_bytes([{"prompt": "Hi?", "completion": "Hello."}, {"prompt": "Why?", "completion": "Because."},
                           {"prompt": "", "completion": "No prompt."}], ["prompt", "completion"]), "bad.csv:4",
     "'prompt'"),
])
def test_a_bad_row_is_a_422_naming_file_line_and_column_and_nothing_is_stored(client, settings, name, content, where,
                                                                             column):
    before = row_counts(client.app)
    r = upload(client, name, content)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "file"]
    assert error["msg"].startswith(where + ":") and column in error["msg"], error["msg"]
    assert str(settings.data_dir) not in error["msg"], "the server's paths stay on the server"
    assert row_counts(client.app) == before
    assert stored_dirs(settings) == [], "nothing half-stored"

    # Accepted without its bad rows when asked: counted, and the preview names them by file and line.
    kept = upload(client, name, content, skip_bad_rows=True)
    assert kept.status_code == 201, kept.text
    assert kept.json()["bad_rows"] == 1 and kept.json()["bad_row_examples"][0].startswith(where + ":")
    view = client.get(f"/api/datasets/{kept.json()['id']}/preview", params={"model": TINY_TOKENIZER_DIR})
    assert view.status_code == 200, view.text
    assert view.json()["bad_rows"] == 1 and view.json()["problems"][0].startswith(where + ":")


def test_uploads_past_the_size_limit_are_413_and_leave_nothing(settings):
    limited = settings.model_copy(update={"max_upload_bytes": 40_000})
    small, large = jsonl(sample(8)), next(b for n in range(8, 1000) if len(b := jsonl(sample(n))) > 45_000)
    assert len(small) < 40_000 < len(large) < 40_000 + 64 * 1024  # the form's room: the route counts the file itself
    with TestClient(create_app(limited), base_url="http://localhost") as client:
        before = row_counts(client.app)
        r = upload(client, "large.jsonl", large)  # the body fits the edge's limit, the file not the route's
        assert r.status_code == 413 and "40,000 bytes" in r.json()["detail"], r.text
        huge = jsonl(sample(1000)) * 2
        r = upload(client, "huge.jsonl", huge)  # a declared length past the limit: refused before it is read
        assert r.status_code == 413 and "with its form fields" in r.json()["detail"], r.text  # by the edge
        request = client.build_request("POST", "/api/datasets", files={"file": ("huge.jsonl", huge)})
        body = request.read()
        r = client.post("/api/datasets", headers={"content-type": request.headers["content-type"]},
                        content=(body[i:i + 8192] for i in range(0, len(body), 8192)))  # chunked: counted as it comes
        assert r.request.headers.get("transfer-encoding") == "chunked" and "content-length" not in r.request.headers
        assert r.status_code == 413 and "with its form fields" in r.json()["detail"], r.text  # the edge counted
        assert row_counts(client.app) == before and stored_dirs(limited) == []
        assert upload(client, "small.jsonl", small).status_code == 201
        # Every other body keeps the 1 MB limit, also on this path.
        assert client.post("/api/datasets/hub", content=b"{" + b" " * 1_100_000 + b"}",
                           headers={"content-type": "application/json"}).status_code == 413


def test_preview_shows_rows_through_the_chat_template_with_lengths_and_drops(client, settings):
    model_dir = settings.data_dir / "models" / "chatml"  # under the data directory: an allowed root
    tokenizer = chat_template_tokenizer(model_dir)
    added = upload(client, "chat.parquet", parquet_bytes(conversational(sample()))).json()
    rows = formats.read(added["source"]).records  # the stored records: prompts as the pipeline keeps them
    r = client.get(f"/api/datasets/{added['id']}/preview", params={
        "model": str(model_dir), "limit": 3, "max_prompt_tokens": 40, "max_response_tokens": 60})
    assert r.status_code == 200, r.text
    view = r.json()
    assert view["chat_template"] is True and view["kind"] == "preference" and view["conversational"] is True
    assert (view["rows"], view["records"], view["measured"]) == (N_ROWS, N_ROWS, N_ROWS)
    assert len(view["rows_shown"]) == 3

    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    for shown, row in zip(view["rows_shown"], rows):
        # The prompt as the model sees it: ChatML turns, up to where the answer begins, without the answer.
        assert shown["prompt"].startswith("<|im_start|>user\n") and shown["prompt"].endswith("<|im_start|>assistant\n")
        assert last_question(row["prompt"]) in shown["prompt"] and row["chosen"] not in shown["prompt"]
        chosen, rejected = shown["answers"]
        assert (chosen["role"], rejected["role"]) == ("chosen", "rejected")
        assert chosen["text"] == row["chosen"] + "<|im_end|>\n" and rejected["text"] == row["rejected"] + "<|im_end|>\n"
        assert shown["prompt_tokens"] == count(row["prompt"]) and chosen["tokens"] == count(" " + row["chosen"])
    # The histograms count every measured prompt and every answer; the drops are the data stage's at these budgets.
    prompt_lengths = [count(r["prompt"]) for r in rows]
    answer_lengths = [[count(" " + r[k]) for k in ("chosen", "rejected")] for r in rows]
    assert sum(view["prompt_tokens"]["counts"]) == N_ROWS and sum(view["answer_tokens"]["counts"]) == 2 * N_ROWS
    assert view["prompt_tokens"]["max"] == max(prompt_lengths)
    too_long = sum(p > 40 for p in prompt_lengths)
    answers_too_long = sum(p <= 40 and max(a) > 60 for p, a in zip(prompt_lengths, answer_lengths))
    assert 0 < too_long < N_ROWS and answers_too_long > 0
    assert view["dropped"].get("prompt_too_long") == too_long
    assert view["dropped"].get("response_too_long") == answers_too_long
    assert view["kept"] == N_ROWS - sum(view["dropped"].values())

    # The same rows through the GPT-2 tokenizer (no template): the HH text itself.
    plain = client.get(f"/api/datasets/{added['id']}/preview", params={"model": TINY_TOKENIZER_DIR, "limit": 1}).json()
    assert plain["chat_template"] is False and plain["rows_shown"][0]["prompt"] == rows[0]["prompt"]
    # A model outside the allowed roots, or one the offline hub cannot give: a 422 saying why, never a 5xx.
    outside = client.get(f"/api/datasets/{added['id']}/preview", params={"model": "/etc"})
    assert outside.status_code == 422 and outside.json()["detail"][0]["loc"] == ["query", "model"]
    offline = client.get(f"/api/datasets/{added['id']}/preview", params={"model": "no-such-org/no-such-model"})
    assert offline.status_code == 422, offline.text
    assert offline.json()["detail"][0]["loc"] == ["query", "model"]
    assert "no-such-org/no-such-model" in offline.json()["detail"][0]["msg"] and "offline" in offline.text
    assert client.get("/api/datasets/999/preview", params={"model": TINY_TOKENIZER_DIR}).status_code == 404


def test_a_hub_id_offline_is_a_clear_422_and_registers_nothing(client):
    before = row_counts(client.app)
    r = client.post("/api/datasets/hub", json={"hub_id": "trl-lib/ultrafeedback_binarized", "split": "train"})
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == ["body", "hub_id"]
    assert "trl-lib/ultrafeedback_binarized" in error["msg"] and "offline" in error["msg"] and "upload" in error["msg"]
    bad = client.post("/api/datasets/hub", json={"hub_id": "Anthropic/hh-rlhf", "data_dir": "../etc"})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "data_dir"]
    assert row_counts(client.app) == before


def test_a_job_names_its_data_sets_by_id_per_stage(client, app):
    rows = sample()
    prefs = upload(client, "prefs.jsonl", jsonl(rows)).json()
    demos = upload(client, "demos.csv", csv_bytes([{"question": last_question(r["prompt"]), "answer": r["chosen"]}
                                                   for r in rows], ["question", "answer"]),
                   columns={"question": "prompt", "answer": "completion"}).json()
    prompts = upload(client, "prompts.jsonl", jsonl([{"prompt": last_question(r["prompt"]), "reference": r["chosen"]}
                                                     for r in rows])).json()
    assert (prefs["kind"], demos["kind"], prompts["kind"]) == ("preference", "demonstration", "prompt")

    created = client.post("/api/jobs", json={"preset": "tiny", "overrides": {**DATA_ONLY, "sft_data": {"max_rows": 10}},
                                             "datasets": {"data": prefs["id"], "sft_data": demos["id"],
                                                          "prompt_data": prompts["id"]}})
    assert created.status_code == 201, created.text
    config = created.json()["config"]
    assert config["data"]["source"] == prefs["source"] and config["data"]["max_pairs"] == 20
    # Read as they were detected (`auto`, with their column mapping); the job's own fields of a section stay.
    assert config["sft_data"] == {**config["sft_data"], "source": demos["source"], "format": "auto",
                                  "columns": {"question": "prompt", "answer": "completion"}, "max_rows": 10}
    assert config["prompt_data"]["source"] == prompts["source"] and config["prompt_data"]["columns"] is None
    forced = upload(client, "as-prompts.jsonl", jsonl(rows[:10]), format="prompt").json()  # pairs read as prompts
    assert forced["kind"] == "prompt"
    config = client.post("/api/jobs", json={"preset": "tiny", "overrides": DATA_ONLY,
                                            "datasets": {"prompt_data": forced["id"]}}).json()["config"]
    assert (config["prompt_data"]["source"], config["prompt_data"]["format"]) == (forced["source"], "prompt")
    # Demonstrations as a job's main data: the preset's gold labels (which relabel pairs) give way to human ones.
    config = client.post("/api/jobs", json={"preset": "tiny", "overrides": DATA_ONLY,
                                            "datasets": {"data": demos["id"]}}).json()["config"]
    assert (config["data"]["source"], config["data"]["labels"]) == (demos["source"], "human")

    # Refused, naming the field, and nothing stored: no such data set, a kind the stage cannot read, two sources.
    before = row_counts(app)
    for datasets, overrides, words in [
        ({"data": 999}, {}, "no data set 999"),
        ({"sft_data": prompts["id"]}, {}, "holds prompt data"),
        ({"data": prefs["id"]}, {"data": {"source": HH_PREFS_SAMPLE}}, "data.source is set in the overrides too"),
        ({"data": demos["id"]}, {"data": {"labels": "gold"}}, "data.labels=gold relabels preference pairs"),
    ]:
        r = client.post("/api/jobs", json={"preset": "tiny", "overrides": {**DATA_ONLY, **overrides},
                                           "datasets": datasets})
        assert r.status_code == 422, r.text
        (error,) = r.json()["detail"]
        assert error["loc"] == ["body", "datasets", next(iter(datasets))] and words in error["msg"], error
    assert client.post("/api/jobs", json={"preset": "tiny", "datasets": {"data": "1"}}).status_code == 422  # an id
    assert row_counts(app) == before
    # A path under the allowed roots works as before.
    assert client.post("/api/jobs", json={"preset": "tiny", "overrides": {
        **DATA_ONLY, "data": {"source": HH_PREFS_SAMPLE}}}).status_code == 201


def test_a_data_set_cannot_be_deleted_while_a_queued_or_running_job_reads_it(client, app, settings):
    added = upload(client, "prefs.jsonl", jsonl(sample())).json()
    job = client.post("/api/jobs", json={"preset": "tiny", "overrides": DATA_ONLY,
                                         "datasets": {"data": added["id"]}}).json()
    assert client.get(f"/api/datasets/{added['id']}").json()["used_by"] == [job["id"]]
    # A job naming the stored file by its path (an allowed root) reads it too.
    by_path = client.post("/api/jobs", json={"preset": "tiny", "overrides": {
        **DATA_ONLY, "prompt_data": {"source": str(Path(added["source"]).parent)}}}).json()
    assert client.get("/api/datasets").json()["items"][0]["used_by"] == [job["id"], by_path["id"]]

    refused = client.delete(f"/api/datasets/{added['id']}")
    assert refused.status_code == 409 and f"#{job['id']}" in refused.json()["detail"]
    assert Path(added["source"]).exists()
    with app.state.sessions() as s:  # the first finishes as cancelled (queued: at once), the second is claimed
        queue.request_cancel(s, job["id"])
        assert queue.claim_next(s, "test-worker").id == by_path["id"]
    assert client.delete(f"/api/datasets/{added['id']}").status_code == 409  # running
    with app.state.sessions() as s:
        assert queue.finish(s, by_path["id"], "test-worker")
    assert client.delete(f"/api/datasets/{added['id']}").status_code == 204
    assert client.get(f"/api/datasets/{added['id']}").status_code == 404
    assert stored_dirs(settings) == [] and not Path(added["source"]).exists()
    # A job on a deleted data set is refused by name.
    gone = client.post("/api/jobs", json={"preset": "tiny", "overrides": DATA_ONLY, "datasets": {"data": added["id"]}})
    assert gone.status_code == 422 and gone.json()["detail"][0]["loc"] == ["body", "datasets", "data"]
    # The same content uploaded again is a new data set (the old one's id is never handed out again).
    again = upload(client, "prefs.jsonl", jsonl(sample()))
    assert again.status_code == 201 and again.json()["id"] > added["id"]
