"""System page: GPUs and their memory, CPU memory, the worker's state and the queue (`GET /api/system`)."""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
import streamlit as st

from frontend import ui
from frontend.api_client import ApiError, BackendDown, get_client


def _num(d: dict[str, Any], *names: str) -> float | None:
    for n in names:
        if isinstance(d.get(n), (int, float)):
            return float(d[n])
    return None


def gpu_figure(gpus: list[dict[str, Any]]) -> go.Figure:
    """Used vs total memory per GPU as horizontal bars."""
    names = [f"{g.get('index', i)}: {g.get('name', 'GPU')}" for i, g in enumerate(gpus)]
    used = [_num(g, "memory_used_mb", "used_mb") or 0.0 for g in gpus]
    total = [_num(g, "memory_total_mb", "total_mb") or 0.0 for g in gpus]
    fig = go.Figure()
    fig.add_trace(go.Bar(y=names, x=used, orientation="h", name="used", marker_color="#d62728"))
    fig.add_trace(go.Bar(y=names, x=[max(t - u, 0) for t, u in zip(total, used)], orientation="h",
                         name="free", marker_color="#c7e9c0"))
    fig.update_layout(barmode="stack", height=120 + 40 * len(gpus), margin=dict(l=10, r=10, t=30, b=10),
                      xaxis_title="MB", title="GPU memory")
    return fig


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

    gpus = info.get("gpus") or []
    st.subheader("GPUs")
    if gpus:
        st.plotly_chart(gpu_figure(gpus), key="sys-gpus", width="stretch")
        for g in gpus:
            total = _num(g, "memory_total_mb", "total_mb")
            used = _num(g, "memory_used_mb", "used_mb")
            if total:
                st.progress(min((used or 0) / total, 1.0),
                            text=f"{g.get('name', 'GPU')}: {used or 0:,.0f} / {total:,.0f} MB")
    else:
        st.info("No GPU visible to the backend: jobs run on the CPU (the `tiny` preset is made for that).")

    st.subheader("CPU and memory")
    cpu = info.get("cpu") or {}
    cols = st.columns(4)
    total = _num(cpu, "memory_total_mb", "total_mb")
    used = _num(cpu, "memory_used_mb", "used_mb")
    cols[0].metric("CPU cores", cpu.get("count") or "–")
    cols[1].metric("CPU load", f"{cpu['percent']:.0f}%" if isinstance(cpu.get("percent"), (int, float)) else "–")
    cols[2].metric("RAM used", f"{used:,.0f} MB" if used is not None else "–")
    cols[3].metric("RAM total", f"{total:,.0f} MB" if total else "–")
    if total and used is not None:
        st.progress(min(used / total, 1.0), text=f"RAM {used / total:.0%} used")

    st.subheader("Worker and queue")
    worker = info.get("worker") or {}
    workers = info.get("workers") or []
    alive = bool(worker.get("alive"))
    c = st.columns(4)
    c[0].metric("Worker", ("alive · " + str(worker.get("state") or "")) if alive else "not running")
    beat = ui.parse_time(worker.get("last_heartbeat"))
    c[1].metric("Last heartbeat", beat.astimezone().strftime("%H:%M:%S") if beat else "–")
    c[2].metric("Running job", f"#{worker['job_id']}" if worker.get("job_id") else "–")
    c[3].metric("Queued jobs", info.get("queue_length", "–"))
    if not alive:
        st.warning("No worker is heartbeating: queued jobs wait until one starts (`edgerlhf worker`).")
    jobs = info.get("jobs") or {}
    if jobs:
        st.caption(" · ".join(f"{ui.STATUS_ICON.get(k, '')} {v} {k}" for k, v in jobs.items()))
    if workers:
        st.dataframe(workers, hide_index=True, width="stretch")
    with st.expander("Raw /api/system"):
        st.json(info, expanded=False)


panel()
