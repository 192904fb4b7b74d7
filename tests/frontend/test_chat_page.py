"""The Chat page (Streamlit AppTest) against a real running backend with real tiny models.

The page must list the models of finished jobs, keep a multi-turn conversation whose streamed replies
are exactly what the OpenAI-compatible API answers for the same messages and seed, send one message to
both policies in side-by-side mode, and show the API's error instead of a reply when it refuses.
"""

from __future__ import annotations

import openai
import pytest
from streamlit.testing.v1 import AppTest

from frontend.api_client import TOKEN_KEY
from tests.support.backend import CHAT_ENV, CHAT_TOKEN, start_backend
from tests.support.procs import REPO_ROOT
from tests.support.runs import make_jobs

PAGE = str(REPO_ROOT / "frontend" / "app_pages" / "chat.py")
SEED = 4
MAX_TOKENS = 40
"""The page's "Max new tokens" slider: min(64, EDGERLHF_CHAT_MAX_TOKENS)."""


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("chat-page")
    make_jobs(data_dir)
    backend = start_backend(data_dir, **{**CHAT_ENV, "EDGERLHF_CHAT_MAX_TOKENS": str(MAX_TOKENS)})
    yield backend.url
    backend.stop()


@pytest.fixture
def page(backend, monkeypatch):
    from edgerlhf.settings import get_settings

    monkeypatch.setenv("EDGERLHF_BACKEND_URL", backend)
    monkeypatch.setenv("EDGERLHF_CHAT_MAX_TOKENS", str(MAX_TOKENS))
    get_settings.cache_clear()
    at = AppTest.from_file(PAGE, default_timeout=120)
    at.session_state[TOKEN_KEY] = CHAT_TOKEN  # what this browser session typed at the login (frontend/login.py)
    at.run()
    assert not at.exception, at.exception
    yield at
    get_settings.cache_clear()


def _api_reply(backend: str, model: str, messages: list[dict[str, str]]) -> str:
    """What the API answers with the page's default sampling settings and our seed."""
    with openai.OpenAI(base_url=f"{backend}/v1", api_key=CHAT_TOKEN, max_retries=0) as client:
        return client.chat.completions.create(model=model, messages=messages, temperature=0.7, top_p=0.95,
                                              max_tokens=MAX_TOKENS, seed=SEED).choices[0].message.content


def _bubbles(container) -> list[tuple[str, str]]:
    return [(m.name, m.markdown[0].value if m.markdown else "") for m in container.chat_message]


def test_multi_turn_chat_streams_the_api_reply(page, backend):
    assert page.selectbox(key="chat_model").options == ["job-2/base", "job-2/sft", "job-1/base", "job-1/sft",
                                                         "job-1/ppo"]
    page.selectbox(key="chat_model").set_value("job-1/ppo")
    page.number_input(key="chat_seed").set_value(SEED)
    page.chat_input(key="chat_input").set_value("How far can spiders jump?").run()
    assert not page.exception and not page.error, page.error

    first = [{"role": "user", "content": "How far can spiders jump?"}]
    reply1 = _api_reply(backend, "job-1/ppo", first)
    assert _bubbles(page) == [("user", "How far can spiders jump?"), ("assistant", reply1)]

    page.chat_input(key="chat_input").set_value("And fleas?").run()
    second = first + [{"role": "assistant", "content": reply1}, {"role": "user", "content": "And fleas?"}]
    reply2 = _api_reply(backend, "job-1/ppo", second)
    assert _bubbles(page) == [("user", "How far can spiders jump?"), ("assistant", reply1),
                              ("user", "And fleas?"), ("assistant", reply2)]

    # Each model keeps its own conversation; Clear empties the current one.
    page.selectbox(key="chat_model").set_value("job-1/sft").run()
    assert _bubbles(page) == []
    page.selectbox(key="chat_model").set_value("job-1/ppo").run()
    assert len(_bubbles(page)) == 4
    page.button(key="chat_clear").click().run()
    assert _bubbles(page) == []


def test_side_by_side_sends_one_message_to_sft_and_ppo(page, backend):
    page.radio(key="chat_mode").set_value("Side by side: SFT vs PPO").run()
    assert page.selectbox(key="chat_pair").options == ["job-1"]  # job 2 has no PPO policy
    page.number_input(key="chat_seed").set_value(SEED)
    page.chat_input(key="chat_input_pair").set_value("Tell me about spiders.").run()
    assert not page.exception and not page.error, page.error

    message = [{"role": "user", "content": "Tell me about spiders."}]
    sft, ppo = page.columns[-2], page.columns[-1]
    assert _bubbles(sft) == [("user", "Tell me about spiders."), ("assistant", _api_reply(backend, "job-1/sft", message))]
    assert _bubbles(ppo) == [("user", "Tell me about spiders."), ("assistant", _api_reply(backend, "job-1/ppo", message))]
    assert _bubbles(sft)[1] != _bubbles(ppo)[1]


def test_refused_message_shows_the_api_error_and_is_not_kept(page):
    page.selectbox(key="chat_model").set_value("job-1/sft")
    page.chat_input(key="chat_input").set_value("spiders " * 400).run()
    assert not page.exception
    assert any("maximum prompt length" in e.value for e in page.error), [e.value for e in page.error]
    page.run()  # the refused message was dropped from the conversation
    assert _bubbles(page) == []


def test_a_thumb_and_a_better_answer_under_a_reply_are_stored_with_the_conversation(page, backend):
    """Issue 32: under each reply, 👍/👎 and "Write a better answer" go to `POST /api/feedback` with the conversation
    up to the reply, the model, the reply's sampling settings and its completion id."""
    import httpx

    page.selectbox(key="chat_model").set_value("job-1/sft")
    page.number_input(key="chat_seed").set_value(SEED)
    page.chat_input(key="chat_input").set_value("What do owls eat?").run()
    assert not page.exception and not page.error, page.error
    answer = _bubbles(page)[1][1]
    page.feedback(key="chat:job-1/sft:1:thumb").set_value(0).run()  # thumb down
    page.text_area(key="chat:job-1/sft:1:better").input("Mice, insects and small birds.")
    page.button(key="chat:job-1/sft:1:save").click().run()
    assert not page.exception and not page.error, page.error
    headers = {"Authorization": f"Bearer {CHAT_TOKEN}"}
    stored = httpx.get(f"{backend}/api/feedback", params={"model": "job-1/sft"}, headers=headers).json()["items"]
    better, thumb = stored  # newest first
    assert thumb["rating"] == -1 and thumb["better"] is None and better["better"] == "Mice, insects and small birds."
    for row in stored:
        assert row["messages"] == [{"role": "user", "content": "What do owls eat?"}] and row["reply"] == answer
        assert row["completion_id"] and row["sampling"]["seed"] == SEED and row["sampling"]["max_tokens"] == MAX_TOKENS
    assert any(f"#{thumb['id']}" in c.value for c in page.caption), "the page says it was saved"
    page.run()  # a rerun stores nothing twice
    assert httpx.get(f"{backend}/api/feedback", headers=headers).json()["total"] == 2
