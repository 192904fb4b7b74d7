"""The Data sets page and the New job form's data set pickers with Streamlit's AppTest, against a real backend process
(AppTest cannot drive a file uploader: the file goes in through the API, as the page's upload does; the browser test
`test_datasets_browser.py` uploads through the page itself).

- The page lists the data set, says what was detected and why, and previews it through the chosen tokenizer: each
  row's prompt and answers in separate code blocks, token counts, the histograms, and the drops at the budgets,
  which follow the budget fields.
- The New job form offers each stage only the data sets it can read, and a job launched with one reads its file.
"""

from __future__ import annotations

import json

import httpx
from streamlit.testing.v1 import AppTest

from edgerlhf.config import HH_PREFS_SAMPLE

from tests.support.dashboard import APP, TIMEOUT

N_ROWS = 30


def _upload(backend, name: str, rows: list[dict]) -> dict:
    body = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = httpx.post(f"{backend.url}/api/datasets", files={"file": (name, body)}, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()


def test_the_data_sets_page_previews_prompt_and_answers_apart_and_the_form_launches_a_job_on_one(backend,
                                                                                                 dashboard_env):
    dashboard_env(backend.url)
    with open(HH_PREFS_SAMPLE, encoding="utf-8") as f:
        pairs = [json.loads(line) for _, line in zip(range(N_ROWS), f)]
    prefs = _upload(backend, "prefs.jsonl", pairs)
    prompts = _upload(backend, "prompts.jsonl", [{"prompt": p["prompt"]} for p in pairs])
    assert prompts["kind"] == "prompt"

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/datasets.py").run()
    assert not at.exception, at.exception
    at.selectbox(key=f"ds_pick:{prompts['id']}").set_value(prefs["id"]).run()  # the newest is shown first
    assert not at.exception, at.exception
    assert at.selectbox(key=f"ds_pick:{prompts['id']}").value == prefs["id"]
    assert any(m.value.startswith("**preference** data") and prefs["reason"] in m.value for m in at.markdown)
    assert {m.label: m.value for m in at.metric}["Rows"] == str(N_ROWS)

    # Row 1: the prompt in one code block, then its chosen and rejected answers in two more (the tiny tokenizer has
    # no template: the HH text, each answer after a space and ending in EOS).
    code = [c.value for c in at.code]
    assert len(code) == 3 * 10, "10 rows shown, a prompt and two answers each"
    first = pairs[0]
    assert code[0].lstrip().startswith("Human:") and code[0].endswith("Assistant:")
    assert first["prompt"].split("\n")[0] in code[0] and first["chosen"].strip() not in code[0]
    assert code[1] == " " + first["chosen"].strip() + "<|endoftext|>"
    assert code[2] == " " + first["rejected"].strip() + "<|endoftext|>"
    assert sum(c.value.startswith("chosen · ") for c in at.caption) == 10
    assert len(at.get("plotly_chart")) == 2

    # The drops follow the budgets: a larger prompt budget drops fewer prompts.
    def dropped() -> int:
        return int({m.label: m.value for m in at.metric}["Dropped at these budgets"].split(" of ")[0].replace(",", ""))

    at.number_input(key="ds_max_prompt").set_value(16).run()
    tight = dropped()
    at.number_input(key="ds_max_prompt").set_value(4096).run()
    at.number_input(key="ds_max_answer").set_value(4096).run()
    assert tight > dropped() >= 0 and tight > N_ROWS // 2, (tight, dropped())

    # The New job form: each stage is offered what it can read (no prompt set for SFT); launch a data-only job.
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="nj_dataset:data").options == ["— the default —", f"#{prompts['id']} prompts.jsonl "
                                                           f"(prompt, {N_ROWS} rows)",
                                                           f"#{prefs['id']} prefs.jsonl (preference, {N_ROWS} rows)"]
    assert len(at.selectbox(key="nj_dataset:sft_data").options) == 2
    at.selectbox(key="nj_dataset:data").set_value(prefs["id"]).run()
    at.text_area(key="nj:tiny:extra").input(json.dumps({"stages": ["data"], "data": {"max_pairs": 20}})).run()
    [b for b in at.button if "Launch" in (b.label or "")][0].click().run()
    assert not at.exception, at.exception
    (job,) = httpx.get(f"{backend.url}/api/jobs", timeout=10).json()["items"]
    config = httpx.get(f"{backend.url}/api/jobs/{job['id']}", timeout=10).json()["config"]
    assert config["stages"] == ["data"] and config["data"]["source"] == prefs["source"]
    assert httpx.get(f"{backend.url}/api/datasets/{prefs['id']}", timeout=10).json()["used_by"] == [job["id"]]


def test_the_data_sets_page_makes_a_data_set_from_chat_feedback(backend, dashboard_env):
    """Issue 32: the page's "From chat feedback" tab makes the Chat page's better answers into preference pairs."""
    dashboard_env(backend.url)
    conversation = [{"role": "user", "content": "How do I boil an egg?"}]
    for fields in ({"rating": 1}, {"rating": -1, "better": "Simmer it for nine minutes."}):
        r = httpx.post(f"{backend.url}/api/feedback", timeout=30, json={
            "model": "job-1/ppo", "messages": conversation, "reply": "Put it in water.", **fields})
        assert r.status_code == 201, r.text
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/datasets.py").run()
    assert not at.exception, at.exception
    assert any("2 feedback row(s) from the Chat page, 1 with a better answer" in c.value for c in at.caption)
    at.selectbox(key="ds_fb_kind").set_value("preference")
    at.button(key="ds-feedback-submit").click().run()
    assert not at.exception, at.exception
    (made,) = httpx.get(f"{backend.url}/api/datasets", timeout=30).json()["items"]
    assert made["kind"] == "preference" and made["records"] == 1
    assert any(f"data set #{made['id']}" in s.value for s in at.success), [s.value for s in at.success]
