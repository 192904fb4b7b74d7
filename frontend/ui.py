"""Small pieces shared by the dashboard's pages: the backend-down banner, job picking, cancelling with a
confirmation, how numbers, durations, stage names and model text are shown, and hiding flagged samples."""

from __future__ import annotations

import math
import numbers
import re
import time
from datetime import datetime, timezone
from typing import Any, Callable, TypeVar

import pandas as pd
import streamlit as st
from pandas.io.formats.style import Styler

from edgerlhf.contract import JobStatus, StageStatus
from frontend import alerts
from frontend.charts import stage_name
from frontend.api_client import ApiError, BackendDown, get_client
from frontend.flagged import flagged_sample
from frontend.live import JobClock, StageClock, job_algorithm

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
NEW_JOB_PAGE = "app_pages/new_job.py"
"""Opened with `?clone=<job id>`, its form starts from that job's preset and changes."""
DASH = "—"
"""What a table or a figure shows for a value that is missing or not a number."""
UNDECODABLE = "[…]"
"""Shown in a model's text instead of bytes that were not valid UTF-8 (`clean_text`)."""


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
    return seconds_text((end - start).total_seconds())


def seconds_text(seconds: float | None) -> str:
    """`1h 02m 05s`, `3m 05s`, `0m 45s`; `DASH` when unknown."""
    if seconds is None:
        return DASH
    h, rem = divmod(max(0, int(seconds)), 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def stage_text(clock: StageClock, algorithm: str) -> str:
    """One stage's bar caption: its name (`charts.stage_name`: the alignment stage by its algorithm), its status,
    and while it runs `step k of N · 1m 20s left` or `loading / warm-up… 0m 35s`."""
    parts = [stage_name(clock.stage, algorithm)]
    steps = f"step {clock.done} of {clock.total}" if clock.done is not None and clock.total else None
    if clock.phase == "loading":
        parts.append(f"loading / warm-up… {seconds_text(clock.elapsed_s)}")
    elif clock.phase == "stepping":
        left = f"{seconds_text(clock.remaining_s)} left" if clock.remaining_s is not None else "timing…"
        parts += [p for p in (steps, left) if p]
    else:
        parts += [clock.status.value] + ([steps] if steps and clock.status != StageStatus.succeeded else [])
    return " · ".join(parts)


def eta_text(clock: JobClock, algorithm: str, short: bool = False) -> str:
    """The job's time left: `4m 10s`; `≥ 4m 10s (+ GRPO, evaluation: not timed yet)` while stages to come have no
    rate of their own yet (`short`: without the parenthesis); `DASH` when nothing is known."""
    if clock.remaining_s is None:
        return DASH
    if not clock.untimed:
        return seconds_text(clock.remaining_s)
    if short:
        return f"≥ {seconds_text(clock.remaining_s)}"
    later = ", ".join(stage_name(stage, algorithm) for stage in clock.untimed)
    return f"≥ {seconds_text(clock.remaining_s)} (+ {later}: not timed yet)"


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


def head(text: str, limit: int) -> str:
    """The start of a long text on one line (a table cell), marked when cut."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rstrip() + "…"


_BROKEN = re.compile("\ufffd+")


def clean_text(text: str | None) -> str:
    """A model's text as a person should read it, without replacement characters (U+FFFD).

    A byte-level tokenizer decodes a multibyte character cut at the length cap as U+FFFD at the very end: that
    partial character is dropped. Elsewhere (bytes that never were valid UTF-8) each run of them shows as
    `UNDECODABLE`, so the text reads as written and never as "��" noise. Use it wherever a sample is shown."""
    if not text:
        return ""
    return _BROKEN.sub(UNDECODABLE, text.rstrip("\ufffd"))


def fmt(value: Any, digits: int = 3) -> str:
    """A value as a table cell or a caption shows it: a number to `digits` significant digits (from 10**digits up
    a whole number with thousands separators), `DASH` for None and NaN."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return DASH
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return str(value)
    if isinstance(value, numbers.Integral):
        return f"{int(value):,}"
    value = float(value)
    if math.isinf(value):
        return "∞" if value > 0 else "−∞"
    rounded = float(f"{value:.{digits}g}")  # 999.96 rounds up to 1000: a whole number too
    return f"{value:,.0f}" if abs(rounded) >= 10 ** digits else f"{value:.{digits}g}"


def signed(value: float | None, digits: int = 3) -> str:
    """A difference with its sign (`+0.31`, `-1.2`); `DASH` for None."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return DASH
    return ("+" if value > 0 else "") + fmt(value, digits)


def table(rows: list[dict[str, Any]] | pd.DataFrame) -> Styler:
    """Rows for `st.dataframe`, each cell shown as `fmt` shows it (3 significant digits, `DASH` for None and NaN)
    while the column keeps its values, so it still sorts as numbers."""
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return frame.style.format(fmt)


def dataframe(rows: list[dict[str, Any]] | pd.DataFrame, where: Any = st, **kwargs: Any) -> Any:
    """`st.dataframe` (or `where.dataframe`, a column) of `rows` as every table of the dashboard reads: cells as
    `table` shows them, `DASH` for a missing value (the grid draws a missing cell itself, as "None" by default)."""
    return where.dataframe(table(rows), placeholder=DASH, **kwargs)


def hide_flagged(items: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """`items` (samples, SFT-vs-aligned pairs) without those flagged as offensive (`frontend.flagged`), with a toggle
    that shows them again, unless `Settings.dashboard_hide_flagged` is off."""
    from edgerlhf.settings import get_settings

    if not getattr(get_settings(), "dashboard_hide_flagged", True):  # the setting may not exist in every version
        return items
    flagged = sum(flagged_sample(item) for item in items)
    if not flagged:
        return items
    label = f"Show {flagged} hidden prompt{'s' if flagged > 1 else ''} flagged as offensive"
    if st.toggle(label, key=key, help="Red-team prompts of preference data sets can hold slurs; they are hidden on "
                                      "this view by default (setting `EDGERLHF_DASHBOARD_HIDE_FLAGGED`)."):
        return items
    return [item for item in items if not flagged_sample(item)]


def ask_to_cancel(job_id: int, key: str) -> None:
    """The Cancel button was pressed: ask before cancelling (`confirm_cancel` shows the question)."""
    st.session_state[key] = job_id


def confirm_cancel(client, job_id: int, key: str) -> bool:
    """The question `ask_to_cancel` asked about `job_id`, with Yes and No; True once the cancel was sent."""
    if st.session_state.get(key) != job_id:
        return False
    st.warning(f"Cancel job #{job_id}? A queued job is cancelled at once, a running one stops at its next step; what "
               "it finished is kept, and Retry resumes it after its last completed stage.", icon=":material/help:")
    yes, no, _ = st.columns([1, 1, 3])
    if yes.button("Yes, cancel it", key=f"{key}_yes", type="primary", width="stretch"):
        st.session_state.pop(key, None)
        if act(client.cancel_job, job_id):
            st.toast(f"Cancel requested for job #{job_id}: the worker stops within a few seconds.")
            return True
    if no.button("No, keep it", key=f"{key}_no", width="stretch"):
        st.session_state.pop(key, None)
        st.rerun()
    return False


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
