"""Plotly figures of a job's metrics (interactive: zoom, hover, toggle traces).

Pure functions from a `JobFeed` (or series) to a `go.Figure`, so pages stay short and the figures can be
checked without a browser. Every trace draws lines with markers, so even a run of two steps shows points.
The alignment stage's figures read the metrics of the job's algorithm (`JobFeed.key`: `grpo/kl` for a GRPO
job), so one figure serves PPO, GRPO and RLOO, and DPO has its own (`dpo_figure`). The Compare page's figures
overlay several jobs of any algorithms (`compare_figure`, `frontier_figure`).
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Iterable

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from edgerlhf.reports import EvalReport
from frontend.live import JobFeed
from frontend.reports import parse

HEIGHT = 300
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def _layout(fig: go.Figure, title: str, x: str = "step", y: str | None = None, height: int = HEIGHT) -> go.Figure:
    # Subplot titles are annotations just above the plots: leave room for them under the figure's title.
    top = 70 if fig.layout.annotations else 40
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=height, hovermode="x unified",
                      margin=dict(l=10, r=10, t=top, b=10), legend=dict(orientation="h", y=-0.25),
                      xaxis_title=x, yaxis_title=y)
    return fig


def _xy(points: Iterable[tuple[int, float | None]]) -> tuple[list[int], list[float | None]]:
    xs, ys = [], []
    for step, value in points:
        xs.append(step)
        # Plotly leaves a gap at None: a NaN step shows as a break in the line, not a fake value.
        ys.append(value if value is not None and math.isfinite(value) else None)
    return xs, ys


def line(fig: go.Figure, points, name: str, color: str | None = None, **kw: Any) -> go.Figure:
    xs, ys = _xy(points)
    fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode="lines+markers", marker=dict(size=5),
                             line=dict(color=color), **kw))
    return fig


def _stage_series(feed: JobFeed, name: str) -> list[tuple[int, float | None]]:
    """The alignment stage's series of metric `name` in the job's algorithm's namespace."""
    key = feed.key(name)
    return feed.series(key, "ppo") or feed.series(key)


def reward_figure(feed: JobFeed) -> go.Figure:
    """The reward of the algorithm's rollouts (PPO, GRPO, RLOO): the batch mean with a band of ± one std."""
    mean = _stage_series(feed, "reward_mean")
    std = dict(_stage_series(feed, "reward_std"))
    fig = go.Figure()
    steps, ys = _xy(mean)
    band = [(s, y, std.get(s)) for s, y in zip(steps, ys) if y is not None and std.get(s) is not None]
    if band:
        upper = [y + sd for _, y, sd in band]
        lower = [y - sd for _, y, sd in band]
        xs = [s for s, _, _ in band]
        fig.add_trace(go.Scatter(x=xs + xs[::-1], y=upper + lower[::-1], fill="toself", name="± std", mode="lines",
                                 fillcolor="rgba(31,119,180,0.18)", line=dict(width=0), hoverinfo="skip"))
    line(fig, mean, "reward mean", COLORS[0])
    return _layout(fig, f"Reward ({feed.algorithm.upper()} batch mean ± std)", y="reward")


def kl_figure(feed: JobFeed) -> go.Figure:
    """KL to the reference policy (DPO's too, and its held-out KL), and the KL coefficient on a second axis."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for i, name in enumerate(("kl", "approx_kl", "eval_kl")):
        pts = _stage_series(feed, name)
        if pts:
            xs, ys = _xy(pts)
            fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode="lines+markers",
                                     marker=dict(size=5), line=dict(color=COLORS[i + 1])), secondary_y=False)
    coef = _stage_series(feed, "kl_coef")
    if coef:
        xs, ys = _xy(coef)
        fig.add_trace(go.Scatter(x=xs, y=ys, name="kl_coef", mode="lines", line=dict(dash="dot", color="gray")),
                      secondary_y=True)
    fig.update_yaxes(title_text="KL (nats)", secondary_y=False)
    fig.update_yaxes(title_text="coef", secondary_y=True, showgrid=False)
    return _layout(fig, "KL to the reference policy")


def keys_figure(feed: JobFeed, keys: list[str], title: str, stage: str | None = None, y: str | None = None) -> go.Figure:
    """Several metrics of one stage on one chart."""
    fig = go.Figure()
    for i, key in enumerate(keys):
        pts = feed.series(key, stage) if stage else feed.series(key)
        if pts:
            line(fig, pts, key.split("/", 1)[-1] if stage else key, COLORS[i % len(COLORS)])
    return _layout(fig, title, y=y)


DIAGNOSTICS = ("response_length", "cap_hit_rate", "entropy", "clip_frac", "tokens_per_s")
"""The health signals of a sampling algorithm, in its namespace; those it does not log are left out."""


def diagnostics_figure(feed: JobFeed) -> go.Figure:
    """Small multiples of the sampling algorithm's health signals: response length, the share of answers cut at
    the cap, entropy, clip fraction, throughput (the ones the job's algorithm logs)."""
    names = [n for n in DIAGNOSTICS if _stage_series(feed, n)] or list(DIAGNOSTICS[:1])
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names)
    for i, name in enumerate(names, start=1):
        xs, ys = _xy(_stage_series(feed, name))
        fig.add_trace(go.Scatter(x=xs, y=ys, name=feed.key(name), mode="lines+markers", marker=dict(size=4),
                                 line=dict(color=COLORS[i - 1]), showlegend=False), row=1, col=i)
    fig.update_annotations(font_size=12)
    return _layout(fig, f"{feed.algorithm.upper()} diagnostics", height=260)


DPO_PANELS = (("loss", ("loss", "eval_loss")), ("accuracy", ("accuracy", "eval_accuracy")),
              ("margin", ("margin", "eval_margin")), ("implicit rewards", ("chosen_reward", "rejected_reward")))
"""DPO's panels: (title, metric names); a held-out `eval_*` series is drawn dotted."""


def dpo_figure(feed: JobFeed) -> go.Figure:
    """DPO's training: preference loss, accuracy and margin (training, and dotted held-out), and the implicit
    rewards beta * log(policy / reference) of the chosen and rejected responses."""
    fig = make_subplots(rows=1, cols=len(DPO_PANELS), subplot_titles=[t for t, _ in DPO_PANELS])
    for col, (_, names) in enumerate(DPO_PANELS, start=1):
        for i, name in enumerate(names):
            pts = _stage_series(feed, name)
            if not pts:
                continue
            xs, ys = _xy(pts)
            fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode="lines+markers", marker=dict(size=4),
                                     line=dict(color=COLORS[(col - 1 + 4 * i) % len(COLORS)],
                                               dash="dot" if name.startswith("eval_") else None)), row=1, col=col)
    fig.update_annotations(font_size=12)
    return _layout(fig, "DPO on the preference pairs", height=300)


def reward_model_figure(feed: JobFeed) -> go.Figure:
    """Reward-model training per precision: loss (left), training and held-out accuracy (right)."""
    keys = feed.keys()
    precisions = sorted({m.group(1) for k in keys if (m := re.match(r"reward/([^/]+)/(loss|accuracy|eval_accuracy)$", k))})
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss", "accuracy (dotted: held-out)"])
    for i, p in enumerate(precisions):
        color = COLORS[i % len(COLORS)]
        for col, metric, dash in ((1, "loss", None), (2, "accuracy", None), (2, "eval_accuracy", "dot")):
            pts = feed.series(f"reward/{p}/{metric}")
            if not pts:
                continue
            xs, ys = _xy(pts)
            fig.add_trace(go.Scatter(x=xs, y=ys, name=p if metric != "eval_accuracy" else f"{p} held-out",
                                     legendgroup=p, showlegend=metric != "accuracy", mode="lines+markers",
                                     marker=dict(size=5), line=dict(color=color, dash=dash)), row=1, col=col)
    return _layout(fig, "Reward model per precision")


def precision_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """The precision study (rows of `reports.precision_rows`) side by side: held-out accuracy, peak memory,
    scoring throughput."""
    panels = [("accuracy", "held-out accuracy"), ("peak_train_mb", "peak memory (MB)"),
              ("throughput_pairs_per_s", "throughput (pairs/s)")]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for _, t in panels])
    names = [r["precision"] for r in rows]
    for col, (key, _) in enumerate(panels, start=1):
        fig.add_trace(go.Bar(x=names, y=[r[key] for r in rows], showlegend=False,
                             marker_color=[COLORS[i % len(COLORS)] for i in range(len(rows))]), row=1, col=col)
    fig.update_annotations(font_size=12)
    return _layout(fig, "Precision study", x=None, height=260)


def eval_figure(report: EvalReport | dict[str, Any]) -> go.Figure:
    """SFT vs the aligned policy (named after its algorithm) on held-out prompts: mean reward-model score and
    gold score, those the run has, with ± one standard deviation; response length when it has neither (a
    DPO run without a reward model on human labels)."""
    report = parse(EvalReport, report)
    titles = {"reward": "reward model score", "gold": f"gold score ({report.gold_scorer})",
              "response_tokens": "response tokens"}
    measures = [m for m in ("reward", "gold")
                if getattr(report.sft, m) is not None and getattr(report.ppo, m) is not None] or ["response_tokens"]
    aligned = report.algorithm.upper()
    fig = make_subplots(rows=1, cols=len(measures), subplot_titles=[titles[m] for m in measures])
    for col, m in enumerate(measures, start=1):
        for i, (who, policy) in enumerate((("SFT", report.sft), (aligned, report.ppo))):
            summary = getattr(policy, m)
            fig.add_trace(go.Bar(x=[who], y=[summary.mean], name=who, showlegend=col == 1,
                                 error_y=dict(type="data", array=[summary.std or 0.0], visible=True),
                                 marker_color=COLORS[i]), row=1, col=col)
    fig.update_annotations(font_size=12)
    return _layout(fig, f"SFT vs {aligned} (mean ± std)", x=None, height=280)


def memory_figure(feed: JobFeed, gpu_total_mb: float | None) -> go.Figure:
    """Memory over the whole job (all stages, by time) against the GPU's total when there is a GPU."""
    fig = go.Figure()
    # `mem/*` from the stages at their steps; `sys/*` sampled by the worker between them (contract.SAMPLED_PREFIX).
    keys = ["mem/allocated_mb", "mem/peak_mb", "mem/reserved_mb", "sys/gpu_used_mb"] if gpu_total_mb else []
    keys += ["mem/rss_mb", "sys/rss_mb"]
    for i, key in enumerate(keys):
        rows = feed.timed(key)
        if not rows:
            continue
        have_time = all(isinstance(t, (int, float)) for t, *_ in rows)
        # Unix seconds -> datetimes, so the axis reads as clock time (local time of the dashboard host).
        xs = [datetime.fromtimestamp(t) for t, *_ in rows] if have_time else list(range(len(rows)))
        ys = [v if v is not None and math.isfinite(v) else None for *_, v in rows]
        text = [f"{stage} step {step}" for _, step, stage, _ in rows]
        fig.add_trace(go.Scatter(x=xs, y=ys, name=key.split("/")[1], mode="lines+markers", marker=dict(size=4),
                                 text=text, line=dict(color=COLORS[i % len(COLORS)],
                                                      dash="dot" if key == "mem/rss_mb" and gpu_total_mb else None)))
    if gpu_total_mb:
        fig.add_hline(y=gpu_total_mb, line=dict(color="red", dash="dash"),
                      annotation_text=f"GPU total {gpu_total_mb:,.0f} MB", annotation_position="top left")
    title = "Memory (MB) vs the GPU's total" if gpu_total_mb else "Process memory (RSS, MB): no GPU"
    return _layout(fig, title, x="time", y="MB")


X_AXES = {"step": "step", "samples": "samples seen"}
"""The Compare page's common x-axes: a metric's own step, or the samples its stage had consumed by then
(`JobFeed.samples_per_step`: responses for PPO/GRPO/RLOO, preference pairs for DPO)."""


def compare_figure(feeds: dict[str, JobFeed], name: str, x: str = "step") -> go.Figure:
    """Metric `name` of several jobs overlaid on a common x-axis (`X_AXES`).

    An alignment metric (`reward_mean`, no namespace) is read in each job's own algorithm's namespace, so a PPO
    job's `ppo/reward_mean` and a GRPO job's `grpo/reward_mean` share the chart; a full key (`sft/eval_loss`)
    is read as it is. On the samples axis a job whose metric has no samples per step is left out.
    """
    if x not in X_AXES:
        raise ValueError(f"unknown x-axis {x!r}; choose from {list(X_AXES)}")
    fig = go.Figure()
    drawn = []
    for i, (label, feed) in enumerate(feeds.items()):
        pts = feed.series(feed.key(name))
        per_step = feed.samples_per_step(name)
        if not pts or (x == "samples" and per_step is None):
            continue
        if x == "samples":
            pts = [(step * per_step, value) for step, value in pts]
        line(fig, pts, label if "/" in name else f"{label} ({feed.algorithm})", COLORS[i % len(COLORS)])
        drawn.append(feed.algorithm)
    fig.update_layout(showlegend=True)  # even for one job: say which job a line is
    title = name if "/" in name else f"{name} ({', '.join(dict.fromkeys(drawn)) or 'alignment'})"
    return _layout(fig, title, x=X_AXES[x])


def frontier_figure(feeds: dict[str, JobFeed]) -> go.Figure:
    """Reward against KL to the reference, the trade every alignment run makes.

    Each sampling run's training trajectory (one point per step, its batch's mean KL and reward), and each
    finished run's held-out pair from its evaluate report: the SFT policy at KL 0 and the aligned policy at
    its KL, joined by a dotted line. DPO samples nothing while it trains, so it appears by that held-out
    pair (when the run has a reward model to score it).
    """
    fig = go.Figure()
    for i, (label, feed) in enumerate(feeds.items()):
        color, name = COLORS[i % len(COLORS)], f"{label} ({feed.algorithm})"
        kl = dict(_stage_series(feed, "kl"))
        path = [(kl[step], reward, step) for step, reward in _stage_series(feed, "reward_mean")
                if _finite(reward) and _finite(kl.get(step))]
        if path:
            fig.add_trace(go.Scatter(x=[k for k, _, _ in path], y=[r for _, r, _ in path], name=f"{name} training",
                                     text=[f"step {s}" for _, _, s in path], mode="lines+markers", legendgroup=label,
                                     marker=dict(size=5), line=dict(color=color),
                                     hovertemplate="KL %{x:.3g}, reward %{y:.3g} (%{text})"))
        ev = feed.report.evaluate if feed.report is not None else None
        if ev is not None and ev.sft.reward is not None and ev.ppo.reward is not None \
                and _finite(ev.sft.reward.mean) and _finite(ev.ppo.reward.mean) and _finite(ev.kl):
            fig.add_trace(go.Scatter(x=[0.0, ev.kl], y=[ev.sft.reward.mean, ev.ppo.reward.mean],
                                     name=f"{name} held-out: SFT → {ev.algorithm.upper()}", legendgroup=label,
                                     text=["SFT", ev.algorithm.upper()], mode="lines+markers",
                                     marker=dict(size=[9, 15], symbol=["circle-open", "star"], color=color),
                                     line=dict(color=color, dash="dot"),
                                     hovertemplate="%{text}: KL %{x:.3g}, reward %{y:.3g} (held-out)"))
    fig.update_layout(showlegend=True)
    _layout(fig, "Reward vs KL (training steps; ★ the aligned policy on held-out prompts)",
            x="KL to the reference (nats per response)", y="reward", height=420)
    fig.update_layout(hovermode="closest")  # points, not a step's column: the x-axis is KL
    return fig


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def last_question(prompt: str) -> str:
    """The last human turn of a dialogue prompt (`...\n\nHuman: question\n\nAssistant:`), for labels."""
    text = prompt.rsplit("Human:", 1)[-1].split("Assistant:", 1)[0]
    return " ".join(text.split()) or "?"


def checkpoint_label(sample: dict[str, Any]) -> str:
    """The checkpoint that produced a sample (`sft/step-30`, `ppo/step-10`); `<stage>/step-<step>` when unnamed."""
    return sample["checkpoint"] or f"{sample['stage']}/step-{sample['step']}"


def probe_reward_figure(rows: list[dict[str, Any]], order: list[str]) -> go.Figure:
    """Probe rewards per checkpoint, one line per probe prompt."""
    fig = go.Figure()
    by_prompt: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["reward"] is not None:
            by_prompt.setdefault(r["prompt"], {})[checkpoint_label(r)] = r["reward"]
    for i, (prompt, rewards) in enumerate(by_prompt.items()):
        xs = [c for c in order if c in rewards]
        short = last_question(prompt)[:40]
        fig.add_trace(go.Scatter(x=xs, y=[rewards[c] for c in xs], name=f"#{i + 1} {short}", mode="lines+markers",
                                 line=dict(color=COLORS[i % len(COLORS)])))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=order)
    return _layout(fig, "Probe reward per checkpoint", x="checkpoint", y="reward")


def histogram_figure(hist: dict[str, Any], title: str, limit: int | None = None, color: str = COLORS[0]) -> go.Figure:
    """A token-length histogram (`HistogramPublic`: `edges`, `counts`) with the budget `limit` as a dashed line:
    what lies right of it is dropped."""
    edges, counts = hist["edges"], hist["counts"]
    fig = go.Figure(go.Bar(x=[(a + b) / 2 for a, b in zip(edges, edges[1:])], y=counts, name="records",
                           width=[b - a for a, b in zip(edges, edges[1:])], marker_color=color,
                           customdata=[f"{a}–{b - 1}" for a, b in zip(edges, edges[1:])],
                           hovertemplate="%{customdata} tokens: %{y}<extra></extra>"))
    if limit is not None:
        fig.add_vline(x=limit + 0.5, line_dash="dash", line_color="#d62728", annotation_text=f"max {limit}",
                      annotation_position="top right")
    _layout(fig, title, x="tokens", y="records")
    fig.update_layout(hovermode="closest", showlegend=False, bargap=0.05)
    return fig
