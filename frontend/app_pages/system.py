"""System page: GPUs and their memory, CPU memory, every worker and the queue (`GET /api/system`).

Reads `SystemPublic` by its field names: each GPU's `index`, `name`, `memory_total_mb`, `memory_used_mb`;
each worker's (`WorkerPublic`) `id`, `host`, `pid`, `gpu_index`, `gpu_name`, `gpu_memory_mb`, `state`,
`job_id`, `last_heartbeat` and `alive`. The GPUs are those the backend's machine sees; each worker names
its own, on whatever machine it runs.
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import streamlit as st

from frontend import ui
from frontend.api_client import ApiError, BackendDown, get_client


def gpu_figure(gpus: list[dict[str, Any]]) -> go.Figure:
    """Used vs total memory per GPU as horizontal bars."""
    names = [f"{g['index']}: {g['name']}" for g in gpus]
    used = [g["memory_used_mb"] for g in gpus]
    total = [g["memory_total_mb"] for g in gpus]
    fig = go.Figure()
    fig.add_trace(go.Bar(y=names, x=used, orientation="h", name="used", marker_color="#d62728"))
    fig.add_trace(go.Bar(y=names, x=[max(t - u, 0) for t, u in zip(total, used)], orientation="h",
                         name="free", marker_color="#c7e9c0"))
    fig.update_layout(barmode="stack", height=120 + 40 * len(gpus), margin=dict(l=10, r=10, t=30, b=10),
                      xaxis_title="MB", title="GPU memory")
    return fig


def worker_rows(workers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One table row per worker (`SystemPublic.workers`), alive or not."""
    rows = []
    for w in workers:
        gpu = ui.DASH if w["gpu_index"] is None and w["gpu_name"] is None else \
            f"{w['gpu_index'] if w['gpu_index'] is not None else '?'}: {w['gpu_name'] or 'unknown'}"
        beat = ui.parse_time(w["last_heartbeat"])
        rows.append({"worker": w["id"], "alive": "yes" if w["alive"] else "no", "host": w["host"], "pid": w["pid"],
                     "GPU": gpu, "GPU memory (MB)": w["gpu_memory_mb"], "state": w["state"],
                     "job": f"#{w['job_id']}" if w["job_id"] else ui.DASH,
                     "last heartbeat": beat.astimezone().strftime("%Y-%m-%d %H:%M:%S") if beat else ui.DASH})
    return rows


st.title("System")


@st.fragment(run_every=5)
def panel() -> None:
    try:
        info = get_client().system()
        ui.backend_back()
    except BackendDown as exc:
        ui.backend_down(exc, inline=True)
        return
    except ApiError as exc:
        st.error(f"Backend error {exc.status}: {exc.message}")
        return

    gpus = info["gpus"]
    st.subheader("GPUs")
    if gpus:
        st.plotly_chart(gpu_figure(gpus), key="sys-gpus", width="stretch")
        for g in gpus:
            total, used = g["memory_total_mb"], g["memory_used_mb"]
            st.progress(min(used / total, 1.0) if total else 0.0, text=f"{g['name']}: {used:,.0f} / {total:,.0f} MB")
    else:
        st.info("No GPU visible to the backend: jobs run on the CPU (the `tiny` preset is made for that).")

    st.subheader("CPU and memory")
    cpu = info["cpu"]
    cols = st.columns(4)
    total, used = cpu["memory_total_mb"], cpu["memory_used_mb"]
    cols[0].metric("CPU cores", cpu["count"] or ui.DASH)
    cols[1].metric("CPU load", f"{cpu['percent']:.0f}%")
    cols[2].metric("RAM used", f"{used:,.0f} MB")
    cols[3].metric("RAM total", f"{total:,.0f} MB")
    st.progress(min(used / total, 1.0), text=f"RAM {used / total:.0%} used")

    st.subheader("Workers and queue")
    workers = info["workers"]
    live = [w for w in workers if w["alive"]]
    c = st.columns(4)
    c[0].metric("Workers", f"{len(live)} alive" if live else "not running")
    beats = [b for b in (ui.parse_time(w["last_heartbeat"]) for w in workers) if b]
    c[1].metric("Last heartbeat", max(beats).astimezone().strftime("%H:%M:%S") if beats else ui.DASH)
    running = [f"#{w['job_id']}" for w in live if w["job_id"]]
    c[2].metric("Running jobs", ", ".join(running) or ui.DASH)
    c[3].metric("Queued jobs", info["queue_length"])
    if not live:
        st.warning("No worker is heartbeating: queued jobs wait until one starts (`edgerlhf worker`).")
    st.caption(" · ".join(f"{ui.status_icon(k)} {v} {k}" for k, v in info["jobs"].items()))
    if workers:
        st.dataframe(worker_rows(workers), hide_index=True, width="stretch", key="sys-workers")
    with st.expander("Raw /api/system"):
        st.json(info, expanded=False)


panel()
