"""The Feedback page (Streamlit AppTest on the whole app) against a real backend process and SQLite file (issue 32).

- Without feedback the page says where feedback comes from.
- It lists the stored feedback newest first (model, rating, the prompt's last user turn, the reply, the better answer)
  with a count; the model, rating and better-answer filters narrow the list as the API's filters do; one item reads
  whole (every turn of the conversation, the reply, the better answer, its sampling settings).
- The client reads the backend's answer field by field: the same answer with a field renamed raises.
- Delete asks first (saying earlier data sets keep the feedback), "No" keeps it, "Yes" removes it, and a data set
  made before still holds it; the filtered feedback becomes a data set in place.
"""

from __future__ import annotations

import json

import httpx
import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from frontend.api_client import ApiClient, ContractError
from tests.support.dashboard import APP, TIMEOUT, answering

EARLIER = [{"role": "user", "content": "Hi, I have a question about eggs."},
           {"role": "assistant", "content": "Sure, go ahead."}]
FEEDBACK = [  # oldest first; ids 1, 2, 3
    {"model": "job-1/ppo", "messages": [*EARLIER, {"role": "user", "content": "How do I boil an egg?"}],
     "reply": "Put it in water.", "rating": -1, "better": "Simmer it for nine minutes, then cool it.",
     "sampling": {"temperature": 0.7, "top_p": 0.95, "max_tokens": 64, "seed": 4}, "completion_id": "chatcmpl-egg"},
    {"model": "job-1/sft", "messages": [{"role": "user", "content": "What do owls eat?"}],
     "reply": "Mice, mostly.", "rating": 1},
    {"model": "job-1/ppo", "messages": [{"role": "user", "content": "Name a jumping spider."}],
     "reply": "A cat.", "rating": -1},
]


def _store(backend) -> list[int]:
    ids = []
    for body in FEEDBACK:
        r = httpx.post(f"{backend.url}/api/feedback", json=body, timeout=30)
        assert r.status_code == 201, r.text
        ids.append(r.json()["id"])
    return ids


def _open() -> AppTest:
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/feedback.py").run()
    assert not at.exception, at.exception
    return at


def _listed(at: AppTest) -> pd.DataFrame:
    (table,) = at.table
    return table.value


def _count(at: AppTest) -> str:
    return next(m.value for m in at.markdown if "feedback row(s)" in m.value)


def test_without_feedback_the_page_says_where_it_comes_from(backend, dashboard_env):
    dashboard_env(backend.url)
    at = _open()
    assert [i.value for i in at.main.info] == ["No feedback yet: give a thumb or write a better answer under a reply "
                                               "on the **Chat** page."]
    assert not at.table and not at.error


def test_the_list_shows_the_feedback_newest_first_and_the_filters_narrow_it(backend, dashboard_env):
    dashboard_env(backend.url)
    egg, owl, spider = _store(backend)
    at = _open()
    listed = _listed(at)
    assert list(listed["id"]) == [spider, owl, egg]
    assert list(listed["model"]) == ["job-1/ppo", "job-1/sft", "job-1/ppo"]
    assert list(listed["rating"]) == ["down", "up", "down"]
    assert list(listed["prompt (last user turn)"]) == ["Name a jumping spider.", "What do owls eat?",
                                                       "How do I boil an egg?"]
    assert list(listed["reply"]) == ["A cat.", "Mice, mostly.", "Put it in water."]
    assert list(listed["better answer"]) == ["—", "—", "Simmer it for nine minutes, then cool it."]
    assert _count(at) == "**3** feedback row(s)."

    # Each filter narrows the list as the API's filter does, and the count says of how many.
    at.selectbox(key="fb_model").set_value("job-1/ppo").run()
    assert list(_listed(at)["id"]) == [spider, egg] and _count(at) == "**2** feedback row(s) match (of 3 in all)."
    at.selectbox(key="fb_better").set_value("With a better answer").run()
    assert list(_listed(at)["id"]) == [egg]
    at.selectbox(key="fb_better").set_value("Without one").run()
    assert list(_listed(at)["id"]) == [spider]
    at.selectbox(key="fb_model").set_value("Any")
    at.selectbox(key="fb_better").set_value("Any")
    at.selectbox(key="fb_rating").set_value("Thumbs up").run()
    assert list(_listed(at)["id"]) == [owl] and _count(at) == "**1** feedback row(s) match (of 3 in all)."
    at.selectbox(key="fb_better").set_value("With a better answer").run()  # no thumb up came with one
    assert not at.exception and not at.table
    assert [i.value for i in at.main.info] == ["No feedback matches these filters."]

    # One item read whole: every turn of the conversation, the reply, the better answer, the sampling settings.
    at.selectbox(key="fb_better").set_value("Any")
    at.selectbox(key="fb_rating").set_value("Any").run()
    at.selectbox(key="fb_pick").set_value(egg).run()
    assert not at.exception, at.exception
    bubbles = [(m.name, [md.value for md in m.markdown]) for m in at.chat_message]
    assert bubbles == [("user", ["Hi, I have a question about eggs."]), ("assistant", ["Sure, go ahead."]),
                       ("user", ["How do I boil an egg?"]), ("assistant", ["Put it in water."]),
                       ("assistant", ["Simmer it for nine minutes, then cool it."])]
    captions = [c.value for c in at.caption]
    assert "The better answer written for it" in captions
    assert ("Sampled with temperature 0.7 · top_p 0.95 · max_tokens 64 · seed 4 · completion `chatcmpl-egg`"
            in captions), captions


def test_delete_asks_first_and_earlier_data_sets_keep_the_feedback(backend, dashboard_env):
    dashboard_env(backend.url)
    egg, owl, spider = _store(backend)
    at = _open()

    # The filtered feedback (thumbs down) made into a data set in place: the ids of the rows listed.
    at.selectbox(key="fb_rating").set_value("Thumbs down").run()
    at.selectbox(key="fb_kind").set_value("unpaired")
    at.button(key="fb_snapshot").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    (made,) = httpx.get(f"{backend.url}/api/datasets", timeout=30).json()["items"]
    assert made["kind"] == "unpaired" and made["records"] == 2
    assert any(f"data set #{made['id']}" in s.value and f"#{egg}, #{spider}" in s.value for s in at.main.success)

    # Delete asks first; "No, keep it" keeps it.
    at.selectbox(key="fb_rating").set_value("Any").run()
    at.selectbox(key="fb_pick").set_value(spider).run()
    at.button(key="fb_delete").click().run()
    questions = [w.value for w in at.main.warning]
    assert len(questions) == 1 and questions[0].startswith(f"Delete feedback #{spider}?"), questions
    assert "Data sets made from it before keep it" in questions[0]
    at.button(key="fb_delete_no").click().run()
    assert not at.main.warning and list(_listed(at)["id"]) == [spider, owl, egg]

    # "Yes, delete it" removes it from the list and the API; the data set made before still holds it.
    at.button(key="fb_delete").click().run()
    at.button(key="fb_delete_yes").click().run()
    assert not at.exception, at.exception
    assert [s.value for s in at.main.success] == [f"Feedback #{spider} deleted. Data sets made from it before keep it."]
    assert list(_listed(at)["id"]) == [owl, egg] and _count(at) == "**2** feedback row(s)."
    assert at.selectbox(key="fb_pick").value == owl, "the picker moved to a row still listed"
    assert httpx.get(f"{backend.url}/api/feedback/{spider}", timeout=30).status_code == 404
    preview = httpx.get(f"{backend.url}/api/datasets/{made['id']}", timeout=30)
    assert preview.status_code == 200 and preview.json()["records"] == 2
    source = preview.json()["source"]
    with open(source, encoding="utf-8") as f:
        assert [json.loads(line)["feedback_id"] for line in f] == [egg, spider]


def test_the_client_reads_the_real_answer_and_refuses_a_renamed_field(backend):
    egg, _, _ = _store(backend)
    real = ApiClient(backend.url)
    items, total = real.list_feedback(has_better=True)
    assert [i["id"] for i in items] == [egg] and total == 1
    body = httpx.get(f"{backend.url}/api/feedback", timeout=30).json()
    assert real.list_feedback() == (body["items"], 3)
    renamed = {**body, "items": [{("better_answer" if k == "better" else k): v for k, v in body["items"][0].items()}]}
    without_total = {k: v for k, v in body.items() if k != "total"}
    for wrong in (renamed, without_total):
        with pytest.raises(ContractError):
            answering({"/api/feedback": wrong}).list_feedback()
