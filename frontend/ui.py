"""Small pieces shared by the dashboard's pages: the backend-down banner, job picking, formatting."""

from __future__ import annotations

import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import streamlit as st

from edgerlhf.contract import JobStatus
from frontend import alerts
from frontend.api_client import ApiError, BackendDown, get_client
from frontend.live import job_algorithm

T = TypeVar("T")

# Plain text symbols rather than emoji: they render in every font (a headless Chromium has no emoji font).
STATUS_ICON = {JobStatus.queued: "◷", JobStatus.running: "▶", JobStatus.succeeded: "✓", JobStatus.failed: "✗",
               JobStatus.cancelled: "■"}
CANCELLABLE = (JobStatus.queued, JobStatus.running)
"""Statuses the backend cancels from (`POST /api/jobs/{id}/cancel`); others answer 409."""
RETRYABLE = (JobStatus.failed, JobStatus.cancelled)
"""Statuses the backend requeues from (`POST /api/jobs/{id}/retry`)."""
BANNER = "Backend unreachable"
"""First words of the banner shown when the backend does not answer (tests look for it)."""
JOB_PAGE = "app_pages/job.py"


def status_icon(status: str) -> str:
    """The symbol of a job status (`JobPublic.status`); an unknown status raises."""
    return STATUS_ICON[JobStatus(status)]


def backend_down(exc: BackendDown, inline: bool = False) -> None:
    """The banner. Shown once: when the main script (or a page) already showed it, it is on screen, also
    while fragments refresh; `inline` (from a live fragment) does not claim it, so a fragment rerun after
    the backend went away shows its own."""
    if st.session_state.get("backend_down"):
        return
    if not inline:
        st.session_state["backend_down"] = True
    st.error(f"**{BANNER}** at `{exc.url}` — {exc.reason}. Start it with `edgerlhf backend` "
             "(or `edgerlhf up`). Jobs keep running in the worker; this page catches up when it is back.",
             icon=":material/cloud_off:")


def backend_back() -> None:
    """Called by a live fragment after a successful request: clear a stale banner with a full rerun."""
    if st.session_state.get("backend_down"):
        st.session_state["backend_down"] = False
        st.rerun()


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
    """Run an API call; on failure show the banner (backend down) or the error, and return None."""
    try:
        return fn(*args, **kwargs)
    except BackendDown as exc:
        backend_down(exc)
    except ApiError as exc:
        st.error(f"Backend error {exc.status}: {exc.message}")
    return None


def act(fn: Callable[..., Any], *args: Any) -> bool:
    """Run an action (cancel, retry, delete); show why it failed and return False if it did."""
    try:
        fn(*args)
        return True
    except BackendDown as exc:
        backend_down(exc, inline=True)
    except ApiError as exc:
        st.error(f"Backend refused: {exc.message}")
    return False


def parse_time(value: Any) -> datetime | None:
    if value in (None, ""):
        return None
    if isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, tz=timezone.utc)
    try:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)


def duration(job: dict[str, Any]) -> str:
    """Run time so far (running) or in total (finished); empty while queued."""
    start = parse_time(job["started_at"])
    if start is None:
        return ""
    end = parse_time(job["finished_at"]) or datetime.now(timezone.utc)
    secs = max(0, int((end - start).total_seconds()))
    h, rem = divmod(secs, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def job_label(job: dict[str, Any]) -> str:
    """A job in a picker, with its preset and alignment algorithm. Without its status: a select box keeps
    showing the label it had when chosen, so a status in it would go stale while the job runs (the page shows
    the live status elsewhere)."""
    return f"#{job['id']} {job['name']} ({job['preset']}, {job_algorithm(job)})"


SYSTEM_TTL = 60.0  # seconds the GPU list (for the memory limit line) is reused before asking /api/system again


def gpu_total_mb(client, job: dict[str, Any]) -> tuple[float | None, str | None]:
    """(memory total, name) of the GPU the job runs on: its worker's GPU (`SystemPublic.workers`), else the
    backend machine's GPU its device names (`SystemPublic.gpus`); (None, None) without a GPU."""
    cached = st.session_state.get("job_system")
    if cached is None or time.time() - cached[0] > SYSTEM_TTL:
        try:
            cached = (time.time(), client.system())
        except (BackendDown, ApiError):
            cached = (time.time(), None)
        st.session_state["job_system"] = cached
    system = cached[1]
    device = job["config"]["device"]
    if system is None or device == "cpu":
        return None, None
    worker = next((w for w in system["workers"] if w["id"] == job["worker_id"]), None)
    if worker is not None and worker["gpu_memory_mb"]:  # the worker may be on another machine
        return float(worker["gpu_memory_mb"]), worker["gpu_name"] or f"GPU {worker['gpu_index']}"
    if not system["gpus"]:
        return None, None
    gpus = system["gpus"]
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    gpu = next((g for g in gpus if g["index"] == index), gpus[0])
    return float(gpu["memory_total_mb"]), gpu["name"]


def show_alerts(job: dict[str, Any], series: dict[str, list], gpu_total: float | None,
                title: str | None = None) -> int:
    """The dashboard's warnings of a job (`frontend.alerts.check_job`: its algorithm's metrics and limits),
    under `title` when there are any; returns how many."""
    found = alerts.check_job(job, series, gpu_total_mb=gpu_total)
    if found and title:
        st.markdown(title)
    for a in found:
        (st.error if a.level == "error" else st.warning)(
            a.message, icon=":material/error:" if a.level == "error" else ":material/warning:")
    return len(found)


def pick_job(key: str = "job") -> int | None:
    """The job named by `?job=` in the URL, else a picker; the choice goes back into the URL.

    Keeping the job in the URL is what lets a reloaded tab (or a shared link) re-attach to the same job.
    """
    jobs = call(get_client().list_jobs, limit=200)
    wanted = st.query_params.get("job")
    try:
        wanted_id = int(wanted) if wanted is not None else None
    except ValueError:
        wanted_id = None
    if jobs is None:  # backend down: keep the job in the URL so the page re-attaches when it is back
        return wanted_id
    if not jobs and wanted_id is None:
        st.info("No jobs yet: launch one on the **New job** page.")
        return None
    ids = [j["id"] for j in jobs]
    labels = {j["id"]: job_label(j) for j in jobs}
    if wanted_id is not None and wanted_id not in labels:
        ids.insert(0, wanted_id)
        labels[wanted_id] = f"#{wanted_id}"
    index = ids.index(wanted_id) if wanted_id in ids else 0
    chosen = st.selectbox("Job", ids, index=index, format_func=lambda i: labels.get(i, f"#{i}"), key=key)
    if chosen is not None and str(chosen) != wanted:
        st.query_params["job"] = str(chosen)
    return chosen


_CKPT = re.compile(r"(\w+)(?:/step-(\d+))?")
_STAGE_ORDER = {"base": 0, "sft": 1, "reward": 2, "ppo": 3, "final": 4, "evaluate": 5}


def checkpoint_order(name: str | None) -> tuple[int, int, str]:
    """Sort key of a checkpoint label: base, sft (by step), then ppo steps in order."""
    if not name:
        return (9, 0, "")
    m = _CKPT.match(name)
    stage = m.group(1) if m else name
    step = int(m.group(2)) if m and m.group(2) else (10**9 if stage == "ppo" and "final" in name else -1)
    return (_STAGE_ORDER.get(stage, 8), step, name)


def tail(text: str, limit: int) -> str:
    """The end of a long text (a dialogue's last turns matter most), marked when cut."""
    return text if len(text) <= limit else "…" + text[-limit:]


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:,.0f}"
    return str(value)


def sampling_sidebar(page: str, zero_help: str, seed: bool = False) -> dict[str, Any]:
    """The sidebar's sampling settings of a page that generates (`chat`, `arena`), as the parameters of
    `/v1/chat/completions`; widget keys are `<page>_temperature` and so on."""
    from edgerlhf.settings import get_settings

    limit = get_settings().chat_max_tokens
    with st.sidebar:
        st.subheader("Sampling")
        params: dict[str, Any] = {
            "temperature": st.slider("Temperature", 0.0, 2.0, 0.7, 0.05, key=f"{page}_temperature", help=zero_help),
            "top_p": st.slider("Top-p", 0.05, 1.0, 0.95, 0.05, key=f"{page}_top_p"),
            "max_tokens": int(st.slider("Max new tokens", 1, limit, min(64, limit), key=f"{page}_max_tokens"))}
        if seed:
            value = st.number_input("Seed", min_value=-1, value=-1, step=1, key=f"{page}_seed",
                                    help="-1: a new sample every time; any other value repeats the same sample.")
            if value >= 0:
                params["seed"] = int(value)
    return params
