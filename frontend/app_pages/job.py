"""Job page: one job, live. Stage timeline, curves, warnings, samples, log tail, reports.

The job is named in the URL (`/job?job=12`), so a reloaded tab re-attaches to it: the new session pulls
the job's history once from the backend and then, every two seconds, only the rows after its cursors
(`frontend.live`). Everything below the job picker is one fragment that refreshes itself while the job is
queued or running and stops once it has finished.
"""

from __future__ import annotations

import time
from typing import Any

import pandas as pd
import streamlit as st

from frontend import alerts, charts, live, ui
from frontend.api_client import ApiError, BackendDown, get_client
from frontend.reports import eval_headline, eval_pairs, eval_rows, precision_rows

# (Plain comments, not attribute docstrings: Streamlit's "magic" would print a bare string in a page.)
REFRESH_SECONDS = 2.0  # how often the live panel asks for new rows
SYSTEM_TTL = 60.0  # seconds the GPU list (for the memory limit line) is reused before asking /api/system again


def gpu_total_mb(client, job: dict[str, Any] | None) -> tuple[float | None, str | None]:
    """(memory total, name) of the GPU the job runs on; (None, None) without a GPU."""
    cached = st.session_state.get("job_system")
    if cached is None or time.time() - cached[0] > SYSTEM_TTL:
        try:
            cached = (time.time(), client.system())
        except (BackendDown, ApiError):
            cached = (time.time(), {})
        st.session_state["job_system"] = cached
    gpus = cached[1].get("gpus") or []
    device = str(((job or {}).get("config") or {}).get("device") or "auto")
    if not gpus or device == "cpu":
        return None, None
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    gpu = next((g for g in gpus if g.get("index") == index), gpus[0])
    total = gpu.get("memory_total_mb") or gpu.get("total_mb") or gpu.get("memory_total")
    return (float(total) if total else None), gpu.get("name")


def stages_of(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-stage rows (name, status, progress) in the job's stage order; stages not yet begun are pending."""
    raw = job.get("stages") or []
    if isinstance(raw, dict):
        raw = [{"name": k, **(v if isinstance(v, dict) else {"status": v})} for k, v in raw.items()]
    by_name = {(s.get("name") or s.get("stage")): s for s in raw if isinstance(s, dict)}
    planned = ((job.get("config") or {}).get("stages")) or list(by_name)
    out = []
    for name in planned:
        s = by_name.get(name) or {}
        status = s.get("status") or "pending"
        progress = s.get("progress")
        if progress is None:
            progress = 1.0 if status == "succeeded" else 0.0
        out.append({"name": name, "status": status, "progress": float(progress)})
    return out


STAGE_ICON = {"pending": "○", "queued": "○", "running": "▶", "succeeded": "✔", "completed": "✔", "done": "✔",
              "failed": "✖", "cancelled": "■", "skipped": "↷", "interrupted": "↻"}


def header(client, feed: live.JobFeed) -> None:
    job = feed.job or {}
    status = job.get("status", "?")
    left, right = st.columns([4, 2])
    left.subheader(f"{ui.STATUS_ICON.get(status, '')} Job #{job.get('id')} · {job.get('name') or job.get('preset') or ''}")
    facts = [f"status **{status}**", f"preset `{job.get('preset')}`"]
    if job.get("stage"):
        facts.append(f"stage **{job['stage']}**")
    if job.get("queue_position"):
        facts.append(f"queue position **{job['queue_position']}**")
    if ui.duration(job):
        facts.append(f"running for {ui.duration(job)}" if status == "running" else f"took {ui.duration(job)}")
    if (job.get("attempts") or 0) > 1:
        facts.append(f"attempt {job['attempts']}")
    left.markdown(" · ".join(facts))
    with right:
        b1, b2 = st.columns(2)
        if b1.button("Cancel", key="job_cancel", disabled=status not in ("queued", "running"), width="stretch"):
            if ui.act(client.cancel_job, feed.job_id):
                st.toast("Cancel requested: the worker stops within a few seconds.")
        if b2.button("Retry", key="job_retry", disabled=status not in ("failed", "cancelled"), width="stretch"):
            if ui.act(client.retry_job, feed.job_id):
                st.toast("Queued again: it resumes after its last completed stage.")
                st.rerun()
    if job.get("error"):
        lines = str(job["error"]).strip().splitlines()
        st.error(f"**{lines[-1] if lines else 'failed'}**", icon=":material/error:")
        with st.expander("Traceback"):
            st.code(job["error"], language="text")

    cols = st.columns(max(1, len(stages := stages_of(job))))
    for col, s in zip(cols, stages):
        col.progress(min(max(s["progress"], 0.0), 1.0),
                     text=f"{STAGE_ICON.get(s['status'], '?')} {s['name']} · {s['status']}")


def show_alerts(feed: live.JobFeed, gpu_total: float | None) -> None:
    ppo_cfg = ((feed.job or {}).get("config") or {}).get("ppo") or {}
    found = alerts.check_all(feed.all_series(), gpu_total_mb=gpu_total, target_kl=ppo_cfg.get("target_kl"),
                             max_response_length=ppo_cfg.get("response_length"))
    for a in found:
        (st.error if a.level == "error" else st.warning)(a.message, icon=":material/error:" if a.level == "error" else ":material/warning:")


def sample_card(s: dict[str, Any], key: str) -> None:
    with st.container(border=True, key=key):
        reward = s.get("reward")
        meta = [f"{s.get('stage') or '?'} step {s.get('step')}", f"reward **{ui.fmt(reward)}**"]
        if s.get("checkpoint"):
            meta.append(f"checkpoint `{s['checkpoint']}`")
        if s.get("kind") and s.get("kind") != "sample":
            meta.append(s["kind"])
        st.markdown(" · ".join(meta))
        st.caption("Prompt (its end)")
        st.text(ui.tail(s.get("prompt") or "", 300))
        st.caption("Response")
        st.text(s.get("response") or "(empty)")


def overview(feed: live.JobFeed, jid: int) -> None:
    c1, c2 = st.columns(2)
    if feed.series("ppo/reward_mean"):
        c1.plotly_chart(charts.reward_figure(feed), key=f"j{jid}-reward", width="stretch")
        n = len(feed.series("ppo/reward_mean"))
        c1.caption(f"{n} PPO steps · last reward mean {ui.fmt(feed.last('ppo/reward_mean'))}")
    else:
        c1.info("Reward curve: no PPO step yet (PPO runs after SFT and the reward model).")
    if feed.series("ppo/kl"):
        c2.plotly_chart(charts.kl_figure(feed), key=f"j{jid}-kl", width="stretch")
    else:
        c2.info("KL: no PPO step yet.")
    if feed.series("ppo/policy_loss") or feed.series("ppo/value_loss"):
        c3, c4 = st.columns(2)
        c3.plotly_chart(charts.keys_figure(feed, ["ppo/policy_loss"], "Policy loss", "ppo"),
                        key=f"j{jid}-pl", width="stretch")
        c4.plotly_chart(charts.keys_figure(feed, ["ppo/value_loss"], "Value loss", "ppo"),
                        key=f"j{jid}-vl", width="stretch")
        st.plotly_chart(charts.diagnostics_figure(feed), key=f"j{jid}-diag", width="stretch")
    if not feed.series("ppo/reward_mean") and (feed.series("sft/loss") or feed.keys()):
        st.plotly_chart(charts.keys_figure(feed, ["sft/loss", "sft/eval_loss"], "SFT loss", "sft"),
                        key=f"j{jid}-sft-overview", width="stretch")

    st.markdown("#### Latest sample generations")
    recent = [s for s in feed.samples if s.get("kind", "sample") != "probe"][-3:][::-1]
    if not recent:
        st.caption("No samples yet: they arrive every few SFT/PPO steps.")
    for s in recent:
        sample_card(s, key=f"sample-card-{s.get('id', id(s))}")


def training_tab(feed: live.JobFeed, jid: int) -> None:
    c1, c2 = st.columns(2)
    if feed.series("sft/loss") or feed.series("sft/eval_loss"):
        c1.plotly_chart(charts.keys_figure(feed, ["sft/loss", "sft/eval_loss"], "SFT loss", "sft", y="loss"),
                        key=f"j{jid}-sft", width="stretch")
        if feed.series("sft/perplexity"):
            c1.caption(f"Held-out perplexity: {ui.fmt(feed.last('sft/perplexity'))}")
    else:
        c1.info("No SFT metrics yet.")
    if any(k.startswith("reward/") for k in feed.keys()):
        c2.plotly_chart(charts.reward_model_figure(feed), key=f"j{jid}-rm", width="stretch")
    else:
        c2.info("No reward-model metrics yet.")
    st.markdown("#### Precision study")
    reward_report = (feed.report or {}).get("reward")
    rows = precision_rows(reward_report)
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        st.plotly_chart(charts.precision_figure(rows), key=f"j{jid}-precision", width="stretch")
        note = reward_report.get("note") if isinstance(reward_report, dict) else None
        st.caption(note or "Held-out accuracy, memory and throughput per reward-model precision (reward/report.json).")
    else:
        st.caption("Appears when the reward stage has finished.")


def samples_tab(feed: live.JobFeed, jid: int) -> None:
    if not feed.samples:
        st.caption("No samples yet.")
        return
    kinds = sorted({s.get("kind", "sample") for s in feed.samples})
    stages = sorted({s.get("stage") or "" for s in feed.samples})
    f1, f2 = st.columns(2)
    kind = f1.selectbox("Kind", ["all", *kinds], key=f"j{jid}-skind")
    stage = f2.selectbox("Stage", ["all", *stages], key=f"j{jid}-sstage")
    rows = [s for s in feed.samples if (kind == "all" or s.get("kind", "sample") == kind)
            and (stage == "all" or (s.get("stage") or "") == stage)]
    st.dataframe(pd.DataFrame([{"stage": s.get("stage"), "step": s.get("step"), "kind": s.get("kind"),
                                "reward": s.get("reward"), "prompt": ui.tail(s.get("prompt") or "", 200),
                                "response": s.get("response"), "checkpoint": s.get("checkpoint")}
                               for s in rows[::-1]]),
                 hide_index=True, width="stretch", height=420)


def logs_tab(feed: live.JobFeed) -> None:
    if not feed.logs:
        st.caption("No log lines yet.")
        return
    lines = []
    for row in list(feed.logs)[-200:]:
        t = ui.parse_time(live.row_time(row))
        stamp = t.astimezone().strftime("%H:%M:%S") if t else ""
        lines.append(f"{stamp} {str(row.get('level') or '').upper():7} {row.get('message') or row.get('line') or ''}")
    st.code("\n".join(lines), language="text", wrap_lines=True)


def report_tab(feed: live.JobFeed, jid: int) -> None:
    report = (feed.report or {}).get("evaluate")
    if not isinstance(report, dict):
        st.caption("The final report (SFT vs PPO) appears when the evaluate stage has finished.")
    else:
        st.markdown("#### SFT vs PPO")
        head = eval_headline(report)
        cols = st.columns(min(5, max(1, len(head))))
        for i, (k, v) in enumerate(head.items()):
            cols[i % len(cols)].metric(k, ui.fmt(v))
        rows = eval_rows(report)
        left, right = st.columns([3, 2])
        if rows:
            left.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
            left.caption(f"{report.get('n_prompts', '?')} held-out prompts × {report.get('samples_per_prompt', 1)} "
                         "samples; the interval is a bootstrap interval of the per-prompt difference "
                         "(PPO better when it excludes 0).")
            right.plotly_chart(charts.eval_figure(report), key=f"j{jid}-eval", width="stretch")
        for i, pair in enumerate(eval_pairs(report)):
            with st.container(border=True, key=f"eval-pair-{i}"):
                st.caption("Prompt")
                st.text(ui.tail(str(pair.get("prompt", "")), 600))
                cols = st.columns(2)
                for col, who in zip(cols, ("sft", "ppo")):
                    resp = pair.get(f"{who}_response", pair.get(who))
                    extra = f" · gold {ui.fmt(pair[f'{who}_gold'])}" if pair.get(f"{who}_gold") is not None else ""
                    col.markdown(f"**{who.upper()}** · reward {ui.fmt(pair.get(f'{who}_reward'))}{extra}")
                    col.text(resp if isinstance(resp, str) else str(resp))
    others = {k: v for k, v in (feed.report or {}).items() if k != "evaluate"}
    if others:
        with st.expander("Stage reports (JSON)"):
            st.json(others, expanded=False)


st.title("Job")
job_id = ui.pick_job()
if job_id is None:
    st.stop()
client = get_client()
feed = live.feed_for(st.session_state, job_id)


# Refresh only while something can still change; a finished job is drawn once.
live_refresh = feed.job is None or feed.active


def panel() -> None:
    try:
        live.pull(client, feed)
        if live.finished_stages(feed.job) or not feed.active:
            live.refresh_report(client, feed)
        ui.backend_back()
    except BackendDown as exc:
        ui.backend_down(exc, inline=True)
        if feed.job is None:
            return
        st.caption("Showing the history downloaded so far; retrying.")
    except ApiError as exc:
        if exc.status == 404:
            st.error(f"Job #{job_id} does not exist (deleted?).")
        else:
            st.error(f"Backend error {exc.status}: {exc.message}")
        if feed.job is None:
            return
    gpu_total, gpu_name = gpu_total_mb(client, feed.job)
    header(client, feed)
    show_alerts(feed, gpu_total)
    tabs = st.tabs(["Overview", "SFT & reward model", "Memory", "Samples", "Logs", "Report"])
    with tabs[0]:
        overview(feed, job_id)
    with tabs[1]:
        training_tab(feed, job_id)
    with tabs[2]:
        if any(k.startswith("mem/") for k in feed.keys()):
            st.plotly_chart(charts.memory_figure(feed, gpu_total), key=f"j{job_id}-mem", width="stretch")
        st.caption(f"GPU: {gpu_name}, {gpu_total:,.0f} MB total." if gpu_total else
                   "No GPU: this job runs on the CPU; the chart shows the worker's resident memory (RSS).")
    with tabs[3]:
        samples_tab(feed, job_id)
    with tabs[4]:
        logs_tab(feed)
    with tabs[5]:
        report_tab(feed, job_id)
    st.caption(f"{len(feed.metrics)} metric points · {len(feed.samples)} samples · {len(feed.logs)} log lines "
               f"downloaded in {feed.pulls} refreshes ({feed.rows_downloaded} rows)")
    if live_refresh and feed.job is not None and not feed.active:
        st.rerun()  # the job has finished (or was found finished): redraw once, without the timer


st.fragment(run_every=REFRESH_SECONDS if live_refresh else None)(panel)()
