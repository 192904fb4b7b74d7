"""Jobs page: every job with its status, stage, progress, queue position, preset, alignment algorithm and
duration; cancel/retry/delete.

The table refreshes itself every few seconds (a fragment), so a queued job is seen starting without
reloading the page.
"""

from __future__ import annotations

import streamlit as st

from edgerlhf.contract import FINISHED, JobStatus
from frontend import ui
from frontend.api_client import ApiError, BackendDown, get_client

STATUSES = [s.value for s in JobStatus]

st.title("Jobs")
top = st.columns([3, 1])
status_filter = top[0].multiselect("Status", STATUSES, default=[], placeholder="all statuses", key="jobs_status")
if top[1].button("New job", icon=":material/add:", width="stretch"):
    st.switch_page("app_pages/new_job.py")


def _rows(jobs: list[dict]) -> list[dict]:
    rows = []
    for j in jobs:
        lines = (j["error"] or "").strip().splitlines()
        rows.append({
            "id": j["id"],
            "name": j["name"],
            "status": f"{ui.status_icon(j['status'])} {j['status']}",
            "stage": j["stage"] or "",
            "progress": j["progress"],
            "queue": j["queue_position"],
            "preset": j["preset"],
            "algorithm": j["algorithm"],
            "created": ui.parse_time(j["created_at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S"),
            "duration": ui.duration(j),
            "attempts": j["attempts"],
            "open": f"/job?job={j['id']}",
            "error": lines[-1][:160] if lines else "",
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
    st.dataframe(
        _rows(jobs), hide_index=True, width="stretch", key="jobs_table",
        column_config={
            "id": st.column_config.NumberColumn("id", width="small"),
            "progress": st.column_config.ProgressColumn("progress", min_value=0.0, max_value=1.0, format="percent"),
            "queue": st.column_config.NumberColumn("queue #", help="Position in the queue (queued jobs)"),
            "open": st.column_config.LinkColumn("open", display_text="open ↗"),
            "error": st.column_config.TextColumn("error", width="medium"),
        },
    )

    # Actions on one job: the buttons only offer what the backend allows in the job's status.
    by_id = {j["id"]: j for j in jobs}
    cols = st.columns([3, 1, 1, 1, 1])
    chosen = cols[0].selectbox("Act on job", list(by_id), format_func=lambda i: ui.job_label(by_id[i]),
                               key="jobs_action_job", label_visibility="collapsed")
    job = by_id.get(chosen)
    if job is None:
        return
    status = JobStatus(job["status"])
    if cols[1].button("Open", key="jobs_open", width="stretch"):
        st.switch_page(ui.JOB_PAGE, query_params={"job": str(chosen)})
    if cols[2].button("Cancel", key="jobs_cancel", disabled=status not in ui.CANCELLABLE, width="stretch"):
        if ui.act(client.cancel_job, chosen):
            st.toast(f"Cancel requested for job #{chosen}")
    if cols[3].button("Retry", key="jobs_retry", disabled=status not in ui.RETRYABLE, width="stretch"):
        if ui.act(client.retry_job, chosen):
            st.toast(f"Job #{chosen} queued again")
    if cols[4].button("Delete", key="jobs_delete", disabled=status not in FINISHED,
                      width="stretch", help="Removes the job and its artifacts"):
        st.session_state["jobs_confirm_delete"] = chosen
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
