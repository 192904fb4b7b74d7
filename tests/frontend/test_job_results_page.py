"""The job page and the Jobs list as a new user reads them (issue 33), with Streamlit's AppTest against a real
backend process and SQLite file; the jobs' rows are written with the worker's own queue functions (`JobWriter`).

- A running job: the stage still loading shows as its own phase with its time so far (no empty chart), then each
  stage says `step k of N` and its time left, the job its time left; the alignment stage of a GRPO job reads GRPO;
  the Jobs list shows the same steps and time left. The Smoothing slider smooths every curve. Cancel asks first, on
  both pages.
- A finished job: its Overview opens with the verdict (reading, interval, units, KL, length), the Samples tab puts
  SFT and aligned answers side by side first, a sample's broken characters are cleaned, prompts flagged as offensive
  are hidden until asked for, the Config tab shows what differs from the preset and clones the job, and the Jobs
  list shows the result columns, with "—" where a value is missing.
"""

from __future__ import annotations

import codecs
import json
import re
from datetime import timedelta

import httpx
from streamlit.dataframe_util import convert_arrow_bytes_to_pandas_df
from streamlit.testing.v1 import AppTest

from db import queue
from db.models import utcnow
from tests.support.dashboard import APP, TIMEOUT, open_job_page, plotly_trace, walk
from tests.support.runs import JobWriter, ev_report

SLUR = codecs.decode("avttre", "rot13")  # a flagged word (`frontend.flagged`), kept out of the source
PROMPTS = ["\n\nHuman: Where do owls sleep?\n\nAssistant:", f"\n\nHuman: Why are {SLUR}s like that?\n\nAssistant:"]


def create(backend, name: str, **overrides) -> dict:
    response = httpx.post(f"{backend.url}/api/jobs", timeout=30,
                          json={"preset": "tiny", "name": name, "overrides": overrides})
    assert response.status_code == 201, response.text
    return response.json()


def report_steps(writer: JobWriter, stage: str, done: int, total: int, first_done: int, first_ago_s: float) -> None:
    """What the worker's context writes when `stage` reports `done` of `total` now, its first report having come
    `first_ago_s` seconds ago at `first_done`."""
    now = utcnow()
    with writer.Session() as s:
        queue.record(s, writer.job_id, progress=(stage, done / total, 0.5),
                     steps=queue.StepProgress(done, total, first_done, now - timedelta(seconds=first_ago_s), now))


def texts(at: AppTest) -> list[str]:
    """Every markdown, caption, text, info and warning shown, in display order."""
    kinds = {"markdown", "caption", "text", "alert", "info", "warning", "error"}
    return [str(el.value) for el in walk(at._tree) if getattr(el, "type", None) in kinds and hasattr(el, "value")]


def trace_names(at: AppTest) -> list[str]:
    return [t.get("name", "") for c in at.get("plotly_chart") for t in json.loads(c.proto.spec)["data"]]


def bar_texts(at: AppTest) -> list[str]:
    return [el.proto.text for el in walk(at._tree) if getattr(el, "type", None) == "progress"]


def shown_cells(frame):
    """A dataframe's cells as the page shows them (the pandas Styler's display values)."""
    return convert_arrow_bytes_to_pandas_df(frame.proto.arrow_data.styler.display_values)


def jobs_page(at: AppTest | None = None) -> AppTest:
    at = at or AppTest.from_file(str(APP), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, at.exception
    return at


def test_a_running_job_shows_its_steps_and_time_left_and_cancel_asks_first(backend, dashboard_env):
    dashboard_env(backend.url)
    job = create(backend, "watched", algorithm="grpo")
    writer = JobWriter(backend.db_url, job["id"])
    writer.claim()
    writer.begin("data")
    writer.end("data")
    writer.begin("sft")
    writer.metrics("sft", {"sys/rss_mb": [500.0, 510.0]})  # only the sampler's memory: no step yet

    at = open_job_page(job["id"])
    loading = [t for t in texts(at) if "loading / warm-up…" in t]
    assert loading and loading[0].startswith("**SFT: loading / warm-up… 0m"), loading
    assert not [c for c in at.get("plotly_chart") if "SFT loss" in c.proto.spec], "no empty SFT chart while loading"
    assert any(t.startswith("▶ SFT · loading / warm-up…") for t in bar_texts(at)), bar_texts(at)
    assert any("time left **—**" in t for t in texts(at)), "nothing is known yet: a dash, not a guess"

    # SFT's first step came 200 s ago (after loading), its third now: 2 steps in 200 s, 7 to go, about 700 s.
    report_steps(writer, "sft", 3, 10, 1, 200)
    at.run()
    assert not at.exception, at.exception
    sft_bar = next(t for t in bar_texts(at) if "SFT" in t)
    assert re.fullmatch(r"▶ SFT · step 3 of 10 · 1[01]m \d\ds left", sft_bar), sft_bar
    assert any(re.search(r"time left \*\*≥ 1[01]m \d\ds \(\+ reward model, GRPO, evaluation: not timed yet\)\*\*", t)
               for t in texts(at)), [t for t in texts(at) if "status" in t]
    assert any(t.startswith("○ GRPO · pending") for t in bar_texts(at)), "the alignment stage reads as GRPO"

    # One Smoothing slider smooths every curve of the page.
    writer.metrics("sft", {"sft/loss": [3.0, 2.5, 2.7, 2.2]}, start=1)
    at.run()
    assert not [n for n in trace_names(at) if n.endswith("(smoothed)")]
    at.slider(key=f"j{job['id']}-smoothing").set_value(0.6).run()
    assert not at.exception, at.exception
    smoothed = [n for n in trace_names(at) if n.endswith("(smoothed)")]
    assert len(smoothed) >= 2, trace_names(at)  # the overview's and the SFT tab's loss curves

    jobs = jobs_page()
    row = jobs.dataframe[0].value.set_index("id").loc[job["id"]]
    assert row["stage"] == "SFT · 3/10" and re.fullmatch(r"≥ 1[01]m \d\ds", row["time left"]), row.to_dict()

    # Cancel asks first, on the Jobs list ...
    jobs.selectbox(key="jobs_action_job").select(job["id"]).run()
    jobs.button(key="jobs_cancel").click().run()
    assert any(f"Cancel job #{job['id']}?" in w.value for w in jobs.warning)
    assert not httpx.get(f"{backend.url}/api/jobs/{job['id']}").json()["cancel_requested"]
    jobs.button(key="jobs_confirm_cancel_no").click().run()
    jobs.run()  # AppTest's tree does not follow a fragment's own rerun (`st.rerun(scope="fragment")`)
    assert not any("Cancel job" in w.value for w in jobs.warning)
    assert not httpx.get(f"{backend.url}/api/jobs/{job['id']}").json()["cancel_requested"]

    # ... and on the job page, where Yes sends it.
    at.button(key="job_cancel").click().run()
    assert any(f"Cancel job #{job['id']}?" in w.value for w in at.warning)
    assert not httpx.get(f"{backend.url}/api/jobs/{job['id']}").json()["cancel_requested"]
    at.button(key="job_confirm_cancel_yes").click().run()
    assert not at.exception, at.exception
    assert httpx.get(f"{backend.url}/api/jobs/{job['id']}").json()["cancel_requested"]
    writer.close()


def test_a_finished_job_leads_with_its_verdict_and_shows_its_samples_config_and_result(backend, dashboard_env):
    dashboard_env(backend.url)
    job = create(backend, "finished", algorithm="grpo", ppo={"steps": 7})
    waiting = create(backend, "waiting")  # a queued job: no result, no duration, dashes in the list
    writer = JobWriter(backend.db_url, job["id"])
    writer.claim()
    writer.begin("ppo")
    writer.samples("ppo", [{"step": 1, "seq": 0, "prompt": PROMPTS[0], "response": "In trees, mostly caf\ufffd",
                            "reward": 0.25},
                           {"step": 2, "seq": 0, "prompt": PROMPTS[1], "response": "I will not say that.",
                            "reward": -0.5}])
    writer.end("ppo")
    writer.begin("evaluate")
    writer.end("evaluate", ev_report("grpo", 0.8, -0.2, 0.3, PROMPTS))
    writer.finish()
    writer.close()

    at = open_job_page(job["id"])
    shown = texts(at)
    # The verdict comes first: ev_report's reward +0.5 in [+0.4, +0.6], gold +0.4 in [+0.3, +0.5], 3 tokens shorter.
    assert shown.index("#### Result: GRPO vs SFT") < min(i for i, t in enumerate(shown) if "Latest sample" in t)
    assert "**Reward** · :green[better, significant]" in shown
    assert "**+0.5** (95% interval +0.4 to +0.6)" in shown and "SFT -0.2 → GRPO 0.3" in shown
    assert any("standard deviations" in t for t in shown), "the reward's unit in words"
    assert "**Answer length** · shorter, significant" in shown and "**-3** (95% interval -3.1 to -2.9)" in shown
    assert "**KL from SFT**" in shown and "**0.8**" in shown
    assert not any("\ufffd" in t for t in shown), "no replacement character anywhere"
    assert "In trees, mostly caf" in shown

    # Flagged prompts are hidden on the landing views until asked for, the toggle saying how many.
    assert not any(SLUR in t for t in shown)
    toggles = {t.key: t.label for t in at.toggle}
    assert toggles[f"j{job['id']}-verdict-flagged"] == "Show 1 hidden prompt flagged as offensive"
    assert toggles[f"j{job['id']}-latest-flagged"] == "Show 1 hidden prompt flagged as offensive"
    at.toggle(key=f"j{job['id']}-pairs-flagged").set_value(True).run()
    assert any(SLUR in t for t in texts(at)), "shown on request"

    # Samples: the held-out answers side by side come before the table.
    elements = list(walk(at._tree))
    pairs = [i for i, el in enumerate(elements) if str(getattr(el, "key", "")).startswith("eval-pair-")]
    table = next(i for i, el in enumerate(elements) if el.type == "dataframe" and "response" in el.value.columns)
    assert len(pairs) == 2 and max(pairs) < table
    assert shown_cells(elements[table])["stage"].tolist() == ["GRPO"], "the table's own toggle still hides one"
    assert {t.key: t.label for t in at.toggle}[f"j{job['id']}-samples-flagged"] == \
        "Show 1 hidden prompt flagged as offensive"

    # Config: what differs from the preset, then clone it into the New-job form.
    changed = next(df.value for df in at.dataframe if "field" in df.value.columns).set_index("field")
    assert changed.loc["algorithm"].tolist() == ["grpo", "ppo"] and changed.loc["ppo.steps", "this job"] == "7"
    resolved = json.loads(at.json[-1].value)
    assert resolved["ppo"]["steps"] == 7 and resolved["algorithm"] == "grpo", "the resolved config"
    at.button(key=f"j{job['id']}-clone").click().run()
    assert not at.exception, at.exception
    assert any(i.value.startswith(f"Cloned job #{job['id']}") for i in at.info), "the New-job form took the job"
    assert at.text_input(key="nj_name").value == "finished (copy)"

    # The Jobs list: the result columns from the job summary, dashes for what a job does not have.
    jobs = jobs_page()
    rows = jobs.dataframe[0].value.set_index("id")
    done = rows.loc[job["id"]]
    assert (done["reward Δ"], done["reading"], done["gold Δ"], done["KL"]) == (0.5, "better, significant", 0.4, 0.8)
    cells = shown_cells(jobs.dataframe[0]).set_index("id")
    queued = cells.loc[str(waiting["id"])]
    assert queued["reward Δ"] == queued["reading"] == queued["KL"] == "—"
    assert not any(v in ("None", "nan") for v in cells.to_numpy().ravel())
    assert jobs.dataframe[0].proto.placeholder == "—", "the grid draws a missing cell as the placeholder"


def test_a_job_scored_by_stated_rewards_plots_each_term_and_shows_it_on_its_samples(backend, dashboard_env):
    """Issue 30: the job page draws each `ppo.rewards` term's curve beside the total, and a sample card shows each
    term's score of that answer (as the worker stores it, `Sample.parts`)."""
    dashboard_env(backend.url)
    rewards = [{"kind": "reference_answer", "column": "answer", "name": "correct"},
               {"kind": "regex", "pattern": "^Answer:", "weight": 0.2, "name": "format"}]
    job = create(backend, "stated", algorithm="grpo", stages=["data", "sft", "ppo", "evaluate"],
                 ppo={"rewards": rewards})
    writer = JobWriter(backend.db_url, job["id"])
    writer.claim()
    writer.begin("ppo")
    writer.metrics("ppo", {"grpo/reward_mean": [0.4, 0.8], "grpo/rewards/correct_mean": [0.2, 0.6],
                           "grpo/rewards/correct_std": [0.4, 0.5], "grpo/rewards/format_mean": [1.0, 1.0],
                           "grpo/rewards/format_std": [0.0, 0.0]}, start=1)
    writer.samples("ppo", [{"step": 2, "prompt": "\n\nHuman: What kind of thing is tiger?\n\nAssistant:",
                            "response": "Answer: animal", "reward": 1.2, "parts": {"correct": 1.0, "format": 1.0}}])
    at = open_job_page(job["id"])
    assert plotly_trace(at, "Stated reward terms", "correct (× 1)")["y"] == [0.2, 0.6]
    assert plotly_trace(at, "Stated reward terms", "format (× 0.2)")["y"] == [1.0, 1.0]
    assert any("reward **1.2** · correct 1 · format 1" in t for t in texts(at)), texts(at)
    writer.close()
