"""Compare page: overlay the curves and reports of several jobs.

Each job's metrics come through the same cursor feeds as the job page (`frontend.live`), so comparing
running jobs keeps downloading only their new points.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from edgerlhf.contract import FINISHED, JobStatus
from frontend import charts, live, ui
from frontend.api_client import ApiError, BackendDown, get_client
from frontend.reports import eval_headline, precision_rows

DEFAULT_KEYS = ["ppo/reward_mean", "ppo/kl", "ppo/response_length", "sft/eval_loss"]

st.title("Compare jobs")
client = get_client()
jobs = ui.call(client.list_jobs, limit=200)
if not jobs:
    if jobs is not None:
        st.info("No jobs yet.")
    st.stop()

by_id = {j["id"]: j for j in jobs}
default = [j["id"] for j in jobs if j["status"] in (JobStatus.succeeded, JobStatus.running)][:2] or [jobs[0]["id"]]
chosen = st.multiselect("Jobs", list(by_id), default=default, format_func=lambda i: ui.job_label(by_id[i]),
                        key="compare_jobs")
if not chosen:
    st.stop()


def panel() -> None:
    feeds: dict[str, live.JobFeed] = {}
    for jid in chosen:
        feed = live.feed_for(st.session_state, jid)
        try:
            live.pull(client, feed, samples=False, logs=False)
            live.refresh_report(client, feed)
        except BackendDown as exc:
            ui.backend_down(exc, inline=True)
        except ApiError as exc:
            st.error(f"Job #{jid}: {exc.message}")
        feeds[f"#{jid} {by_id[jid]['name']}"] = feed
    keys = sorted({k for f in feeds.values() for k in f.keys()})
    if not keys:
        st.info("The chosen jobs have no metrics yet.")
        return
    picked = st.multiselect("Metrics", keys, default=[k for k in DEFAULT_KEYS if k in keys] or keys[:2],
                            key="compare_keys")
    cols = st.columns(2)
    for i, key in enumerate(picked):
        cols[i % 2].plotly_chart(charts.compare_figure(feeds, key), key=f"cmp-{key}", width="stretch")

    st.markdown("#### Final reports (SFT vs PPO)")
    reports = {label: feed.report for label, feed in feeds.items() if feed.report is not None}
    rows = [{"job": label, **eval_headline(r.evaluate)} for label, r in reports.items() if r.evaluate is not None]
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
    else:
        st.caption("None of the chosen jobs has finished its evaluate stage.")

    st.markdown("#### Reward-model precision study")
    study = [{"job": label, **row} for label, r in reports.items() for row in precision_rows(r.reward)]
    if study:
        st.dataframe(pd.DataFrame(study), hide_index=True, width="stretch")
    else:
        st.caption("None of the chosen jobs has finished its reward stage.")


any_active = any(JobStatus(by_id[j]["status"]) not in FINISHED for j in chosen)
st.fragment(run_every=5.0 if any_active else None)(panel)()
