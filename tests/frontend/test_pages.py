"""Page logic of the dashboard with Streamlit's AppTest, against a real backend process and SQLite file.

- The job page re-attaches to a running job after a reload with its whole history, and its refreshes
  download only the rows written since (cursor), not the history again.
- The new-job form shows the backend's validation message next to the field, and submitting a valid
  form creates the job and opens its page; it sends a minimum GPU memory, and the job page says when no
  live worker has it.
- The System page lists every worker with its host, GPU, state, job and heartbeat.
- When the backend is down, a banner says so, and a job page keeps the history it already has.
"""

from __future__ import annotations

import json

import httpx
from streamlit.testing.v1 import AppTest

from tests.support.dashboard import APP, TIMEOUT, open_job_page, plotly_trace, walk
from tests.support.procs import free_port
from tests.support.runs import JobWriter, sft_report

PPO_KEYS = ["ppo/reward_mean", "ppo/reward_std", "ppo/kl", "ppo/kl_coef", "ppo/policy_loss", "ppo/value_loss",
            "ppo/response_length", "ppo/entropy"]


def ppo_rows(start: int, n: int) -> dict[str, list[float]]:
    return {key: [0.1 * (start + i) + j for i in range(n)] for j, key in enumerate(PPO_KEYS)}


def make_running_job(backend) -> tuple[int, JobWriter]:
    client = httpx.Client(base_url=backend.url, timeout=30)
    job = client.post("/api/jobs", json={"preset": "tiny", "name": "watched"})
    assert job.status_code in (200, 201), job.text
    job_id = job.json()["id"]
    writer = JobWriter(backend.db_url, job_id)
    writer.claim()
    writer.begin("sft")
    writer.metrics("sft", {"sft/loss": [3.0 - 0.1 * i for i in range(10)], "mem/rss_mb": [500.0 + i for i in range(10)]})
    writer.end("sft", sft_report(final_loss=2.1), overall=0.4)
    writer.begin("ppo")
    writer.metrics("ppo", ppo_rows(0, 5))
    writer.samples("ppo", [{"step": 0, "seq": 0, "prompt": "\n\nHuman: hi\n\nAssistant:", "response": "hello there",
                            "reward": 0.5}])
    writer.log("ppo step 4 done", stage="ppo")
    # A second job, created later, so the page must take the job from the URL, not the newest one.
    other = client.post("/api/jobs", json={"preset": "tiny", "name": "other"})
    assert other.status_code in (200, 201), other.text
    return job_id, writer


def test_job_page_reattaches_after_reload_with_history_and_reads_only_new_rows(backend, dashboard_env):
    dashboard_env(backend.url)
    job_id, writer = make_running_job(backend)

    at = open_job_page(job_id)
    feed = at.session_state[f"feed:{job_id}"]
    assert feed.job["status"] == "running"
    assert [s for s, _ in feed.series("ppo/reward_mean")] == [0, 1, 2, 3, 4]
    assert len(feed.series("sft/loss")) == 10
    assert len(plotly_trace(at, "Reward", "reward mean")["x"]) == 5
    assert any("hello there" in t.value for t in at.text), "the sample generation is shown"
    assert not any("Backend unreachable" in e.value for e in at.error)
    downloaded = feed.rows_downloaded

    # The worker writes three more PPO steps; the next refresh downloads exactly those rows.
    new_rows = writer.metrics("ppo", ppo_rows(5, 3), start=5)
    at.run()
    feed = at.session_state[f"feed:{job_id}"]
    assert [s for s, _ in feed.series("ppo/reward_mean")] == list(range(8))
    assert feed.rows_downloaded - downloaded == new_rows
    assert len(plotly_trace(at, "Reward", "reward mean")["x"]) == 8

    # Reload: a new session, nothing in it, re-attaches through the URL and gets the whole history.
    reloaded = open_job_page(job_id)
    feed2 = reloaded.session_state[f"feed:{job_id}"]
    assert feed2.job["status"] == "running" and feed2.job_id == job_id
    assert {k: r["value"] for k, r in feed2.metrics.items()} == {k: r["value"] for k, r in feed.metrics.items()}
    assert len(feed2.metrics) == 10 * 2 + 8 * len(PPO_KEYS)
    assert len(plotly_trace(reloaded, "Reward", "reward mean")["x"]) == 8
    assert any("hello there" in t.value for t in reloaded.text)
    assert any("ppo step 4 done" in c.value for c in reloaded.code), "the log tail is shown"

    # The job finishes: the page shows it.
    writer.finish()
    reloaded.run()
    assert reloaded.session_state[f"feed:{job_id}"].job["status"] == "succeeded"
    writer.close()


def test_new_job_form_shows_backend_validation_next_to_the_field_then_opens_the_job(backend, dashboard_env):
    dashboard_env(backend.url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception

    steps = at.number_input(key="nj:tiny:ppo.steps")
    steps.set_value(-3)
    at.number_input(key="nj:tiny:ppo.batch_size").set_value(6)  # batch 6 with minibatch 4: invalid too
    at.text_input(key="nj_name").input("from-the-form")
    submit = [b for b in at.button if "Launch" in (b.label or "")][0]
    submit.click().run()
    assert not at.exception, at.exception

    # The message sits right under the widget it is about.
    elements = list(walk(at.main))
    pos = next(i for i, e in enumerate(elements) if getattr(e, "key", None) == "nj:tiny:ppo.steps")
    after = next(e for e in elements[pos + 1:] if e.type in ("alert", "error", "number_input", "text_input",
                                                                "selectbox", "multiselect", "checkbox"))
    assert after.type in ("alert", "error") and "must be" in after.value, after
    assert _jobs(backend) == [], "a rejected job changes nothing"
    assert at.number_input(key="nj:tiny:ppo.steps").value == -3, "the form keeps what was typed"

    # Fix the fields and launch: the job exists with the overrides, and its page opens.
    at.number_input(key="nj:tiny:ppo.steps").set_value(2)
    at.number_input(key="nj:tiny:ppo.batch_size").set_value(8)
    [b for b in at.button if "Launch" in (b.label or "")][0].click().run()
    assert not at.exception, at.exception
    jobs = _jobs(backend)
    assert len(jobs) == 1
    job = httpx.get(f"{backend.url}/api/jobs/{jobs[0]['id']}").json()
    assert job["name"] == "from-the-form"
    assert job["config"]["ppo"]["steps"] == 2 and job["config"]["ppo"]["batch_size"] == 8
    tiny = next(p["config"] for p in httpx.get(backend.url + "/api/presets").json() if p["name"] == "tiny")
    assert job["config"]["sft"] == tiny["sft"], "untouched fields keep the preset's values"
    assert job["config"]["reward"]["precisions"] == tiny["reward"]["precisions"]
    assert at.query_params.get("job") in (str(job["id"]), [str(job["id"])])
    assert any(f"Job #{job['id']}" in h.value for h in at.subheader)


def test_new_job_form_help_is_the_config_fields_docstring(backend, dashboard_env):
    """Each field's ⓘ quotes `GET /api/config/fields` (the field's docstring in edgerlhf/config.py) and its
    accepted range; the dashboard's source keeps no second copy of the text."""
    dashboard_env(backend.url)
    fields = {f["path"]: f for f in httpx.get(backend.url + "/api/config/fields").json()}
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception

    steps = at.number_input(key="nj:tiny:ppo.steps")
    assert fields["ppo.steps"]["help"].startswith("Iterations")  # the docstring of PPOConfig.steps
    assert steps.help.startswith(fields["ppo.steps"]["help"] + "\n\n"), steps.help
    assert "`ppo.steps`" in steps.help and "accepts [1, 1,000,000]" in steps.help
    assert "preset default: `30`" in steps.help
    assert "accepts (0, 1]" in at.number_input(key="nj:tiny:ppo.learning_rate").help
    widgets = [*at.number_input, *at.text_input, *at.checkbox, *at.selectbox, *at.multiselect]
    shown = {w.key.split(":")[-1]: w.help for w in widgets if (w.key or "").startswith("nj:tiny:")}
    assert {"stages", "model.tokenizer", "model.random_init", "reward.precisions", "ppo.reward_precision"} <= set(shown)
    source = "\n".join(p.read_text() for p in (APP.parent).rglob("*.py"))
    for path, help_ in shown.items():
        assert help_.startswith(fields[path]["help"]) and fields[path]["help"], path
        assert fields[path]["help"] not in source, f"a copy of the help of {path} in frontend/"


def _jobs(backend) -> list[dict]:
    return httpx.get(backend.url + "/api/jobs").json()["items"]


def test_banner_when_backend_is_down(dashboard_env):
    dashboard_env(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    banners = [e.value for e in at.error if "Backend unreachable" in e.value]
    assert len(banners) == 1, [e.value for e in at.error]
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    assert sum("Backend unreachable" in e.value for e in at.error) == 1


def test_job_page_keeps_its_history_when_the_backend_goes_away(backend, dashboard_env):
    dashboard_env(backend.url)
    job_id, writer = make_running_job(backend)
    at = open_job_page(job_id)
    assert len(at.session_state[f"feed:{job_id}"].series("ppo/reward_mean")) == 5
    writer.close()

    backend.stop()
    at.run()
    assert not at.exception, at.exception
    assert any("Backend unreachable" in e.value for e in at.error)
    assert len(at.session_state[f"feed:{job_id}"].series("ppo/reward_mean")) == 5
    assert len(plotly_trace(at, "Reward", "reward mean")["x"]) == 5, "the curves stay on screen"


def test_probe_page_puts_each_checkpoints_answer_side_by_side_in_training_order(backend, dashboard_env):
    dashboard_env(backend.url)
    job_id, writer = make_running_job(backend)
    prompts = ["\n\nHuman: How do I bake bread?\n\nAssistant:", "\n\nHuman: Capital of France?\n\nAssistant:"]
    # Logged out of order on purpose: the page sorts SFT first, then PPO steps numerically.
    for ckpt, stage, step in [("ppo/step-10", "ppo", 10), ("sft/step-30", "sft", 30), ("ppo/step-5", "ppo", 5)]:
        writer.samples(stage, [{"kind": "probe", "checkpoint": ckpt, "step": step, "seq": i, "prompt": p,
                                "response": f"{ckpt} answers #{i}", "reward": step / 10 + i} for i, p in enumerate(prompts)])
    writer.close()

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.query_params["job"] = str(job_id)
    at.run()
    at.switch_page("app_pages/probes.py").run()
    assert not at.exception, at.exception
    texts = [t.value for t in at.text]
    for i in range(2):
        answers = [t for t in texts if t.endswith(f"answers #{i}")]
        assert answers == [f"sft/step-30 answers #{i}", f"ppo/step-5 answers #{i}", f"ppo/step-10 answers #{i}"]
    assert "hello there" not in texts, "ordinary samples are not probes"
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    assert spec["layout"]["xaxis"]["categoryarray"] == ["sft/step-30", "ppo/step-5", "ppo/step-10"]


def test_jobs_page_lists_jobs_and_cancels_one(backend, dashboard_env):
    dashboard_env(backend.url)
    client = httpx.Client(base_url=backend.url, timeout=30)
    ids = [client.post("/api/jobs", json={"preset": "tiny", "name": f"job-{i}", "overrides": {"algorithm": a}}
                       ).json()["id"] for i, a in enumerate(["ppo", "grpo"])]
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert sorted(table["id"].tolist()) == sorted(ids)
    assert sorted(table["queue"].tolist()) == [1, 2]
    assert dict(zip(table["id"], table["algorithm"])) == {ids[0]: "PPO", ids[1]: "GRPO"}
    at.selectbox(key="jobs_action_job").select(ids[1]).run()
    at.button(key="jobs_cancel").click().run()
    assert not at.exception, at.exception
    assert client.get(f"/api/jobs/{ids[1]}").json()["status"] == "queued"  # Cancel asks first
    at.button(key="jobs_confirm_cancel_yes").click().run()
    assert not at.exception, at.exception
    assert client.get(f"/api/jobs/{ids[1]}").json()["status"] == "cancelled"
    assert client.get(f"/api/jobs/{ids[0]}").json()["status"] == "queued"


def test_system_page_shows_the_system_fields(backend, dashboard_env):
    dashboard_env(backend.url)
    httpx.post(backend.url + "/api/jobs", json={"preset": "tiny", "name": "waiting"}).raise_for_status()
    info = httpx.get(backend.url + "/api/system").json()
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/system.py").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Queued jobs"] == str(info["queue_length"]) == "1"
    assert metrics["CPU cores"] == str(info["cpu"]["count"])
    assert metrics["Workers"] == "not running"
    assert any("1 queued" in c.value for c in at.caption), [c.value for c in at.caption]
    if info["gpus"]:  # a GPU machine: a bar per GPU, total memory from `memory_total_mb`
        gpu = info["gpus"][0]
        assert any(f"/ {gpu['memory_total_mb']:,.0f} MB" in p.proto.text for p in at.get("progress"))
    else:
        assert any("No GPU visible" in i.value for i in at.info)


def test_new_job_form_sends_a_minimum_gpu_memory_and_the_job_page_says_no_worker_has_it(backend, dashboard_env):
    dashboard_env(backend.url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/new_job.py").run()
    assert not at.exception, at.exception
    launch = lambda: [b for b in at.button if "Launch" in (b.label or "")][0].click().run()  # noqa: E731

    at.number_input(key="nj_min_gpu_memory_mb").set_value(0)
    launch()
    assert not at.exception, at.exception
    elements = list(walk(at.main))
    pos = next(i for i, e in enumerate(elements) if getattr(e, "key", None) == "nj_min_gpu_memory_mb")
    after = next(e for e in elements[pos + 1:] if e.type in ("alert", "error", "number_input", "text_input"))
    assert after.type in ("alert", "error") and "greater than or equal to 1" in after.value, after
    assert _jobs(backend) == []

    at.number_input(key="nj_min_gpu_memory_mb").set_value(40_000)
    launch()
    assert not at.exception, at.exception
    (job,) = _jobs(backend)
    assert job["min_gpu_memory_mb"] == 40_000
    assert job["waiting_for"] == "waiting for a worker with ≥ 40,000 MB of GPU memory (no worker is alive)"
    # The job's page opened, and says why the job waits.
    assert any(f"Job #{job['id']}" in h.value for h in at.subheader)
    assert any("Waiting for a worker with ≥ 40,000 MB" in w.value for w in at.warning), [w.value for w in at.warning]


def test_system_page_lists_every_worker_with_its_gpu(backend, dashboard_env):
    from datetime import timedelta

    from sqlalchemy import update

    from db import make_engine, make_sessionmaker, queue
    from db.models import Worker, utcnow

    dashboard_env(backend.url)
    job_id = httpx.post(backend.url + "/api/jobs", json={"preset": "tiny", "name": "running"}).json()["id"]
    engine = make_engine(backend.db_url)
    with make_sessionmaker(engine)() as s:  # what two workers on two hosts wrote, one of them long gone
        queue.worker_heartbeat(s, "gpu-box:11", hostname="gpu-box", pid=11, state="busy", job_id=job_id,
                               gpu_index=1, gpu_name="RTX 4090", gpu_memory_mb=24_564)
        queue.worker_heartbeat(s, "old-box:22", hostname="old-box", pid=22, state="idle", gpu_index=0,
                               gpu_name="GTX 1080", gpu_memory_mb=8_192)
        s.execute(update(Worker).where(Worker.id == "old-box:22").values(heartbeat_at=utcnow() - timedelta(hours=1)))
        s.commit()
    engine.dispose()

    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/system.py").run()
    assert not at.exception, at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Workers"] == "1 alive" and metrics["Running jobs"] == f"#{job_id}"
    table = at.dataframe[0].value
    rows = {r["worker"]: r for r in table.to_dict("records")}
    assert set(rows) == {"gpu-box:11", "old-box:22"}
    busy, gone = rows["gpu-box:11"], rows["old-box:22"]
    assert (busy["alive"], busy["host"], busy["GPU"], busy["GPU memory (MB)"], busy["state"], busy["job"]) == \
        ("yes", "gpu-box", "1: RTX 4090", 24_564, "busy", f"#{job_id}")
    assert (gone["alive"], gone["host"], gone["GPU"], gone["GPU memory (MB)"], gone["state"], gone["job"]) == \
        ("no", "old-box", "0: GTX 1080", 8_192, "idle", "—")
    assert busy["last heartbeat"] != "—" and gone["last heartbeat"] < busy["last heartbeat"]


def test_job_page_measures_memory_against_the_gpu_of_the_worker_running_the_job(backend, dashboard_env):
    from db import queue

    dashboard_env(backend.url)
    job = httpx.post(backend.url + "/api/jobs", json={"preset": "tiny", "overrides": {"device": "cuda"}})
    job_id = job.json()["id"]
    writer = JobWriter(backend.db_url, job_id)
    writer.claim()
    with writer.Session() as s:  # its worker owns a 24 GB GPU, on a machine other than the backend's
        queue.worker_heartbeat(s, writer.worker_id, hostname="gpu-box", pid=11, state="busy", job_id=job_id,
                               gpu_index=1, gpu_name="RTX 4090", gpu_memory_mb=24_564)
    writer.close()
    at = open_job_page(job_id)
    assert any(c.value == "GPU: RTX 4090, 24,564 MB total." for c in at.caption), [c.value for c in at.caption]
