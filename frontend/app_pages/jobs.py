"""Jobs page: every job with its status, stage, step count and time left, progress, queue position, preset,
alignment algorithm, round of RLHF (once a job has continued another) and duration, and once evaluated its result
(reward and gold change with their readings, KL, from `JobSummary.result`: no report is fetched per job); cancel
(with a confirmation), retry, delete.

The table refreshes itself every few seconds (a fragment), so a queued job is seen starting without
reloading the page.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import streamlit as st

from edgerlhf.contract import FINISHED, JobStatus, algorithm_traits
from frontend import ui
from frontend.api_client import ApiError, BackendDown, get_client
from frontend.charts import stage_name
from frontend.live import job_algorithm, job_clock
from frontend.reports import result_columns

STATUSES = [s.value for s in JobStatus]

st.title("Jobs")
top = st.columns([3, 1])
status_filter = top[0].multiselect("Status", STATUSES, default=[], placeholder="all statuses", key="jobs_status")
if top[1].button("New job", icon=":material/add:", width="stretch"):
    st.switch_page("app_pages/new_job.py")


CONFIRM_CANCEL = "jobs_confirm_cancel"  # session key: the job whose Cancel awaits a yes
COLUMNS = {
    "id": st.column_config.NumberColumn("id", width=36),
    "name": st.column_config.TextColumn("name", width=105),
    "round": st.column_config.TextColumn(
        "round", width=52, help="Which round of RLHF: 1 from a base model; 2 ← #5: continues job 5 from its aligned "
                                "policy (Continue on a finished job's page). Shown once a job has a next round"),
    "status": st.column_config.TextColumn("status", width=95, help="queued #N: its place in the queue"),
    "stage": st.column_config.TextColumn(
        "stage", width=110, help="The stage running (or the last that ran), with its steps done of its total"),
    "time left": st.column_config.TextColumn(
        "time left", width=72, help="At each running stage's own step rate; ≥ while later stages have no rate yet; "
                                    "— while nothing is known (a stage still loading)"),
    "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent",
                                                width=70),
    "algorithm": st.column_config.TextColumn("algorithm", width=62),
    "reward Δ": st.column_config.Column(
        "reward Δ", width=62, help="Held-out reward, aligned − SFT, per prompt (the evaluate stage)"),
    "reading": st.column_config.TextColumn(
        "reading", width=145, help="better / worse, significant: the bootstrap interval of the reward change "
                                   "excludes 0; no detectable change: it holds 0 (the gold's for a run without "
                                   "rewards)"),
    "gold Δ": st.column_config.Column("gold Δ", width=58, help="Gold score, aligned − SFT (known-answer task)"),
    "KL": st.column_config.Column("KL", width=62, help="KL of the aligned policy from SFT, nats per answer"),
    "open": st.column_config.LinkColumn("open", display_text="open ↗", width=55),
    # Hidden until shown from the table's toolbar (the job picker below says a failed job's error).
    "queue": None, "preset": None, "created": None, "duration": None, "error": None,
}  # the visible columns take 940 px: the table fits beside the sidebar in a 1,400 px window


def _rows(jobs: list[dict[str, Any]], now: datetime) -> list[dict[str, Any]]:
    rows = []
    for j in jobs:
        lines = (j["error"] or "").strip().splitlines()
        algorithm = job_algorithm(j)
        clock = job_clock(j, now)
        stage = stage_name(j["stage"], algorithm) if j["stage"] else None
        current = next((c for c in clock.stages if c.phase in ("loading", "stepping")), None)
        if current is not None and current.phase == "loading":
            stage = f"{stage} · loading"
        elif current is not None and current.done is not None and current.total:
            stage = f"{stage} · {current.done}/{current.total}"
        queued = f" #{j['queue_position']}" if j["queue_position"] else ""
        rows.append({
            "id": j["id"],
            "name": j["name"],
            "round": f"{j['round']} ← #{j['parent_id']}" if j.get("parent_id") else str(j.get("round") or 1),
            "status": f"{ui.status_icon(j['status'])} {j['status']}{queued}",
            "stage": stage,
            "time left": ui.eta_text(clock, algorithm, short=True) if j["status"] == JobStatus.running.value else None,
            "progress": j["progress"],
            "algorithm": algorithm_traits(algorithm).label,
            **result_columns(j["result"]),
            "open": f"/job?job={j['id']}",
            "queue": j["queue_position"],
            "preset": j["preset"],
            "created": ui.parse_time(j["created_at"]).astimezone().strftime("%Y-%m-%d %H:%M"),
            "duration": ui.duration(j) or None,
            "error": ui.head(lines[-1], 160) if lines else None,
        })
    return rows


@st.fragment(run_every=3)
def job_table() -> None:
    client = get_client()
    try:
        jobs = client.list_jobs(limit=200)
        ui.backend_back()
    except BackendDown as exc:
        ui.backend_down(exc, inline=True)
        return
    except ApiError as exc:
        st.error(f"Backend error {exc.status}: {exc.message}")
        return
    if status_filter:
        jobs = [j for j in jobs if j["status"] in status_filter]
    if not jobs:
        st.info("No jobs yet: launch one on the **New job** page." if not status_filter else "No job matches the filter.")
        return
    counts = {s: sum(j["status"] == s for j in jobs) for s in STATUSES}
    st.caption(" · ".join(f"{ui.status_icon(s)} {counts[s]} {s}" for s in STATUSES if counts[s]))
    rounds = any((j.get("round") or 1) > 1 for j in jobs)  # the column only for people who continue jobs
    ui.dataframe(_rows(jobs, datetime.now(timezone.utc)), hide_index=True, width="stretch", key="jobs_table",
                 column_config=COLUMNS if rounds else {**COLUMNS, "round": None})

    # Actions on one job: the buttons only offer what the backend allows in the job's status.
    by_id = {j["id"]: j for j in jobs}
    cols = st.columns([3, 1, 1, 1, 1])
    chosen = cols[0].selectbox("Act on job", list(by_id), format_func=lambda i: ui.job_label(by_id[i]),
                               key="jobs_action_job", label_visibility="collapsed")
    job = by_id.get(chosen)
    if job is None:
        return
    status = JobStatus(job["status"])
    if job["error"]:
        st.caption(f"Job #{chosen} failed: {ui.head(job['error'].strip().splitlines()[-1], 300)}")
    if cols[1].button("Open", key="jobs_open", width="stretch"):
        st.switch_page(ui.JOB_PAGE, query_params={"job": str(chosen)})
    if cols[2].button("Cancel", key="jobs_cancel", disabled=status not in ui.CANCELLABLE, width="stretch"):
        ui.ask_to_cancel(chosen, CONFIRM_CANCEL)
    if cols[3].button("Retry", key="jobs_retry", disabled=status not in ui.RETRYABLE, width="stretch"):
        if ui.act(client.retry_job, chosen):
            st.toast(f"Job #{chosen} queued again")
    if cols[4].button("Delete", key="jobs_delete", disabled=status not in FINISHED,
                      width="stretch", help="Removes the job and its artifacts"):
        st.session_state["jobs_confirm_delete"] = chosen
    if status in ui.CANCELLABLE and ui.confirm_cancel(client, chosen, CONFIRM_CANCEL):
        st.rerun()  # the whole page: a fragment-scoped rerun is refused when the click came in a full run
    if st.session_state.get("jobs_confirm_delete") == chosen:
        st.warning(f"Delete job #{chosen} and all its artifacts?")
        yes, no = st.columns(2)
        if yes.button("Yes, delete", key="jobs_delete_yes", type="primary"):
            st.session_state.pop("jobs_confirm_delete")
            if ui.act(client.delete_job, chosen):
                st.toast(f"Job #{chosen} deleted")
                st.rerun(scope="fragment")
        if no.button("Keep it", key="jobs_delete_no"):
            st.session_state.pop("jobs_confirm_delete")
            st.rerun(scope="fragment")


job_table()
