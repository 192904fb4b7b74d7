"""The New-job form's rewards builder (issue 30), with Streamlit's AppTest against a real backend process:

- switched on for GRPO, it starts from a verifiable reward and a format rule; a component added, changed and launched
  reaches the job's config as `ppo.rewards`, empty fields left to the config's defaults;
- an invalid component is refused with the message under the builder, naming `ppo.rewards[i].<field>`;
- the Try-it box scores typed answers through `POST /api/rewards/score`: each component and the weighted total;
- each field's help is the config's docstring of `RewardComponent` (served by `/api/config/fields`);
- cloning a job with stated rewards puts them in the builder's cards, not in the extra overrides box, and the
  copy launches with the same components.
"""

from __future__ import annotations

import httpx
from streamlit.testing.v1 import AppTest

from tests.support.dashboard import APP, TIMEOUT, walk

KEY = "nj:tiny:rewards"


def grpo_form(backend, dashboard_env) -> AppTest:
    dashboard_env(backend.url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    at.switch_page("app_pages/new_job.py").run()
    at.selectbox(key="nj:tiny:algorithm").set_value("grpo").run()
    at.toggle(key=f"{KEY}:on").set_value(True).run()
    assert not at.exception, at.exception
    return at


def button(at: AppTest, label: str):
    return next(b for b in at.button if (b.label or "").startswith(label))


def test_the_builder_sends_its_components_as_the_jobs_stated_rewards(backend, dashboard_env):
    at = grpo_form(backend, dashboard_env)
    assert at.selectbox(key=f"{KEY}:0:kind").value == "reference_answer"
    assert at.text_input(key=f"{KEY}:1:regex:pattern").value == "^The answer is"
    fields = {f["path"]: f for f in httpx.get(f"{backend.url}/api/config/fields", timeout=30).json()}
    assert "regular expression" in fields["ppo.rewards.pattern"]["help"]
    assert at.text_input(key=f"{KEY}:1:regex:pattern").help == fields["ppo.rewards.pattern"]["help"]
    button(at, "Add a component").click().run()
    at.selectbox(key=f"{KEY}:2:kind").set_value("length").run()
    at.number_input(key=f"{KEY}:2:length:target").set_value(12).run()
    at.number_input(key=f"{KEY}:2:weight").set_value(-0.5).run()
    at.text_input(key=f"{KEY}:1:regex:pattern").input("[unclosed").run()
    button(at, "Launch").click().run()
    assert not at.exception, at.exception
    assert httpx.get(f"{backend.url}/api/jobs", timeout=30).json()["items"] == []
    elements = list(walk(at.main))
    builder = next(i for i, e in enumerate(elements) if getattr(e, "key", None) == f"{KEY}:add")
    under = next(e for e in elements[builder + 1:] if e.type in ("alert", "error", "text_area", "selectbox"))
    assert under.type in ("alert", "error") and "not a regular expression" in under.value, under

    at.text_input(key=f"{KEY}:1:regex:pattern").input("^Answer:").run()
    button(at, "Launch").click().run()
    assert not at.exception, at.exception
    (job,) = httpx.get(f"{backend.url}/api/jobs", timeout=30).json()["items"]
    rewards = httpx.get(f"{backend.url}/api/jobs/{job['id']}", timeout=30).json()["config"]["ppo"]["rewards"]
    assert [(c["kind"], c["weight"], c["name"]) for c in rewards] == [
        ("reference_answer", 1.0, "correct"), ("regex", 0.2, "format"), ("length", -0.5, None)]
    assert rewards[0]["extract"] == "last_number" and rewards[1]["pattern"] == "^Answer:"
    assert rewards[2]["target"] == 12 and rewards[2]["tolerance"] == 10.0  # left empty: the config's default


def test_try_it_scores_typed_answers_with_the_builders_components(backend, dashboard_env):
    at = grpo_form(backend, dashboard_env)
    at.text_area(key="nj:tiny:try:prompt").input("What is 12 + 30?")
    at.text_input(key="nj:tiny:try:ref:answer").input("42")
    at.text_area(key="nj:tiny:try:answers").input("The answer is 42.\nIt is 41.").run()
    button(at, "Score").click().run()
    assert not at.exception, at.exception
    (table,) = [d.value for d in at.dataframe if "answer" in d.value.columns]
    assert list(table["answer"]) == ["The answer is 42.", "It is 41."]
    assert list(table["correct (× 1)"]) == [1.0, 0.0] and list(table["format (× 0.2)"]) == [1.0, 0.0]
    assert list(table["total"]) == [1.2, 0.0]


def test_a_cloned_jobs_stated_rewards_fill_the_builder(backend, dashboard_env):
    rewards = [{"kind": "reference_answer", "column": "answer", "extract": "after:Answer:", "name": "correct"},
               {"kind": "regex", "pattern": "^Answer:", "weight": 0.2, "name": "format"}]
    created = httpx.post(f"{backend.url}/api/jobs", timeout=30, json={
        "preset": "tiny", "name": "stated", "overrides": {"algorithm": "grpo", "ppo": {"rewards": rewards}}})
    assert created.status_code == 201, created.text
    original = created.json()
    dashboard_env(backend.url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["clone"] = str(original["id"])
    at.run()
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    assert at.toggle(key=f"{KEY}:on").value is True
    assert at.selectbox(key=f"{KEY}:0:kind").value == "reference_answer"
    assert at.text_input(key=f"{KEY}:0:reference_answer:extract").value == "after:Answer:"
    assert at.text_input(key=f"{KEY}:1:regex:pattern").value == "^Answer:"
    assert "rewards" not in (at.text_area(key="nj:tiny:extra").value or "")
    button(at, "Launch").click().run()
    assert not at.exception, at.exception
    copy = next(j for j in httpx.get(f"{backend.url}/api/jobs", timeout=30).json()["items"] if j["id"] != original["id"])
    assert httpx.get(f"{backend.url}/api/jobs/{copy['id']}", timeout=30).json()["config"] == original["config"]
