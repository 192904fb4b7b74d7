"""The New-job form as a new user meets it (issue 33), with Streamlit's AppTest against a real backend process and
SQLite file:

- a field the form has no widget for (an unknown one, typed into "Extra overrides") is reported under that box, not
  at the top of the form, and a short summary stands beside the Launch button;
- a memory refusal offers "Apply the suggested change", which puts the planner's change into the form's fields (and
  what has no field into the extra overrides), after which the job launches without the override;
- a field the config derives when left empty says what it becomes (GRPO's group size: "auto (4)", not "none");
- `?clone=<job id>` fills the form from that job (once per arrival: the parameter is then dropped), and launching it
  unchanged queues the same configuration;
- the defences against reward hacking (validation model, ensemble, best policy, early stop, length control) have
  fields: a best policy by a validation model the run lacks is refused under its field, and set together they launch.
"""

from __future__ import annotations

import json

import httpx
from streamlit.testing.v1 import AppTest

from tests.support.dashboard import APP, TIMEOUT, walk
from tests.support.heartbeats import register_worker

QWEN = "qwen2.5-0.5b-8gb"

FORM_ELEMENTS = ("alert", "error", "number_input", "text_input", "text_area", "selectbox", "multiselect", "checkbox",
                 "button")


def new_job_page(backend, dashboard_env, clone: int | None = None) -> AppTest:
    dashboard_env(backend.url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    if clone is not None:
        at.query_params["clone"] = str(clone)
    at.run()
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    return at


def launch(at: AppTest) -> None:
    [b for b in at.button if "Launch" in (b.label or "")][0].click().run()
    assert not at.exception, at.exception


def after(at: AppTest, key: str, types: tuple[str, ...] = FORM_ELEMENTS):
    """The first element of `types` drawn after the widget `key`."""
    elements = list(walk(at.main))
    pos = next(i for i, e in enumerate(elements) if getattr(e, "key", None) == key)
    return next(e for e in elements[pos + 1:] if e.type in types)


def beside_launch(at: AppTest):
    """The element drawn right after the Launch button (its column neighbour)."""
    elements = list(walk(at.main))
    pos = next(i for i, e in enumerate(elements) if e.type == "button" and "Launch" in (e.label or ""))
    return next(e for e in elements[pos + 1:] if e.type in ("alert", "error", "button", "text_area"))


def jobs(backend) -> list[dict]:
    return httpx.get(f"{backend.url}/api/jobs", timeout=30).json()["items"]


def test_errors_sit_under_their_field_or_the_extra_box_and_beside_launch(backend, dashboard_env):
    at = new_job_page(backend, dashboard_env)
    at.text_area(key="nj:tiny:extra").input(json.dumps({"ppo": {"no_such_knob": 1}}))
    launch(at)
    assert jobs(backend) == []
    under = after(at, "nj:tiny:extra")
    assert under.type in ("alert", "error") and "`ppo.no_such_knob`" in under.value and "unknown" in under.value, under
    first = next(e for e in walk(at.main) if e.type in FORM_ELEMENTS)
    assert first.type not in ("alert", "error"), f"an error above the form: {first.value}"
    summary = beside_launch(at)
    assert summary.type in ("alert", "error") and "Not launched" in summary.value, summary
    assert "`ppo.no_such_knob` (under Extra overrides)" in summary.value

    # A field with a widget: the message under it, the summary names it by its label.
    at.text_area(key="nj:tiny:extra").input("")
    at.number_input(key="nj:tiny:ppo.steps").set_value(-3)
    launch(at)
    assert after(at, "nj:tiny:ppo.steps").type in ("alert", "error")
    summary = beside_launch(at)
    assert "`ppo.steps` (under PPO steps)" in summary.value and "no_such_knob" not in summary.value, summary.value


def test_a_memory_refusal_offers_the_suggested_change_and_applying_it_launches(backend, dashboard_env):
    register_worker(backend.db_url, gpu_index=0, gpu_name="RTX 4060", gpu_memory_mb=8192)
    at = new_job_page(backend, dashboard_env)
    at.selectbox(key="nj_preset").set_value(QWEN).run()
    at.number_input(key=f"nj:{QWEN}:ppo.mini_batch_size").set_value(8).run()
    launch(at)  # refused: the plan names ppo.mini_batch_size 8 -> 4 with ppo.grad_accum 1 -> 2
    assert jobs(backend) == []
    assert "memory plan says it does not fit" in beside_launch(at).value
    apply = [b for b in at.button if b.key == "nj_apply_refusal:0"]
    assert apply and apply[0].label == "Apply the suggested change", [b.key for b in at.button]
    assert after(at, "nj_override_memory_plan", ("alert", "error", "button")).type in ("alert", "error")

    apply[0].click().run()
    assert not at.exception, at.exception
    assert at.number_input(key=f"nj:{QWEN}:ppo.mini_batch_size").value == 4
    assert json.loads(at.text_area(key=f"nj:{QWEN}:extra").value) == {"ppo": {"grad_accum": 2}}  # no widget of its own
    assert any("Applied the suggested change" in i.value for i in at.info)
    assert not [b for b in at.button if (b.key or "").startswith("nj_apply_")], "it fits now: nothing to apply"
    assert not at.checkbox(key="nj_override_memory_plan").value
    launch(at)
    (item,) = jobs(backend)
    config = httpx.get(f"{backend.url}/api/jobs/{item['id']}", timeout=30).json()["config"]
    assert (config["ppo"]["mini_batch_size"], config["ppo"]["grad_accum"]) == (4, 2)


def test_auto_fields_say_what_empty_becomes_and_a_clone_launches_the_same_config(backend, dashboard_env):
    at = new_job_page(backend, dashboard_env)
    at.selectbox(key="nj:tiny:algorithm").set_value("grpo").run()
    group = at.number_input(key="nj:tiny:grpo:ppo.samples_per_prompt")
    assert group.value is None and group.proto.placeholder == "auto (4)", group.proto.placeholder
    at.selectbox(key="nj:tiny:algorithm").set_value("ppo").run()
    at.selectbox(key="nj_preset").set_value(QWEN).run()
    assert at.text_input(key=f"nj:{QWEN}:model.tokenizer").proto.placeholder == \
        "auto (the model's: Qwen/Qwen2.5-0.5B-Instruct)"

    # A GRPO job changed from the tiny preset in a form field, a field without one, and its name.
    created = httpx.post(f"{backend.url}/api/jobs", timeout=30, json={
        "preset": "tiny", "name": "grpo-original", "min_gpu_memory_mb": 4096,
        "overrides": {"algorithm": "grpo", "ppo": {"steps": 3, "grad_accum": 2}, "sft": {"max_steps": 5}}})
    assert created.status_code == 201, created.text
    original = created.json()

    at = new_job_page(backend, dashboard_env, clone=original["id"])
    assert any(f"Cloned job #{original['id']}" in i.value for i in at.info), [i.value for i in at.info]
    assert at.selectbox(key="nj_preset").value == "tiny"
    assert at.text_input(key="nj_name").value == "grpo-original (copy)"
    assert at.number_input(key="nj_min_gpu_memory_mb").value == 4096
    assert at.selectbox(key="nj:tiny:algorithm").value == "grpo"
    assert at.number_input(key="nj:tiny:ppo.steps").value == 3
    assert at.number_input(key="nj:tiny:sft.max_steps").value == 5
    assert json.loads(at.text_area(key="nj:tiny:extra").value)["ppo"]["grad_accum"] == 2
    launch(at)
    copies = [j for j in jobs(backend) if j["id"] != original["id"]]
    assert [j["name"] for j in copies] == ["grpo-original (copy)"]
    copy = httpx.get(f"{backend.url}/api/jobs/{copies[0]['id']}", timeout=30).json()
    assert copy["config"] == original["config"] and copy["preset"] == "tiny"
    assert copy["min_gpu_memory_mb"] == 4096

    # The same session clones the job again (after the job page opened): the form is filled again.
    at.query_params["clone"] = str(original["id"])
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    assert at.text_input(key="nj_name").value == "grpo-original (copy)" and "clone" not in at.query_params
    assert at.number_input(key="nj:tiny:ppo.steps").value == 3


def test_the_reward_hacking_defences_have_fields_and_launch_as_set(backend, dashboard_env):
    at = new_job_page(backend, dashboard_env)
    at.selectbox(key="nj:tiny:ppo.keep_best").set_value("validation").run()
    launch(at)  # the best policy by a validation model the run does not train: refused, said under the field
    assert jobs(backend) == []
    under = after(at, "nj:tiny:ppo.keep_best")
    assert under.type in ("alert", "error") and "reward.validation" in under.value, under

    at.checkbox(key="nj:tiny:reward.validation").check()
    at.number_input(key="nj:tiny:reward.ensemble").set_value(3)
    at.selectbox(key="nj:tiny:ppo.ensemble_score").set_value("min")
    at.number_input(key="nj:tiny:ppo.early_stop_patience").set_value(2)
    at.checkbox(key="nj:tiny:ppo.length_control").check()
    launch(at)
    (item,) = jobs(backend)
    config = httpx.get(f"{backend.url}/api/jobs/{item['id']}", timeout=30).json()["config"]
    assert (config["reward"]["validation"], config["reward"]["ensemble"]) == (True, 3)
    assert {k: config["ppo"][k] for k in ("keep_best", "ensemble_score", "early_stop_patience", "length_control")} == \
        {"keep_best": "validation", "ensemble_score": "min", "early_stop_patience": 2, "length_control": True}
