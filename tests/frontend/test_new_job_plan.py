"""The New-job page's memory plan (Streamlit's AppTest against a real backend process and SQLite file): it
follows the fields as they change, names the cheapest change for a stage that does not fit the registered
worker's GPU, and a job the backend refuses for memory is launched only with the override box ticked."""

from __future__ import annotations

import httpx
from streamlit.testing.v1 import AppTest

from tests.support.dashboard import APP, TIMEOUT, walk

QWEN = "qwen2.5-0.5b-8gb"


def register_worker(backend, gpu_memory_mb: int) -> None:
    """A live worker with a GPU, as the worker's heartbeat writes it."""
    from db import make_engine, make_sessionmaker, queue

    engine = make_engine(backend.db_url)
    with make_sessionmaker(engine)() as s:
        queue.worker_heartbeat(s, "gpu-box:7", hostname="gpu-box", pid=7, state="idle", gpu_index=0,
                               gpu_name="RTX 4060", gpu_memory_mb=gpu_memory_mb)
    engine.dispose()


def plan_table(at: AppTest) -> dict[str, dict]:
    frame = next(d.value for d in at.dataframe if "peak GiB" in d.value.columns)
    return {row["stage"]: row for row in frame.to_dict("records")}


def launch(at: AppTest) -> None:
    [b for b in at.button if "Launch" in (b.label or "")][0].click().run()
    assert not at.exception, at.exception


def test_the_plan_follows_the_form_and_a_job_that_does_not_fit_needs_the_override(backend, dashboard_env):
    register_worker(backend, 8192)
    dashboard_env(backend.url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    assert any(h.value == "Memory plan" for h in at.subheader)
    assert any("a CPU job: never refused for memory" in c.value for c in at.caption), "tiny runs on the CPU"

    at.selectbox(key="nj_preset").set_value(QWEN).run()
    assert not at.exception, at.exception
    table = plan_table(at)
    assert set(table) == {"sft", "reward/bf16", "reward/int8", "reward/int4", "ppo", "evaluate"}
    assert all(row["fits"] == "yes" for row in table.values()), table
    assert any("checked against 8.00 GiB" in c.value and "gpu-box:7" in c.value for c in at.caption)
    before = table["ppo"]["peak GiB"]

    # A bigger minibatch: the plan changes at once, before any submit, and says what to do instead.
    at.number_input(key=f"nj:{QWEN}:ppo.mini_batch_size").set_value(8).run()
    table = plan_table(at)
    assert table["ppo"]["fits"] == "no" and table["ppo"]["peak GiB"] > before
    warning = next(w.value for w in at.warning if "`ppo` does not fit" in w.value)
    assert "Cheapest change that fits: **ppo.mini_batch_size 8 -> 4 with ppo.grad_accum 1 -> 2" in warning

    launch(at)  # refused: the message sits under the override box, nothing is queued
    assert httpx.get(backend.url + "/api/jobs").json()["items"] == []
    elements = list(walk(at.main))
    box = next(i for i, e in enumerate(elements) if getattr(e, "key", None) == "nj_override_memory_plan")
    under = next(e for e in elements[box + 1:] if e.type in ("alert", "error", "button"))
    assert under.type in ("alert", "error") and "does not fit a 8.00 GiB GPU: ppo needs" in under.value, under
    assert "Set override_memory_plan to queue it anyway" in under.value

    at.checkbox(key="nj_override_memory_plan").check().run()
    launch(at)
    (item,) = httpx.get(backend.url + "/api/jobs").json()["items"]
    job = httpx.get(f"{backend.url}/api/jobs/{item['id']}").json()  # with its config (a list item has none)
    assert job["preset"] == QWEN and job["config"]["ppo"]["mini_batch_size"] == 8
    assert any(f"Job #{job['id']}" in h.value for h in at.subheader), "the job's page opened"
