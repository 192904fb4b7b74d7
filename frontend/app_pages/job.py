"""Job page: one job, live. Stage timeline with step counts and time left, the result first once evaluated,
curves, warnings, samples, log tail, reports, config.

The header shows each stage's `step k of N` and time left at its own step rate, the time before a stage's first
step as its own phase (loading / warm-up), and the job's time left (`live.job_clock`). A job that has been evaluated
opens with a verdict card: aligned vs SFT on each measure, with its interval and a plain reading
(`reports.verdict`). The alignment stage's curves and warnings follow the job's algorithm
(`PipelineConfig.algorithm`): reward, KL and diagnostics of PPO, GRPO or RLOO under their own namespace (`grpo/kl`),
DPO's loss, accuracy, margin and KL, KTO's loss, KL estimate and margin; everywhere a person reads the stage it is
named by its algorithm. One Smoothing slider smooths every curve. Samples flagged as offensive are hidden on the
landing views until asked for (`frontend.flagged`).

A finished job with an aligned policy can be continued: *Continue (next round)* opens a small form (what the next
round's reward model trains on, its algorithm) and queues the next round of RLHF from this job's aligned policy
(`POST /api/jobs/{id}/continue`); a job that is part of a chain shows it under its header (round 1 → 2 → 3, each a
link).

The job is named in the URL (`/job?job=12`), so a reloaded tab re-attaches to it: the new session pulls
the job's history once from the backend and then, every two seconds, only the rows after its cursors
(`frontend.live`). Everything below the job picker is one fragment that refreshes itself while the job is
queued or running and stops once it has finished.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

import pandas as pd
import streamlit as st

from edgerlhf.contract import (ALGORITHMS, EXPORT_FORMATS, FINISHED, GGUF_QUANTS, MEMORY_PREFIX, SAMPLED_PREFIX,
                               JobStatus, StageStatus, algorithm_traits)
from edgerlhf.export import human_size
from frontend import charts, live, ui
from frontend.api_client import ApiError, BackendDown, get_client
from frontend.charts import checkpoint_name, stage_name
from frontend.datasets import list_datasets
from frontend.reports import (BETTER, NO_CHANGE, PRECISION_COLUMNS, WORSE, Finding, best_policy_line, eval_headline,
                              eval_pairs, eval_rows, override_rows, precision_rows, verdict)

# (Plain comments, not attribute docstrings: Streamlit's "magic" would print a bare string in a page.)
REFRESH_SECONDS = 2.0  # how often the live panel asks for new rows


STAGE_ICON = {StageStatus.pending: "○", StageStatus.running: "▶", StageStatus.succeeded: "✔",
              StageStatus.failed: "✖", StageStatus.cancelled: "■", StageStatus.interrupted: "↻"}
READING_COLOR = {BETTER: "green", WORSE: "red", NO_CHANGE: "gray"}  # longer / shorter: neither good nor bad
CONFIRM_CANCEL = "job_confirm_cancel"  # session key: the job whose Cancel awaits a yes
VERDICT_EXAMPLES = 2  # SFT-vs-aligned pairs under the verdict; the Samples tab has them all
CONTINUE_OPEN = "job_continue_open"  # session key: the job whose Continue form is open
ROUNDS_TTL = 10.0  # seconds a job's chain of rounds is reused before asking again
REWARD_DATA = {"votes": "Arena votes about this model", "feedback": "Chat feedback about this model",
               "dataset": "A data set", "parent": "This job's data again"}  # `ContinueCreate.reward_data`, in words


def aligned_label(feed: live.JobFeed) -> str:
    """How the aligned policy is called: its algorithm (the reports call it `ppo` whichever trained it)."""
    return stage_name("ppo", feed.algorithm)


def header(client, feed: live.JobFeed, clock: live.JobClock) -> None:
    job = feed.job
    status = JobStatus(job["status"])
    left, right = st.columns([4, 2])
    left.subheader(f"{ui.status_icon(status)} Job #{job['id']} · {job['name']}")
    facts = [f"status **{status.value}**", f"algorithm **{feed.algorithm.upper()}**", f"preset `{job['preset']}`"]
    if job["round"] > 1:
        facts.append(f"round **{job['round']}** (continues job #{job['parent_id']})")
    if job["stage"]:
        facts.append(f"stage **{stage_name(job['stage'], feed.algorithm)}**")
    if job["queue_position"]:
        facts.append(f"queue position **{job['queue_position']}**")
    if job["min_gpu_memory_mb"] is not None:
        facts.append(f"needs a GPU with ≥ {job['min_gpu_memory_mb']:,} MB")
    if job["worker_id"] and status == JobStatus.running:
        facts.append(f"worker `{job['worker_id']}`")
    if ui.duration(job):
        took = ui.duration(job)
        facts.append(f"running for {took}" if status == JobStatus.running else f"took {took}")
    if status == JobStatus.running:
        facts.append(f"time left **{ui.eta_text(clock, feed.algorithm)}**")
    if job["attempts"] > 1:
        facts.append(f"attempt {job['attempts']}")
    left.markdown(" · ".join(facts))
    with right:
        b1, b2 = st.columns(2)
        if b1.button("Cancel", key="job_cancel", disabled=status not in ui.CANCELLABLE, width="stretch"):
            ui.ask_to_cancel(feed.job_id, CONFIRM_CANCEL)
        if b2.button("Retry", key="job_retry", disabled=status not in ui.RETRYABLE, width="stretch"):
            if ui.act(client.retry_job, feed.job_id):
                st.toast("Queued again: it resumes after its last completed stage.")
                st.rerun()
        if st.button("Continue (next round)", key="job_continue", disabled=not continuable(job), width="stretch",
                     icon=":material/replay:",
                     help="The next round of RLHF from this job's aligned policy: a new job whose reward model trains "
                          "on the feedback or votes about this model, and which aligns again from it."):
            st.session_state[CONTINUE_OPEN] = feed.job_id
    if status in ui.CANCELLABLE:
        ui.confirm_cancel(client, feed.job_id, CONFIRM_CANCEL)
    rounds_line(client, feed.job_id)
    if st.session_state.get(CONTINUE_OPEN) == feed.job_id and continuable(job):
        continue_form(client, feed)
    if job["waiting_for"]:  # no live worker could ever take it
        st.warning(f"{job['waiting_for'][0].upper()}{job['waiting_for'][1:]}: start one with "
                   f"`edgerlhf worker --gpu N` on a machine whose GPU has that much memory.",
                   icon=":material/hourglass_empty:")
    if job["error"]:
        lines = str(job["error"]).strip().splitlines()
        st.error(f"**{lines[-1] if lines else 'failed'}**", icon=":material/error:")
        with st.expander("Traceback"):
            st.code(job["error"], language="text")

    stages = job["stages"]  # `StagePublic`, in the job's stage order; not yet begun: pending
    for col, s, c in zip(st.columns(max(1, len(stages))), stages, clock.stages):
        col.progress(min(max(s["progress"], 0.0), 1.0),
                     text=f"{STAGE_ICON[c.status]} {ui.stage_text(c, feed.algorithm)}")


def continuable(job: dict[str, Any]) -> bool:
    """Whether the job can be continued: it has finished and its alignment stage succeeded (an aligned policy)."""
    aligned = any(s["stage"] == "ppo" and s["status"] == StageStatus.succeeded for s in job["stages"])
    return JobStatus(job["status"]) in FINISHED and aligned


def chain_of(client, job_id: int) -> list[dict[str, Any]]:
    """The job's chain of rounds (`client.rounds`), asked again at most every `ROUNDS_TTL` seconds."""
    key = f"j{job_id}-rounds"
    cached = st.session_state.get(key)
    if cached is None or time.time() - cached[0] > ROUNDS_TTL:
        try:
            cached = (time.time(), client.rounds(job_id))
        except (ApiError, BackendDown):
            return cached[1] if cached else []
        st.session_state[key] = cached
    return cached[1]


def rounds_line(client, job_id: int) -> None:
    """The chain of rounds this job belongs to, round 1 → 2 → 3, each job a link (this one in bold); nothing for a
    job nobody continued and that continues nothing."""
    chain = chain_of(client, job_id)
    if len(chain) < 2:
        return
    by_round: dict[int, list[str]] = {}
    for j in chain:
        name = f"#{j['id']} {j['name']}".replace("[", "(").replace("]", ")")
        shown = f"**{name}** (this job)" if j["id"] == job_id else f"[{name}](/job?job={j['id']})"
        by_round.setdefault(j["round"], []).append(f"{ui.status_icon(JobStatus(j['status']))} {shown}")
    shown_rounds = " → ".join(f"round {n}: {' / '.join(jobs)}" for n, jobs in sorted(by_round.items()))
    st.markdown(f"Rounds of RLHF: {shown_rounds}",
                help="Each round starts from the aligned policy of the round before (its SFT policy) and aligns "
                     "again; the Compare page plots a gold or reward across the rounds.")


def continue_form(client, feed: live.JobFeed) -> None:
    """The next round's choices: what its reward model trains on, its algorithm and name; queues it and opens it."""
    job, jid = feed.job, feed.job_id
    n = job["round"] + 1
    with st.container(border=True, key="continue-form"):
        st.markdown(f"#### Round {n}: continue from this job's aligned policy")
        st.caption("A new job with this job's settings. Its SFT policy is this job's aligned policy (merged, as an "
                   "export merges it; SFT trains nothing), its reward model trains on the data below, and it aligns "
                   "again; its evaluation compares it with this job's policy.")
        data = st.radio("Reward model trains on", list(REWARD_DATA), format_func=REWARD_DATA.get, horizontal=True,
                        key=f"j{jid}-next-data",
                        help=f"Votes and feedback are those about this job's aligned model (job-{jid}/ppo), taken "
                             "now: later ones do not change the new job. A data set: any from the Data sets page.")
        dataset, weight = None, 1.0
        if data == "votes" and st.checkbox("Mix with this job's own data", key=f"j{jid}-next-mix"):
            weight = st.slider("Votes' share of the training pairs", 0.05, 0.95, 0.5, 0.05, key=f"j{jid}-next-weight",
                               help="Each vote pair is repeated to reach this share; the rest are this job's pairs.")
        elif data == "dataset":
            sets = ui.call(list_datasets, client) or []
            if not sets:
                st.info("No data set yet: upload one on the Data sets page, or snapshot feedback there.")
            dataset = st.selectbox("Data set", [d["id"] for d in sets], key=f"j{jid}-next-dataset",
                                   format_func=lambda i: next(f"#{d['id']} {d['name']} ({d['kind']})"
                                                              for d in sets if d["id"] == i))
        left, right = st.columns(2)
        algorithm = left.selectbox("Algorithm", ALGORITHMS, index=ALGORITHMS.index(feed.algorithm),
                                   format_func=lambda a: algorithm_traits(a).label, key=f"j{jid}-next-algorithm")
        name = right.text_input("Name", key=f"j{jid}-next-name", max_chars=200,
                                placeholder=f"{job['name']} · round {n}")
        start, close = st.columns([1, 4])
        if start.button(f"Start round {n}", type="primary", key=f"j{jid}-next-start",
                        disabled=data == "dataset" and dataset is None):
            made = ui.call(client.continue_job, jid, reward_data=data, dataset=dataset, votes_weight=weight,
                           algorithm=algorithm, name=name.strip() or None)
            if made:
                st.session_state.pop(CONTINUE_OPEN, None)
                st.switch_page(ui.JOB_PAGE, query_params={"job": str(made["id"])})
        if close.button("Close", key=f"j{jid}-next-close"):
            st.session_state.pop(CONTINUE_OPEN, None)
            st.rerun()


def sample_card(s: dict[str, Any], algorithm: str, key: str) -> None:
    with st.container(border=True, key=key):
        meta = [f"{stage_name(s['stage'], algorithm)} step {s['step']}", f"reward **{ui.fmt(s['reward'])}**"]
        meta += [f"{name} {ui.fmt(value)}" for name, value in (s.get("parts") or {}).items()]  # stated rewards
        if s["checkpoint"]:
            meta.append(f"checkpoint `{checkpoint_name(s['checkpoint'], algorithm)}`")
        if s["kind"] != "sample":
            meta.append(s["kind"])
        st.markdown(" · ".join(meta))
        st.caption("Prompt (its end)")
        st.text(ui.clean_text(ui.tail(s["prompt"], 300)))
        st.caption("Response")
        st.text(ui.clean_text(s["response"]) or "(empty)")


def pair_card(pair: dict[str, Any], aligned: str, key: str) -> None:
    """One held-out prompt with the SFT and the aligned answer side by side (`reports.eval_pairs`)."""
    with st.container(border=True, key=key):
        st.caption("Prompt (its end)")
        st.text(ui.clean_text(ui.tail(pair["prompt"], 600)))
        for col, who, name in zip(st.columns(2), ("sft", "ppo"), ("SFT", aligned)):
            col.markdown(f"**{name}** · {answer_facts(pair[f'{who}_reward'], pair[f'{who}_gold'])}")
            answer = ui.clean_text(pair[who])
            col.text(answer)
            if not answer:
                col.caption("(empty answer)")


def sampling_curves(feed: live.JobFeed, jid: int, smoothing: float) -> bool:
    """PPO's, GRPO's or RLOO's curves, in the job's algorithm's namespace; True once a step has been logged."""
    name, reward = feed.algorithm.upper(), feed.key("reward_mean")
    c1, c2 = st.columns(2)
    if feed.series(reward):
        c1.plotly_chart(charts.reward_figure(feed, smoothing=smoothing), key=f"j{jid}-reward", width="stretch")
        c1.caption(f"{len(feed.series(reward))} {name} steps · last reward mean {ui.fmt(feed.last(reward))}")
    else:
        c1.info(f"Reward curve: no {name} step yet ({name} runs after SFT and the reward model).")
    if feed.series(feed.key("kl")):
        c2.plotly_chart(charts.kl_figure(feed, smoothing=smoothing), key=f"j{jid}-kl", width="stretch")
    else:
        c2.info(f"KL: no {name} step yet.")
    if charts.independent_signals(feed):  # reward.validation, or the known-answer gold: README "Seeing reward hacking"
        st.plotly_chart(charts.proxy_figure(feed, smoothing=smoothing), key=f"j{jid}-proxy", width="stretch")
        validation = feed.report.reward.validation if feed.report is not None and feed.report.reward else None
        st.caption("Rising together: the policy improves. The proxy climbing alone: it exploits the reward model."
                   + (f" Validation reward model: held-out accuracy {ui.fmt(validation.accuracy)} "
                      f"({validation.train_pairs} pairs the main one never saw)." if validation else ""))
    if charts.reward_terms(feed):  # stated rewards (`ppo.rewards`): which term of the sum moved
        st.plotly_chart(charts.reward_terms_figure(feed, smoothing=smoothing), key=f"j{jid}-terms", width="stretch")
    losses = [key for key in (feed.key("policy_loss"), feed.key("value_loss")) if feed.series(key)]
    if losses:
        for col, key in zip(st.columns(len(losses)), losses):
            title = "Policy loss" if key.endswith("policy_loss") else "Value loss"  # only PPO has a value head
            col.plotly_chart(charts.keys_figure(feed, [key], title, "ppo", smoothing=smoothing),
                             key=f"j{jid}-{key}", width="stretch")
        st.plotly_chart(charts.diagnostics_figure(feed, smoothing=smoothing), key=f"j{jid}-diag", width="stretch")
    return bool(feed.series(reward))


def offline_curves(feed: live.JobFeed, jid: int, smoothing: float) -> bool:
    """The curves of an algorithm that trains offline (DPO, KTO: `charts.offline_figure`): its loss, accuracy or KL
    estimate, margin and implicit rewards, and its KL; True once a step has been logged."""
    name = aligned_label(feed)
    if not feed.series(feed.key("loss")):
        st.info(f"{name}: no step yet ({name} runs after SFT, {charts.OFFLINE_DATA[feed.algorithm]}).")
        return False
    st.plotly_chart(charts.offline_figure(feed, smoothing=smoothing), key=f"j{jid}-{feed.algorithm}",
                    width="stretch")
    c1, c2 = st.columns(2)
    second = "accuracy" if feed.series(feed.key("accuracy")) else "margin"
    c1.caption(f"{len(feed.series(feed.key('loss')))} {name} steps · last loss {ui.fmt(feed.last(feed.key('loss')))} "
               f"· last {second} {ui.fmt(feed.last(feed.key(second)))}")
    if feed.series(feed.key("kl")):
        c2.plotly_chart(charts.kl_figure(feed, smoothing=smoothing), key=f"j{jid}-kl", width="stretch")
    return True


def finding_cell(col, f: Finding, aligned: str, confidence: float) -> None:
    """One measure of the verdict: its change with the interval and reading, the two means, the unit in words."""
    color = READING_COLOR.get(f.reading)
    col.markdown(f"**{f.measure[0].upper()}{f.measure[1:]}** · " + (f":{color}[{f.reading}]" if color else f.reading))
    shown = ui.fmt if f.null else ui.signed  # the judge's share is a value, the others a difference
    bounds = (f"{confidence:.0%} interval {shown(f.change.low)} to {shown(f.change.high)}"
              if f.change.low is not None and f.change.high is not None else "no interval")
    col.markdown(f"**{shown(f.change.mean)}** ({bounds})")
    if f.sft is not None or f.aligned is not None:
        col.markdown(f"SFT {ui.fmt(f.sft)} → {aligned} {ui.fmt(f.aligned)}")
    col.caption(f.unit)


def verdict_card(feed: live.JobFeed, jid: int) -> None:
    """The answer to "did alignment help?": each measure of the evaluate report read plainly, KL, length change,
    and a few of the held-out answers side by side."""
    v = verdict(feed.report.evaluate)
    aligned = aligned_label(feed)
    with st.container(border=True, key="verdict"):
        st.markdown(f"#### Result: {aligned} vs SFT")
        cells = [*v.findings, *([v.length] if v.length is not None else [])]
        cols = st.columns(len(cells) + 1)
        for col, f in zip(cols, cells):
            finding_cell(col, f, aligned, v.confidence)
        kl = cols[-1]
        kl.markdown("**KL from SFT**")
        kl.markdown(f"**{ui.fmt(v.kl)}**")
        kl.caption("nats per answer: how far the aligned policy moved from SFT (0: not at all)")
        answers = f"{v.samples_per_prompt} answer{'s' if v.samples_per_prompt != 1 else ''}"
        st.caption(f"{v.n_prompts} held-out prompts × {answers} from each policy. A reading is "
                   f"significant when the {v.confidence:.0%} bootstrap interval of the per-prompt difference excludes "
                   "no change. Every number is on the Report tab; every answer pair on the Samples tab.")
        pairs = ui.hide_flagged(eval_pairs(feed.report.evaluate), key=f"j{jid}-verdict-flagged")
        for i, pair in enumerate(pairs[:VERDICT_EXAMPLES]):
            pair_card(pair, aligned, key=f"verdict-pair-{i}")


def loading_notice(clock: live.JobClock, algorithm: str) -> None:
    """The phase before a stage's first step (loading the model, warm-up) as its own step, with its time so far,
    rather than an empty chart."""
    for c in clock.stages:
        if c.phase == "loading":
            st.info(f"**{stage_name(c.stage, algorithm)}: loading / warm-up… {ui.seconds_text(c.elapsed_s)}**. The "
                    "model is loading and the first step has not finished yet; the stage's curves and its time left "
                    "start with its steps.", icon=":material/hourglass_top:")


def overview(feed: live.JobFeed, jid: int, smoothing: float, clock: live.JobClock) -> None:
    if feed.report is not None and feed.report.evaluate is not None:
        verdict_card(feed, jid)
    loading_notice(clock, feed.algorithm)
    samples = algorithm_traits(feed.algorithm).samples
    aligned = sampling_curves(feed, jid, smoothing) if samples else offline_curves(feed, jid, smoothing)
    if not aligned and feed.series("sft/loss"):
        st.plotly_chart(charts.keys_figure(feed, ["sft/loss", "sft/eval_loss"], "SFT loss", "sft",
                                           smoothing=smoothing), key=f"j{jid}-sft-overview", width="stretch")

    st.markdown("#### Latest sample generations")
    shown = ui.hide_flagged([s for s in feed.samples if s["kind"] != "probe"], key=f"j{jid}-latest-flagged")
    recent = shown[-3:][::-1]
    if not recent:
        st.caption(f"No samples yet: they arrive every few SFT/{aligned_label(feed)} steps.")
    for s in recent:
        sample_card(s, feed.algorithm, key=f"sample-card-{s['id']}")


def training_tab(feed: live.JobFeed, jid: int, smoothing: float) -> None:
    votes = feed.report.data.votes if feed.report is not None and feed.report.data is not None else None
    if votes is not None:  # the feedback that shaped this run (edgerlhf.votes)
        shown = ", ".join(f"#{i}" for i in votes.vote_ids[:30]) + (" …" if len(votes.vote_ids) > 30 else "")
        st.info(f"Trained on **{votes.votes_used} arena vote(s)** ({shown}): {votes.train_pairs} training and "
                f"{votes.test_pairs} held-out pair(s), {votes.share:.0%} of the training pairs"
                + (" (the votes alone)." if not votes.with_data_set else " (mixed with the data set)."),
                icon=":material/how_to_vote:")
    c1, c2 = st.columns(2)
    if feed.series("sft/loss") or feed.series("sft/eval_loss"):
        c1.plotly_chart(charts.keys_figure(feed, ["sft/loss", "sft/eval_loss"], "SFT loss", "sft", y="loss",
                                           smoothing=smoothing), key=f"j{jid}-sft", width="stretch")
        if feed.series("sft/perplexity"):
            c1.caption(f"Held-out perplexity: {ui.fmt(feed.last('sft/perplexity'))}")
    else:
        c1.info("No SFT metrics yet.")
    if any(k.startswith("reward/") for k in feed.keys()):
        c2.plotly_chart(charts.reward_model_figure(feed, smoothing=smoothing), key=f"j{jid}-rm", width="stretch")
    else:
        c2.info("No reward-model metrics yet.")
    st.markdown("#### Precision study")
    reward_report = feed.report.reward if feed.report is not None else None
    if reward_report is not None:
        rows = precision_rows(reward_report)
        others = {column: None for column in rows[0] if column not in PRECISION_COLUMNS} if rows else {}
        ui.dataframe(rows, hide_index=True, width="stretch", column_config=others)  # the rest: the table's toolbar
        st.plotly_chart(charts.precision_figure(rows), key=f"j{jid}-precision", width="stretch")
        st.caption(reward_report.note or "Held-out accuracy, memory and throughput per reward-model precision.")
    else:
        st.caption("Appears when the reward stage has finished.")


SAMPLE_COLUMNS = {
    "stage": st.column_config.TextColumn("stage", width=70),
    "step": st.column_config.Column("step", width=50),
    "kind": st.column_config.TextColumn("kind", width=60),
    "reward": st.column_config.Column("reward", width=60),
    "prompt": st.column_config.TextColumn("prompt (its end)", width=230),
    "response": st.column_config.TextColumn("response", width=380),
    "checkpoint": st.column_config.TextColumn("checkpoint", width=90),
}  # 940 px: the table fits beside the sidebar in a 1,400 px window; a cell's whole text shows when it is clicked


def samples_tab(feed: live.JobFeed, jid: int) -> None:
    """The held-out prompts with the SFT and the aligned answer side by side first (the evaluate report's pairs),
    then every sample logged, filterable."""
    aligned = aligned_label(feed)
    report = feed.report.evaluate if feed.report is not None else None
    if report is not None:
        st.markdown(f"#### SFT vs {aligned} on the same held-out prompts")
        for i, pair in enumerate(ui.hide_flagged(eval_pairs(report), key=f"j{jid}-pairs-flagged")):
            pair_card(pair, aligned, key=f"eval-pair-{i}")
        st.markdown("#### Every sample")
    if not feed.samples:
        st.caption("No samples yet.")
        return
    samples = ui.hide_flagged(feed.samples, key=f"j{jid}-samples-flagged")
    kinds = sorted({s["kind"] for s in samples})
    stages = sorted({s["stage"] for s in samples})
    f1, f2 = st.columns(2)
    kind = f1.selectbox("Kind", ["all", *kinds], key=f"j{jid}-skind")
    stage = f2.selectbox("Stage", ["all", *stages], key=f"j{jid}-sstage",
                         format_func=lambda s: s if s == "all" else stage_name(s, feed.algorithm))
    rows = [s for s in samples if (kind == "all" or s["kind"] == kind) and (stage == "all" or s["stage"] == stage)]
    table = [{"stage": stage_name(s["stage"], feed.algorithm), "step": s["step"], "kind": s["kind"],
              "reward": s["reward"], "prompt": ui.tail(" ".join(ui.clean_text(s["prompt"]).split()), 160),
              "response": ui.head(ui.clean_text(s["response"]), 300),
              "checkpoint": checkpoint_name(s["checkpoint"], feed.algorithm) if s["checkpoint"] else None}
             for s in rows[::-1]]
    ui.dataframe(table, hide_index=True, width="stretch", height=420, column_config=SAMPLE_COLUMNS,
                 key=f"j{jid}-samples")


def logs_tab(feed: live.JobFeed) -> None:
    if not feed.logs:
        st.caption("No log lines yet.")
        return
    lines = []
    for row in list(feed.logs)[-200:]:
        stamp = ui.parse_time(row["time"]).astimezone().strftime("%H:%M:%S")
        lines.append(f"{stamp} {row['level'].upper():7} {row['message']}")
    st.code("\n".join(lines), language="text", wrap_lines=True)


def report_tab(feed: live.JobFeed, jid: int) -> None:
    report = feed.report.evaluate if feed.report is not None else None
    aligned = aligned_label(feed)  # the report calls the aligned side `ppo` whichever algorithm trained it
    if report is None:
        st.caption(f"The final report (SFT vs {aligned}) appears when the evaluate stage has finished.")
    else:
        st.markdown(f"#### SFT vs {aligned}")
        named = {"PPO": aligned, "PPO − SFT": f"{aligned} − SFT"}
        head = {k.replace("PPO", aligned): v for k, v in eval_headline(report).items()}
        cols = st.columns(min(5, max(1, len(head))))
        for i, (k, v) in enumerate(head.items()):
            cols[i % len(cols)].metric(k, ui.fmt(v))
        left, right = st.columns([3, 2])
        ui.dataframe(pd.DataFrame(eval_rows(report)).rename(columns=named), left, hide_index=True, width="stretch")
        left.caption(f"{report.n_prompts} held-out prompts × {report.samples_per_prompt} "
                     "samples; the interval is a bootstrap interval of the per-prompt difference "
                     f"({aligned} better when it excludes 0). The gold at equal length compares the policies within "
                     "strata of equal response length, so a gain there is content, not length; the last rows "
                     "are shares of responses. The answers side by side are on the Samples tab.")
        right.plotly_chart(charts.eval_figure(report), key=f"j{jid}-eval", width="stretch")
    if feed.report is not None and feed.report.ppo is not None:
        if best := best_policy_line(feed.report.ppo):
            st.caption(f"{aligned}: {best} (`ppo.keep_best`); evaluation, chat and export use that policy.")
        export_section(jid)
    others = {stage_name(stage, feed.algorithm): r.model_dump(mode="json") for stage, r in feed.report
              if r is not None and stage != "evaluate"} if feed.report is not None else {}
    if others:
        with st.expander("Stage reports (JSON)"):
            st.json(others, expanded=False)


def answer_facts(reward: float | None, gold: float | None) -> str:
    """`reward 0.31 · gold -2` of a held-out answer: what the run measured of it."""
    facts = [f"reward {ui.fmt(reward)}"] if reward is not None else []
    facts += [f"gold {ui.fmt(gold)}"] if gold is not None else []
    return " · ".join(facts) or "no reward model"


PRESETS_TTL = 300.0  # seconds the presets (for the Config tab's "what differs") are reused


def presets(client) -> dict[str, dict[str, Any]] | None:
    """The backend's presets by name (`client.presets()`), fetched once in a while; None when it cannot answer."""
    cached = st.session_state.get("job_presets")
    if cached is None or time.time() - cached[0] > PRESETS_TTL:
        try:
            cached = (time.time(), client.presets())
        except (ApiError, BackendDown):
            return cached[1] if cached else None
        st.session_state["job_presets"] = cached
    return cached[1]


def config_tab(client, job: dict[str, Any], jid: int) -> None:
    """The job's resolved configuration, what in it differs from its preset, and a clone into the New-job form."""
    config, preset_name = job["config"], job["preset"]
    preset = (presets(client) or {}).get(preset_name)
    left, right = st.columns([3, 1])
    left.markdown(f"#### What differs from the preset `{preset_name}`")
    if right.button("Clone into New job", key=f"j{jid}-clone", icon=":material/content_copy:", width="stretch",
                    help="Open the New job form filled in with this job's preset and changes, to run it again or "
                         "vary it"):
        st.switch_page(ui.NEW_JOB_PAGE, query_params={"clone": str(jid)})
    if preset is None:
        st.caption(f"The preset `{preset_name}` is not on this backend (any more): the whole configuration is below.")
    elif rows := override_rows(config, preset["config"]):
        ui.dataframe(rows, hide_index=True, key=f"j{jid}-overrides", column_config={
            "field": st.column_config.TextColumn("field", width=260),
            "this job": st.column_config.TextColumn("this job", width=340),
            "preset": st.column_config.TextColumn("preset", width=340)})
    else:
        st.caption("Nothing: the job runs the preset as it is.")
    st.markdown("#### Resolved configuration")
    st.caption("Every field the job ran with (`PipelineConfig`), from which it can be reproduced.")
    st.json(config, expanded=1)


DOWNLOAD_LIMIT = 200 * 1024 * 1024
"""Larger exports are fetched with the API (the dashboard would hold the whole .tar in memory)."""


EXPORT_FORMAT_LABELS = {"hf": "Hugging Face directory", "gguf": "GGUF + Ollama Modelfile"}


def export_section(jid: int) -> None:
    """Export the aligned policy as one Hugging Face model directory or one GGUF file, and download it."""
    st.markdown("#### Export the aligned model")
    key = f"export-{jid}"
    client = get_client()
    left, right = st.columns([3, 2])
    fmt = left.radio("Format", EXPORT_FORMATS, format_func=EXPORT_FORMAT_LABELS.get, horizontal=True,
                     key=f"{key}-format",
                     help="Hugging Face: one directory that `AutoModelForCausalLM.from_pretrained` loads anywhere. "
                          "GGUF: one file for llama.cpp, Ollama and LM Studio, with an Ollama Modelfile (chat "
                          "template, stop strings, this job's sampling settings) and the commands that run it.")
    quant = right.selectbox("GGUF weights", GGUF_QUANTS, key=f"{key}-quant", disabled=fmt != "gguf",
                            help="f16: 2 bytes a weight, as trained; q8_0: about half of that, nearly as good.")
    try:
        need = client.export_estimate(jid, fmt, quant)
    except (ApiError, BackendDown):  # the estimate is a hint: the export itself reports what went wrong
        need = None
    if need:
        st.caption(f"Needs about {human_size(need['disk_bytes'])} of disk and {human_size(need['ram_bytes'])} of "
                   f"memory on the server ({need['parameters']:,} weights; an estimate).")
    if st.button("Export model", key=f"{key}-button",
                 help="Merge the aligned policy's adapter into the SFT model and write it in the chosen format, "
                      "with the tokenizer and chat template."):
        with st.spinner("Merging the policy…"):
            st.session_state[key] = ui.call(client.export_job, jid, fmt, quant)
    exported = st.session_state.get(key)
    if not exported:
        return
    st.success(f"Exported to `{exported['path']}` ({human_size(exported['bytes'])} on disk, "
               f"{len(exported['files'])} files).")
    st.code(f"curl -H 'Authorization: Bearer $EDGERLHF_API_TOKEN' -o job-{jid}.tar "
            f"'{client.base_url}{exported['download']}'", language="bash")
    if exported["bytes"] <= DOWNLOAD_LIMIT:
        done_fmt, done_quant = exported["format"], exported["quant"] or quant
        st.download_button("Download .tar", data=lambda: client.export_tar(jid, done_fmt, done_quant),
                           file_name=f"job-{jid}.tar", mime="application/x-tar", key=f"{key}-download")


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
    gpu_total, gpu_name = ui.gpu_total_mb(client, feed.job)
    clock = live.job_clock(feed.job, datetime.now(timezone.utc))
    header(client, feed, clock)
    ui.show_alerts(feed.job, feed.all_series(), gpu_total)
    _, slider = st.columns([4, 1])
    smoothing = slider.slider("Smoothing", 0.0, 0.99, 0.0, 0.01, key=f"j{job_id}-smoothing",
                              help="Smooth every curve with an exponential moving average of this weight (as W&B's "
                                   "slider): 0 draws the raw points, near 1 the smoothest; the raw curve stays faint "
                                   "under the smoothed one.")
    tabs = st.tabs(["Overview", "SFT & reward model", "Memory", "Samples", "Logs", "Report", "Config"])
    with tabs[0]:
        overview(feed, job_id, smoothing, clock)
    with tabs[1]:
        training_tab(feed, job_id, smoothing)
    with tabs[2]:
        if any(k.startswith((MEMORY_PREFIX, SAMPLED_PREFIX)) for k in feed.keys()):
            st.plotly_chart(charts.memory_figure(feed, gpu_total, smoothing=smoothing), key=f"j{job_id}-mem",
                            width="stretch")
        st.caption(f"GPU: {gpu_name}, {gpu_total:,.0f} MB total." if gpu_total else
                   "No GPU: this job runs on the CPU; the chart shows the worker's resident memory (RSS).")
    with tabs[3]:
        samples_tab(feed, job_id)
    with tabs[4]:
        logs_tab(feed)
    with tabs[5]:
        report_tab(feed, job_id)
    with tabs[6]:
        config_tab(client, feed.job, job_id)
    st.caption(f"{len(feed.metrics)} metric points · {len(feed.samples)} samples · {len(feed.logs)} log lines "
               f"downloaded in {feed.pulls} refreshes ({feed.rows_downloaded} rows)")
    if live_refresh and feed.job is not None and not feed.active:
        st.rerun()  # the job has finished (or was found finished): redraw once, without the timer


st.fragment(run_every=REFRESH_SECONDS if live_refresh else None)(panel)()
