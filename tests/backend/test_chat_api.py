"""The OpenAI-compatible chat API, checked with the real `openai` client against a running backend.

`edgerlhf backend` runs as a subprocess on a free port over a real SQLite file in a temp dir. Its jobs
are made through `db.queue` (created, claimed, finished or failed) and their run directories hold real
tiny artifacts (`tests/support/runs.py`): job 1 succeeded with base/SFT/PPO, job 2 failed after SFT, job 3 is
still running and serves nothing.
"""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from tests.support.backend import CHAT_ENV, CHAT_MAX_TOKENS, CHAT_TOKEN, start_backend
from tests.support.runs import make_jobs

TOKEN = CHAT_TOKEN
MAX_TOKENS = CHAT_MAX_TOKENS
MESSAGES = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "How far can spiders jump?"},
            {"role": "assistant", "content": "About a metre."},
            {"role": "user", "content": "And fleas?"}]


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("chat-data")
    make_jobs(data_dir)
    backend = start_backend(data_dir, **CHAT_ENV)
    yield backend.url, data_dir
    backend.stop()


@pytest.fixture(scope="module")
def client(backend) -> openai.OpenAI:
    url, _ = backend
    with openai.OpenAI(base_url=f"{url}/v1", api_key=TOKEN, max_retries=0, timeout=120) as c:
        yield c


def _error(exc: openai.APIStatusError) -> dict:
    body = exc.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    return body["error"]


def test_lists_the_models_of_finished_jobs(client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["job-2/base", "job-2/sft", "job-1/base", "job-1/sft", "job-1/ppo"]
    model = client.models.retrieve("job-1/ppo")
    assert model.id == "job-1/ppo" and model.owned_by == "edgerlhf" and model.created > 0


def test_plain_completion_with_usage(client, backend):
    from transformers import AutoTokenizer

    from edgerlhf.dialogue import render_chat

    _, data_dir = backend
    completion = client.chat.completions.create(model="job-1/ppo", messages=MESSAGES, max_tokens=20, seed=11)
    assert completion.object == "chat.completion" and completion.model == "job-1/ppo"
    (choice,) = completion.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.content and choice.message.content == choice.message.content.lstrip()
    assert choice.finish_reason in ("stop", "length")
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "runs" / "job-1" / "sft" / "merged")
    usage = completion.usage
    assert usage.prompt_tokens == len(tokenizer(render_chat(MESSAGES))["input_ids"])
    assert 1 <= usage.completion_tokens <= 20
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    if choice.finish_reason == "length":
        assert usage.completion_tokens == 20

    again = client.chat.completions.create(model="job-1/ppo", messages=MESSAGES, max_tokens=20, seed=11)
    assert again.choices[0].message.content == choice.message.content  # seeded: reproducible
    two = client.chat.completions.create(model="job-1/ppo", messages=MESSAGES, max_tokens=20, seed=11, n=2)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].message.content != two.choices[1].message.content
    # PPO's adapter changes the policy: greedy answers of SFT and PPO differ.
    greedy = {m: client.chat.completions.create(model=m, messages=MESSAGES, max_tokens=12, temperature=0)
              .choices[0].message.content for m in ("job-1/sft", "job-1/ppo")}
    assert greedy["job-1/sft"] != greedy["job-1/ppo"]


def test_streamed_chunks_join_to_the_same_text(client):
    params = dict(model="job-1/ppo", messages=MESSAGES, max_tokens=MAX_TOKENS, seed=3, temperature=0.9, top_p=0.95)
    full = client.chat.completions.create(**params)
    stream = client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(pieces) > 1  # streamed token by token, not in one piece
    assert "".join(pieces) == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == full.usage.model_dump()


def test_user_stop_string_cuts_the_same_sample(client):
    params = dict(model="job-1/sft", messages=MESSAGES, max_tokens=MAX_TOKENS, seed=5)
    text = client.chat.completions.create(**params).choices[0].message.content
    words = [w for w in text.split() if len(w) >= 2 and text.find(w) > 0]
    assert words, text
    stop = words[len(words) // 2]
    for stream in (False, True):
        if stream:
            got = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                **params, stop=[stop, "never-seen"], stream=True) if c.choices)
        else:
            cut = client.chat.completions.create(**params, stop=stop)
            got = cut.choices[0].message.content
            assert cut.choices[0].finish_reason == "stop"
        assert got == text[: text.find(stop)]


def test_concurrent_requests_are_served_correctly(client):
    params = dict(model="job-1/base", messages=MESSAGES, max_tokens=24, seed=9)
    expected = client.chat.completions.create(**params).choices[0].message.content
    results: list[str] = []

    def ask(stream: bool) -> None:
        if stream:
            results.append("".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                **params, stream=True) if c.choices))
        else:
            results.append(client.chat.completions.create(**params).choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [expected] * 4


def test_unknown_models_are_404(client):
    for name in ("job-99/ppo", "gpt-4o", "job-2/ppo", "job-3/sft"):
        with pytest.raises(openai.NotFoundError) as info:
            client.chat.completions.create(model=name, messages=MESSAGES)
        error = _error(info.value)
        assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "running" in _error(info.value)["message"]  # job 3 is not finished
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("job-3/sft")


@pytest.mark.parametrize("params, param", [
    ({"max_tokens": MAX_TOKENS + 1}, "max_tokens"),
    ({"temperature": 5}, "temperature"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"n": 9}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role"),
    ({"messages": [{"role": "assistant", "content": "only me"}]}, "messages"),
    ({"temperature": "hot"}, "temperature"),
    ({"stream": True, "max_tokens": 10_000}, "max_tokens"),
])
def test_bad_parameters_are_400(client, params, param):
    body = {"model": "job-1/sft", "messages": MESSAGES, **params}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**body)
    error = _error(info.value)
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_prompt_and_context_limits_are_400(client):
    long = [{"role": "user", "content": "spiders " * 400}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="job-1/sft", messages=long, max_tokens=4)
    error = _error(info.value)
    assert error["code"] == "context_length_exceeded" and "maximum prompt length" in error["message"]
    # 120 of the model's 128 positions in the prompt: 8 tokens of room, and asking for more is refused.
    fits = [{"role": "user", "content": "spiders " * 112}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="job-1/sft", messages=fits, max_tokens=40)
    assert _error(info.value)["code"] == "context_length_exceeded"
    short = client.chat.completions.create(model="job-1/sft", messages=fits, seed=1)  # no max_tokens: what fits
    assert short.usage.prompt_tokens + short.usage.completion_tokens <= 128


def test_invalid_json_and_missing_fields_are_400(backend):
    url, _ = backend
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    resp = httpx.post(f"{url}/v1/chat/completions", content=b"{not json", headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_json"
    resp = httpx.post(f"{url}/v1/chat/completions", json={"messages": MESSAGES}, headers=headers)
    assert resp.status_code == 400 and resp.json()["error"]["param"] == "model"
    huge = {"model": "job-1/sft", "messages": [{"role": "user", "content": "x" * 1_100_000}]}
    resp = httpx.post(f"{url}/v1/chat/completions", json=huge, headers=headers)
    assert resp.status_code == 413 and "larger than" in resp.json()["error"]["message"]


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"model": "\xc3\x28"}', b"[" * 5_000 + b"]" * 5_000,
                                  b'{"messages":' * 5_000 + b"[]" + b"}" * 5_000, b"plain garbage"])
def test_unparseable_bodies_are_openai_400(backend, body):
    """Bad UTF-8 and JSON nested too deep for the parser fail before validation: still OpenAI's 400."""
    url, _ = backend
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    resp = httpx.post(f"{url}/v1/chat/completions", content=body, headers=headers)
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == "invalid_json" and body["error"]["type"] == "invalid_request_error"


def test_missing_or_wrong_token_is_401(backend):
    url, _ = backend
    with openai.OpenAI(base_url=f"{url}/v1", api_key="wrong-token", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError) as info:
            bad.chat.completions.create(model="job-1/sft", messages=MESSAGES)
        assert _error(info.value)["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
    for path in ("/v1/models", "/v1/models/job-1/sft"):  # no Authorization header at all
        resp = httpx.get(f"{url}{path}")
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "invalid_api_key"
    resp = httpx.post(f"{url}/v1/chat/completions", json={"model": "job-1/sft", "messages": MESSAGES})
    assert resp.status_code == 401 and set(resp.json()["error"]) == {"message", "type", "param", "code"}


def test_deleting_a_job_removes_its_models(client, backend):
    url, data_dir = backend
    client.chat.completions.create(model="job-2/sft", messages=MESSAGES, max_tokens=2)  # loaded and cached
    resp = httpx.delete(f"{url}/api/jobs/2", headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 204, resp.text
    assert [m.id for m in client.models.list()] == ["job-1/base", "job-1/sft", "job-1/ppo"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="job-2/sft", messages=MESSAGES, max_tokens=2)
    assert "unloaded job-2/sft" in (data_dir / "backend.log").read_text()
