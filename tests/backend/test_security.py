"""The backend's edge, attacked through a real `edgerlhf backend` (uvicorn) with raw HTTP where a polite client would
not send what an attacker does (issue 28).

- The token is checked first: an unauthenticated body is never read, not even its size.
- The body limit counts the bytes received, whatever `Transfer-Encoding` says and in whatever case.
- A lone surrogate (`"\\ud800"`) anywhere in a body is refused with nothing stored; one already in the database
  cannot break a response; validation errors do not echo the input; unknown `/v1` paths answer in OpenAI's shape.
- Only trusted `Host` names are served (DNS rebinding), and a cross-site request cannot change state.
- Deeply nested overrides are a 422, config lists are bounded and deduplicated, the stored config is capped, and job
  lists and status events leave the config out.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest

from db import init_db, make_engine, make_sessionmaker, queue
from edgerlhf.config import ConfigError, load_config
from edgerlhf.locations import check_location

from tests.support import rawhttp
from tests.support.backend import start_backend
from tests.support.tiny import DATA_ONLY

TOKEN = "security-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JSON = {"Content-Type": "application/json"}
MAX_BODY_BYTES = 1_000_000
"""The default `EDGERLHF_MAX_BODY_BYTES`."""


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    """One backend for the module, with an API token and the default body limit (1 MB)."""
    b = start_backend(tmp_path_factory.mktemp("security") / "data", EDGERLHF_API_TOKEN=TOKEN)
    yield b
    b.stop()


@pytest.fixture(scope="module")
def api(backend):
    with httpx.Client(base_url=backend.url, headers=AUTH, timeout=30) as client:
        yield client


def host(backend) -> dict[str, str]:
    return {"Host": f"127.0.0.1:{backend.port}"}


def total(api) -> int:
    return api.get("/api/jobs").json()["total"]


def queued_job(api, name: str = "target") -> int:
    created = api.post("/api/jobs", json={"preset": "tiny", "name": name, "overrides": DATA_ONLY})
    assert created.status_code == 201, created.text
    return created.json()["id"]


# --- the token first (finding 19) --------------------------------------------------------------------


def test_without_the_token_no_body_is_read_not_even_its_size(backend, api):
    # A chunked body that never ends: the 401 must come at once, without waiting for it.
    started = time.monotonic()
    r = rawhttp.request(backend.port, "POST", "/api/jobs", {**host(backend), **JSON, "Transfer-Encoding": "chunked"},
                        [b"5\r\n{\"a\":\r\n"], timeout=10)
    assert r.status == 401 and "API token" in r.json()["detail"]
    assert time.monotonic() - started < 5
    # An oversized declared body without the token is a 401, not a 413: its size is nobody's business yet.
    r = rawhttp.request(backend.port, "POST", "/api/jobs", {**host(backend), **JSON, "Content-Length": "50000000"},
                        timeout=10)
    assert r.status == 401


# --- the body limit counts what arrives (finding 4) ----------------------------------------------------


@pytest.mark.parametrize("encoding", ["Chunked", "CHUNKED", "chunked"])
def test_a_chunked_body_over_the_limit_is_refused_in_any_case(backend, api, encoding):
    # One byte over the limit, and the body not even finished: the server must stop reading and answer 413. (Sending
    # no more than it reads also spares the test a connection reset: the server closes with nothing left unread.)
    over = rawhttp.chunked(b"x" * (MAX_BODY_BYTES + 1), end=False)
    r = rawhttp.request(backend.port, "POST", "/api/jobs",
                        {**host(backend), **AUTH, **JSON, "Transfer-Encoding": encoding}, over)
    assert r.status == 413, r.body[:300]
    assert "larger than" in r.json()["detail"]
    # Under the limit, a chunked body still works.
    before = total(api)
    small = json.dumps({"preset": "tiny", "name": "chunked", "overrides": DATA_ONLY}).encode()
    r = rawhttp.request(backend.port, "POST", "/api/jobs",
                        {**host(backend), **AUTH, **JSON, "Transfer-Encoding": encoding}, rawhttp.chunked(small, 7))
    assert r.status == 201, r.body[:300]
    assert total(api) == before + 1


# --- invalid Unicode (finding 5) ---------------------------------------------------------------------


SURROGATE_BODIES = [
    ("/api/jobs", '{"preset": "tiny", "name": "x\\ud800"}', ["body", "name"]),
    ("/api/jobs", '{"preset": "tiny", "overrides": {"data": {"split": "tr\\udc00ain"}}}',
     ["body", "overrides", "data", "split"]),
    ("/api/jobs", '{"preset": "tiny", "overrides": {"model": {"name_or_path": "/data/\\ud800"}}}',
     ["body", "overrides", "model", "name_or_path"]),
    ("/api/jobs", '{"preset": "tiny", "overrides": {"\\ud800": 1}}', ["body", "overrides"]),
    ("/api/plan", '{"preset": "tiny", "overrides": {"stages": ["data", "\\udfff"]}}',
     ["body", "overrides", "stages", 1]),
]


@pytest.mark.parametrize("path,body,loc", SURROGATE_BODIES)
def test_a_lone_surrogate_in_a_body_is_refused_and_nothing_is_stored(api, path, body, loc):
    before = total(api)
    r = api.post(path, content=body.encode(), headers=JSON)
    assert r.status_code == 422, r.text
    (error,) = r.json()["detail"]
    assert error["loc"] == loc and "surrogate" in error["msg"]
    assert r.content.isascii()
    assert total(api) == before
    assert api.get("/api/jobs").status_code == 200


def test_a_lone_surrogate_in_a_chat_body_is_refused_in_openais_shape(api):
    body = '{"model": "job-1/sft", "messages": [{"role": "user", "content": "hi \\ud83d"}]}'
    r = api.post("/v1/chat/completions", content=body.encode(), headers=JSON)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_unicode" and "messages.0.content" in r.json()["error"]["message"]


def test_a_body_that_is_not_utf8_is_refused(api):
    before = total(api)
    r = api.post("/api/jobs", content=b'{"preset": "tiny", "name": "\xed\xa0\x80"}', headers=JSON)  # CESU-8
    assert r.status_code == 400, r.text
    assert "UTF-8" in r.json()["detail"]
    assert total(api) == before


def test_a_lone_surrogate_already_stored_cannot_break_a_response(backend, api):
    """A job stored before the check (or written by another tool) still lists and reads: the response is ASCII JSON
    with the surrogate escaped, which a JSON parser reads back."""
    engine = make_engine(backend.db_url)
    init_db(engine)
    config = load_config("tiny", DATA_ONLY).to_dict()
    config["data"]["split"] = "tr\ud800ain"
    with make_sessionmaker(engine)() as session:
        job_id = queue.create_job(session, name="stored", preset="tiny", config=config).id
    engine.dispose()
    listed = api.get("/api/jobs")
    assert listed.status_code == 200, listed.text
    assert listed.content.isascii() and job_id in [j["id"] for j in listed.json()["items"]]
    one = api.get(f"/api/jobs/{job_id}")
    assert one.status_code == 200, one.text
    assert one.json()["config"]["data"]["split"] == "tr\ud800ain"
    with api.stream("GET", f"/api/jobs/{job_id}/events") as events:
        assert events.status_code == 200
        for line in events.iter_lines():
            if line.startswith("event: status"):
                break
    assert api.post(f"/api/jobs/{job_id}/cancel").status_code == 202


def test_the_config_and_the_path_check_refuse_a_lone_surrogate_themselves(tmp_path):
    """Behind the edge: the CLI and the worker build configs too, and a path is resolved on the disk."""
    with pytest.raises(ConfigError, match="surrogate") as exc:
        load_config("tiny", {"data": {"source": "/data/\ud800.jsonl"}})
    assert exc.value.field == "data.source"
    assert "surrogate" in check_location("/data/\udfff", [tmp_path])


def test_validation_errors_do_not_echo_the_input(api):
    r = api.post("/api/jobs", json={"preset": "tiny", "min_gpu_memory_mb": "ECHO-ME-NOT"})
    assert r.status_code == 422
    assert "ECHO-ME-NOT" not in r.text
    assert r.json()["detail"][0]["loc"] == ["body", "min_gpu_memory_mb"]


def test_unknown_v1_paths_answer_in_openais_shape(api):
    for method, path, status in [("GET", "/v1/no-such-thing", 404), ("GET", "/v1", 404), ("DELETE", "/v1/models", 405)]:
        r = api.request(method, path)
        assert r.status_code == status, (path, r.text)
        error = r.json()["error"]
        assert error["message"] and error["type"], (path, error)


# --- Host and Origin (finding 8) -----------------------------------------------------------------------


def test_only_trusted_host_names_are_served(backend, api):
    for name in ("rebound.attacker.example", f"rebound.attacker.example:{backend.port}", "127.0.0.1.nip.io"):
        r = api.get("/api/jobs", headers={"Host": name})
        assert r.status_code == 400, (name, r.text)
        assert "EDGERLHF_TRUSTED_HOSTS" in r.json()["detail"]
    job_id = queued_job(api)
    r = api.post(f"/api/jobs/{job_id}/cancel", headers={"Host": "rebound.attacker.example"})
    assert r.status_code == 400
    assert api.get(f"/api/jobs/{job_id}").json()["status"] == "queued"
    for name in (f"127.0.0.1:{backend.port}", f"localhost:{backend.port}", "LOCALHOST", f"[::1]:{backend.port}"):
        assert api.get("/api/jobs", headers={"Host": name}).status_code == 200, name
    # Liveness probes come by any name.
    assert httpx.get(f"{backend.url}/healthz", headers={"Host": "pod-10-0-0-7"}).status_code == 200
    r = rawhttp.request(backend.port, "GET", "/api/jobs", {**AUTH}, timeout=10)  # no Host at all (HTTP/1.1 needs one)
    assert r.status == 400


def test_a_cross_site_request_cannot_change_state(backend, api):
    job_id = queued_job(api)
    for headers in ({"Origin": "http://attacker.example"}, {"Origin": "null"},
                    {"Origin": f"http://localhost:{backend.port + 1 if backend.port < 65535 else 1}"},
                    {"Origin": f"https://127.0.0.1:{backend.port}"},
                    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": backend.url, "Sec-Fetch-Site": "cross-site"}):
        for method, path in [("POST", f"/api/jobs/{job_id}/cancel"), ("POST", f"/api/jobs/{job_id}/retry"),
                             ("DELETE", f"/api/jobs/{job_id}"), ("POST", "/api/jobs")]:
            r = api.request(method, path, headers=headers)
            assert r.status_code == 403, (method, headers, r.text)
            assert "cross-site" in r.json()["detail"]
    assert api.get(f"/api/jobs/{job_id}").json()["status"] == "queued"
    # Reads are no state change (and without CORS headers a foreign page cannot read the answer).
    assert api.get("/api/jobs", headers={"Origin": "http://attacker.example"}).status_code == 200
    # The same origin (the API docs' "Try it out") and clients that send neither header (curl, the dashboard) may.
    same = api.post(f"/api/jobs/{job_id}/cancel", headers={"Origin": backend.url, "Sec-Fetch-Site": "same-origin"})
    assert same.status_code == 202, same.text
    assert api.post(f"/api/jobs/{job_id}/retry").status_code == 200


# --- nesting, list and size bounds, light lists (findings 10 and 11) ------------------------------------


@pytest.mark.parametrize("path", ["/api/jobs", "/api/plan"])
@pytest.mark.parametrize("depth", [40, 700, 900])
def test_deeply_nested_overrides_are_a_422(api, path, depth):
    before = total(api)
    body = '{"preset": "tiny", "overrides": {"ppo": ' + '{"a": ' * depth + "1" + "}" * depth + "}}"
    r = api.post(path, content=body.encode(), headers=JSON)
    assert r.status_code == 422, r.text[:500]
    assert "nested" in r.json()["detail"][0]["msg"]
    assert len(r.content) < 2_000
    assert total(api) == before


def test_config_lists_are_bounded_and_deduplicated(api):
    before = total(api)
    many = api.post("/api/jobs", json={"preset": "tiny", "overrides": {
        **DATA_ONLY, "sft": {"target_modules": [f"m{i}" for i in range(95_000)]}}})
    assert many.status_code == 422, many.text[:300]
    assert many.json()["detail"][0]["loc"] == ["body", "overrides", "sft", "target_modules"]
    assert total(api) == before
    twice = api.post("/api/jobs", json={"preset": "tiny", "overrides": {
        **DATA_ONLY, "sft": {"target_modules": ["c_attn", "c_proj", "c_attn"], "modules_to_save": ["lm_head"] * 3}}})
    assert twice.status_code == 201, twice.text
    assert twice.json()["config"]["sft"]["target_modules"] == ["c_attn", "c_proj"]
    assert twice.json()["config"]["sft"]["modules_to_save"] == ["lm_head"]


def test_the_stored_config_is_capped(api):
    before = total(api)
    modules = [f"m{i}_" + "x" * 4_000 for i in range(40)]  # few items, long names
    r = api.post("/api/jobs", json={"preset": "tiny", "overrides": {**DATA_ONLY, "sft": {"target_modules": modules}}})
    assert r.status_code == 422, r.text[:300]
    assert "config" in r.json()["detail"][0]["msg"] and len(r.content) < 2_000
    assert total(api) == before


def test_job_lists_and_status_events_leave_the_config_out(api):
    job_id = queued_job(api, "light")
    (item,) = [j for j in api.get("/api/jobs").json()["items"] if j["id"] == job_id]
    assert "config" not in item and item["algorithm"] == "ppo" and item["stages"][0]["stage"] == "data"
    assert api.get(f"/api/jobs/{job_id}").json()["config"]["stages"] == ["data"]
    with api.stream("GET", f"/api/jobs/{job_id}/events") as events:
        name = None
        for line in events.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and name == "status":
                status = json.loads(line[5:])
                break
    assert status["id"] == job_id and status["status"] == "queued" and "config" not in status
    assert api.post(f"/api/jobs/{job_id}/cancel").status_code == 202
