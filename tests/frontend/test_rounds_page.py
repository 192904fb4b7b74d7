"""The next round of RLHF on the dashboard (issue 32), with Streamlit's AppTest against a real backend process and
SQLite file; the jobs' rows are written with the worker's own queue functions (`JobWriter`).

A finished job's page offers *Continue (next round)*: its form queues round 2 from the job's aligned policy on the
data chosen (here the job's own data again) and opens the new job; the job pages then show the chain of rounds with
links, the Jobs list each job's round; the Compare page plots the gold across the chain's rounds. A running job cannot be continued.
"""

from __future__ import annotations

import json

import httpx

from tests.support.dashboard import APP, TIMEOUT, open_job_page, walk
from tests.support.runs import JobWriter, ev_report, make_run_dir

PROMPTS = ["\n\nHuman: Where do owls sleep?\n\nAssistant:", "\n\nHuman: Is tea good?\n\nAssistant:"]
STAGES = ("data", "sft", "reward", "ppo")


def run_to_the_end(backend, job_id: int, report: dict) -> None:
    """What a worker writes for a whole job, its evaluate stage ending with `report`."""
    writer = JobWriter(backend.db_url, job_id)
    writer.claim()
    for stage in STAGES:
        writer.begin(stage)
        writer.end(stage)
    writer.begin("evaluate")
    writer.end("evaluate", report)
    writer.finish()
    writer.close()


def markdown(at) -> list[str]:
    return [str(el.value) for el in walk(at._tree) if getattr(el, "type", None) == "markdown"]


def test_continue_from_the_job_page_then_the_chain_on_the_job_pages_and_the_gold_across_rounds(backend, dashboard_env):
    dashboard_env(backend.url)
    created = httpx.post(f"{backend.url}/api/jobs", timeout=30, json={"preset": "tiny", "name": "first"})
    assert created.status_code == 201, created.text
    parent = created.json()["id"]
    make_run_dir(backend.data_dir / "runs" / f"job-{parent}")  # its aligned policy on disk
    run_to_the_end(backend, parent, ev_report("ppo", 1.0, -0.2, 0.3, PROMPTS))

    at = open_job_page(parent)
    button = at.button(key="job_continue")
    assert not button.disabled, "a finished job with an aligned policy can be continued"
    button.click().run()
    assert not at.exception, at.exception
    assert any("Round 2: continue from this job's aligned policy" in m for m in markdown(at))
    assert at.radio(key=f"j{parent}-next-data").value == "votes", "the arena votes about the model, by default"
    at.checkbox(key=f"j{parent}-next-mix").check().run()
    assert at.slider(key=f"j{parent}-next-weight").value == 0.5
    at.radio(key=f"j{parent}-next-data").set_value("dataset").run()
    assert any("No data set yet" in str(el.value) for el in at.info)
    assert at.button(key=f"j{parent}-next-start").disabled, "no data set to read"
    at.radio(key=f"j{parent}-next-data").set_value("votes").run()
    at.button(key=f"j{parent}-next-start").click().run()
    assert any("no vote about" in str(el.value) for el in at.error), "no vote yet: the backend's reason is shown"
    at.radio(key=f"j{parent}-next-data").set_value("parent").run()
    at.button(key=f"j{parent}-next-start").click().run()
    assert not at.exception, at.exception
    jobs = httpx.get(f"{backend.url}/api/jobs", timeout=30).json()["items"]
    child = next(j for j in jobs if j["parent_id"] == parent)
    assert (child["round"], child["name"], child["status"]) == (2, "first · round 2", "queued")
    assert not any("Round 2: continue" in m for m in markdown(at)), "the form closes once round 2 is queued"
    at.switch_page("app_pages/jobs.py").run()
    listed = at.dataframe[0].value.set_index("id")["round"]
    assert (listed[parent], listed[child["id"]]) == ("1", f"2 ← #{parent}"), "the Jobs list gives each job's round"

    # Round 2 running: not continuable yet; its page shows the chain, round 1 a link.
    writer = JobWriter(backend.db_url, child["id"])
    writer.claim()
    writer.close()
    at = open_job_page(child["id"])
    assert at.button(key="job_continue").disabled
    chain = next(m for m in markdown(at) if m.startswith("Rounds of RLHF"))
    assert f"[#{parent} first](/job?job={parent})" in chain
    assert f"**#{child['id']} first · round 2** (this job)" in chain
    assert any(f"round **2** (continues job #{parent})" in m for m in markdown(at))

    with JobWriter(backend.db_url, child["id"]).Session() as s:  # the rest of round 2, as its worker would
        from db import queue

        for stage in STAGES:
            queue.begin_stage(s, child["id"], stage, attempt=1)
            queue.end_stage(s, child["id"], stage, None)
        queue.begin_stage(s, child["id"], "evaluate", attempt=1)
        queue.end_stage(s, child["id"], "evaluate", ev_report("ppo", 0.5, 0.3, 0.6, PROMPTS))
        assert queue.finish(s, child["id"], "test-worker")

    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/compare.py").run()
    at.multiselect(key="compare_jobs").set_value([child["id"]]).run()
    assert not at.exception, at.exception
    specs = {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
             for c in at.get("plotly_chart")}
    gold = specs["Rounds of RLHF: gold score by round"]
    start, end, gain = gold["data"]
    names = [f"round 1 · #{parent} first", f"round 2 · #{child['id']} first · round 2"]
    assert start["x"] == end["x"] == gain["x"] == names
    assert start["y"] == [-1.0, -1.0] and end["y"] == [-0.6, -0.6] and gain["y"] == [0.4, 0.4]  # ev_report's gold
    assert gold["layout"]["yaxis"]["title"]["text"] == "gold score (question)"
    at.radio(key="compare_round_measure").set_value("reward").run()
    reward = {json.loads(c.proto.spec)["layout"]["title"]["text"]: json.loads(c.proto.spec)
              for c in at.get("plotly_chart")}["Rounds of RLHF: reward by round"]
    assert reward["data"][0]["y"] == [-0.2, 0.3] and reward["data"][1]["y"] == [0.3, 0.6]
