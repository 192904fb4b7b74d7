"""Compare page: runs of any alignment algorithm side by side.

- Curves overlaid on a common x-axis, steps or samples seen (`charts.X_AXES`); an alignment metric is
  matched by name across algorithms (`reward_mean` is `ppo/reward_mean` of a PPO job and `grpo/reward_mean`
  of a GRPO job: `JobFeed.key`); a smoothing slider draws each curve's moving average over its faint raw
  series (`charts.ema`, as W&B's).
- The reward-vs-KL frontier: each sampling run's training trajectory and each finished run's held-out
  point, so DPO and KTO appear too (`charts.frontier_figure`).
- One row per run: algorithm, rewards, gold gain, KL, length, peak memory, time per step (`reports.run_row`),
  then the final reports and the precision study.
- The dashboard's warnings per run (`frontend.alerts`), and the same held-out prompts answered by each run.
- A chain of rounds of RLHF (a job continued from another's aligned policy, round 1 → 2 → 3): a gold or reward across
  its rounds, each round's start and end and its gain with the interval (`charts.rounds_figure`).

Each job's metrics come through the same cursor feeds as the job page (`frontend.live`), so comparing
running jobs keeps downloading only their new points.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from edgerlhf.contract import FINISHED, JobStatus, algorithm_traits
from edgerlhf.reports import EvalReport
from frontend import charts, live, ui
from frontend.api_client import ApiError, BackendDown, get_client
from frontend.reports import eval_headline, precision_rows, run_row, side_by_side

DEFAULT_NAMES = ["reward_mean", "kl", "response_length", "loss", "sft/eval_loss"]
"""Curves shown first: alignment metrics by name (each job's algorithm's), then full keys."""
SHOWN_PROMPTS = 4  # held-out prompts answered side by side


def metric_label(name: str) -> str:
    """An alignment metric by name reads as `<algorithm>/reward_mean`; a full key as it is."""
    return name if "/" in name else f"<algorithm>/{name}"


def curves(feeds: dict[str, live.JobFeed]) -> None:
    names = sorted({n for feed in feeds.values() for n in feed.names()}, key=lambda n: ("/" in n, n))
    if not names:
        st.info("The chosen jobs have no metrics yet.")
        return
    left, right, smooth = st.columns([3, 1, 1])
    picked = left.multiselect("Metrics", names, default=[n for n in DEFAULT_NAMES if n in names] or names[:2],
                              format_func=metric_label, key="compare_keys",
                              help="An alignment metric without a namespace (reward_mean, kl …) is each job's own "
                                   "algorithm's: a PPO job's ppo/reward_mean overlays a GRPO job's grpo/reward_mean.")
    x = right.radio("x-axis", list(charts.X_AXES), format_func=charts.X_AXES.get, key="compare_x", horizontal=True,
                    help="Samples seen = step × what a step consumed, from each job's config: its rollout batch "
                         "(ppo.batch_size responses) for PPO, GRPO and RLOO; dpo.batch_size × dpo.grad_accum preference "
                         "pairs for DPO; kto.batch_size × kto.grad_accum labelled answers for KTO; the batch × "
                         "accumulation of SFT, warm-up and the reward model.")
    smoothing = smooth.slider("Smoothing", 0.0, 0.99, 0.0, 0.01, key="compare_smoothing",
                              help="Weight of an exponential moving average, as W&B's slider: 0 draws the raw "
                                   "curves; the higher, the smoother. The raw curve stays faint under the smoothed "
                                   "one.")
    cols = st.columns(2)
    for i, name in enumerate(picked):
        cols[i % 2].plotly_chart(charts.compare_figure(feeds, name, x, smoothing=smoothing), key=f"cmp-{name}",
                                 width="stretch")


def frontier(feeds: dict[str, live.JobFeed]) -> None:
    st.markdown("#### Reward vs KL")
    fig = charts.frontier_figure(feeds)
    if not fig.data:
        st.caption("No reward and KL yet: the frontier fills as the runs train and evaluate.")
        return
    st.plotly_chart(fig, key="cmp-frontier", width="stretch")
    st.caption("Up and to the left is better: more reward for less distance from the SFT policy. Lines: the "
               "training batches, step by step; ★: the aligned policy on held-out prompts (evaluate), joined to its "
               "SFT policy at KL 0. DPO and KTO train without sampling, so they show by their held-out point only.")


def runs_table(feeds: dict[str, live.JobFeed]) -> None:
    st.markdown("#### Runs")
    with st.container(key="cmp-runs"):  # a plain table: a few rows, readable in any screenshot
        st.table(pd.DataFrame([run_row(label, feed) for label, feed in feeds.items()]), hide_index=True)
    st.caption("Training reward: the mean of the last steps (DPO and KTO sample nothing while they train). Held-out: "
               "the aligned policy on the evaluate stage's prompts; gains are over the run's own SFT policy, gold "
               "gain on the known-answer task only. Peak memory and time per step are the alignment stage's.")

    reports = {label: feed.report for label, feed in feeds.items() if feed.report is not None}
    st.markdown("#### Final reports (SFT vs the aligned policy: PPO, GRPO, RLOO, DPO or KTO)")
    # The report calls the aligned side `ppo` whatever trained it: "aligned" is each run's own algorithm's policy.
    rows = [{"job": label, "algorithm": algorithm_traits(r.evaluate.algorithm).label,
             **{k.replace("PPO", "aligned"): v for k, v in eval_headline(r.evaluate).items()}}
            for label, r in reports.items() if r.evaluate is not None]
    if rows:
        st.dataframe(pd.DataFrame(rows), hide_index=True, width="stretch")
        st.caption("\"aligned\" is each run's policy after its algorithm (the algorithm column), against its own SFT "
                   "policy.")
    else:
        st.caption("None of the chosen jobs has finished its evaluate stage.")

    st.markdown("#### Reward-model precision study")
    study = [{"job": label, **row} for label, r in reports.items() for row in precision_rows(r.reward)]
    if study:
        st.dataframe(pd.DataFrame(study), hide_index=True, width="stretch")
    else:
        st.caption("None of the chosen jobs has finished its reward stage.")


def warnings(feeds: dict[str, live.JobFeed]) -> None:
    st.markdown("#### Warnings")
    quiet = []
    for label, feed in feeds.items():
        if feed.job is None:
            continue
        gpu_total, _ = ui.gpu_total_mb(client, feed.job)
        with st.container(key=f"cmp-alerts-{feed.job_id}"):
            if not ui.show_alerts(feed.job, feed.all_series(), gpu_total, title=f"**{label}** ({feed.algorithm})"):
                quiet.append(label)
    if quiet:
        st.caption(f"No warning for {', '.join(quiet)}.")


def held_out_answers(feeds: dict[str, live.JobFeed]) -> None:
    st.markdown("#### The same held-out prompts, answered by each run")
    evals = {label: feed.report.evaluate for label, feed in feeds.items() if feed.report is not None}
    rows = side_by_side({label: ev for label, ev in evals.items() if ev is not None})
    if not rows:
        st.caption("Appears when the chosen jobs have finished their evaluate stage.")
        return
    for i, row in enumerate(rows[:SHOWN_PROMPTS]):
        with st.container(border=True, key=f"cmp-prompt-{i}"):
            st.caption("Prompt")
            st.text(ui.tail(row["prompt"], 500))
            for col, (label, pair) in zip(st.columns(len(row["answers"])), row["answers"].items()):
                col.markdown(f"**{label}** ({feeds[label].algorithm})")
                if pair is None:
                    col.caption("not among this run's shown samples")
                    continue
                facts = [f"reward {ui.fmt(pair['ppo_reward'])}"] if pair["ppo_reward"] is not None else []
                facts += [f"gold {ui.fmt(pair['ppo_gold'])}"] if pair["ppo_gold"] is not None else []
                col.caption(" · ".join(facts) or "no reward model")
                col.text(pair["ppo"] or "(empty)")
    shared = sum(all(a is not None for a in row["answers"].values()) for row in rows)
    st.caption(f"{shared} prompt(s) shown by every run (same data and seed give the same held-out split); each "
               "run's evaluate report shows `evaluate.n_show` of its prompts.")


def evaluated(job: dict, feeds: dict[str, live.JobFeed]) -> EvalReport | None:
    """A job's evaluate report: from its feed when it is one of the chosen jobs, else asked for (a finished job's once
    per session: it no longer changes)."""
    feed = next((f for f in feeds.values() if f.job_id == job["id"]), None)
    if feed is not None:
        return feed.report.evaluate if feed.report is not None else None
    cache = st.session_state.setdefault("compare_round_reports", {})
    if job["id"] in cache:
        return cache[job["id"]]
    try:
        report = client.report(job["id"]).evaluate
    except (ApiError, BackendDown):
        return None
    if JobStatus(job["status"]) in FINISHED:
        cache[job["id"]] = report
    return report


def rounds(chosen_ids: list[int], feeds: dict[str, live.JobFeed]) -> None:
    """A gold or reward across the rounds of a chain that a chosen job belongs to."""
    st.markdown("#### Rounds of RLHF")
    chains: dict[tuple[int, ...], list[dict]] = {}
    for jid in chosen_ids:
        try:
            items = client.rounds(jid)
        except (ApiError, BackendDown):
            continue
        if len(items) > 1:
            chains.setdefault(tuple(j["id"] for j in items), items)
    if not chains:
        st.caption("None of the chosen jobs is part of a chain of rounds: continue a finished job from its page "
                   "(Continue (next round)) to start one.")
        return
    left, right = st.columns([3, 1])
    keys = list(chains)
    picked = left.selectbox("Chain", keys, key="compare_chain", format_func=lambda k: " → ".join(f"#{i}" for i in k),
                            help="The rounds a chosen job belongs to: the jobs it continues back to round 1, and "
                                 "those continued from it.")
    measure = right.radio("Measure", list(charts.ROUND_MEASURES), format_func=charts.ROUND_MEASURES.get,
                          key="compare_round_measure", horizontal=True,
                          help="The known-answer gold is one scale for every round. A reward is each round's own "
                               "reward model's: compare the gains, not the levels.")
    done = [(j["round"], f"#{j['id']} {j['name']}", report) for j in chains[picked]
            if (report := evaluated(j, feeds)) is not None]
    fig = charts.rounds_figure(done, measure)
    if not any(len(t.x or ()) for t in fig.data):
        st.caption(f"No round of this chain has a {charts.ROUND_MEASURES[measure]} in its evaluate report yet"
                   + (" (a gold: the known-answer task only)." if measure == "gold" else "."))
        return
    st.plotly_chart(fig, key="cmp-rounds", width="stretch")
    st.caption("Each round is evaluated against the policy it started from (its SFT policy; in a later round, the "
               "aligned policy of the round before), on its own held-out prompts: the gain is the round's own.")


st.title("Compare runs")
client = get_client()
jobs = ui.call(client.list_jobs, limit=200)
if not jobs:
    if jobs is not None:
        st.info("No jobs yet.")
    st.stop()

by_id = {j["id"]: j for j in jobs}
default = [j["id"] for j in jobs if j["status"] in (JobStatus.succeeded, JobStatus.running)][:2] or [jobs[0]["id"]]
chosen = st.multiselect("Jobs", list(by_id), default=default, format_func=lambda i: ui.job_label(by_id[i]),
                        key="compare_jobs",
                        help="Runs of any algorithm: PPO, GRPO, RLOO, DPO and KTO compare side by side.")
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
    curves(feeds)
    frontier(feeds)
    runs_table(feeds)
    warnings(feeds)
    held_out_answers(feeds)
    rounds(chosen, feeds)


any_active = any(JobStatus(by_id[j]["status"]) not in FINISHED for j in chosen)
st.fragment(run_every=5.0 if any_active else None)(panel)()
