"""Plotly figures of a job's metrics (interactive: zoom, hover, toggle traces).

Pure functions from a `JobFeed` (or series) to a `go.Figure`, so pages stay short and the figures can be
checked without a browser. Every trace draws lines with markers, so even a run of two steps shows points.
The alignment stage's figures read the metrics of the job's algorithm (`JobFeed.key`: `grpo/kl` for a GRPO
job), so one figure serves PPO, GRPO and RLOO, and the offline trainers DPO and KTO theirs (`offline_figure`, its
panels per algorithm). The Compare page's figures
overlay several jobs of any algorithms (`compare_figure`, `frontier_figure`).

Every axis says what it shows and its unit in words (a metric's `Measure`, from `measure`), every trace has a
name, and an axis never shows a range its quantity cannot take: a flat series gets a range around its value
(`flat_range`), a non-negative quantity no negative numbers. Each time-series figure takes `smoothing`, the
weight of W&B's debiased exponential moving average (`ema`; 0 draws the raw series): the raw series stays faint
under its bold smoothed one, and the two toggle together from the legend.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Iterable, Sequence

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from edgerlhf.contract import ALGORITHM_TABLE, MICRO_BATCH_METRIC, algorithm_metric, algorithm_traits
from edgerlhf.reports import EvalReport
from frontend.live import JobFeed
from frontend.reports import parse

HEIGHT = 300
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


# --- what a metric is, in words -------------------------------------------------------------------


@dataclass(frozen=True)
class Measure:
    """How a person reads a metric: what it is and its unit in words, and the least and greatest values it can
    take (None: unbounded), so its axis never shows a range the quantity cannot have."""

    what: str
    unit: str
    low: float | None = None
    high: float | None = None

    @property
    def title(self) -> str:
        """The axis title: `KL to the reference (nats per answer)`."""
        return f"{self.what} ({self.unit})"


def _share(what: str, of: str) -> Measure:
    return Measure(what, f"share of {of}", 0.0, 1.0)


KL = Measure("KL to the reference", "nats per answer", 0.0)
"""The exact KL(policy || reference) of each answer, summed over its tokens (`rollout.step_metrics`; DPO's on
its chosen answers, teacher-forced), averaged over the batch (KTO's estimate reads as `ALGORITHM_MEASURES`')."""
MEMORY = Measure("memory", "MB", 0.0)
STEP = "step"
"""The x-axis of a stage's curves: its own optimizer (or rollout) step."""

_TRAINING = {"learning_rate": Measure("learning rate", "per step", 0.0),
             "grad_norm": Measure("gradient norm", "L2", 0.0),
             "tokens_per_s": Measure("throughput", "tokens/s", 0.0),
             "step_s": Measure("time per step", "s", 0.0)}
"""Measures every training stage logs alike."""

ALIGNMENT_MEASURES: dict[str, Measure] = {
    **_TRAINING,
    "kl": KL,
    "eval_kl": Measure("held-out KL to the reference", "nats per answer", 0.0),
    "approx_kl": Measure("KL of one update, approx.", "nats", 0.0),
    "k3_kl": Measure("KL to the reference, k3 estimate", "nats per token", 0.0),
    "kl_coef": Measure("KL coefficient β", "reward per nat", 0.0),
    "response_length": Measure("response length", "tokens", 0.0),
    "cap_hit_rate": _share("answers cut at the length cap", "answers"),
    "entropy": Measure("entropy", "nats per token", 0.0),
    "clip_frac": Measure("clipped by the ratio", "share", 0.0, 1.0),  # of tokens; of answers for RLOO
    "vf_clip_frac": _share("value clipped", "tokens"),
    "generation_s": Measure("sampling time per step", "s", 0.0),
    "policy_loss": Measure("policy loss", "advantage units"),  # the clipped surrogate
    "value_loss": Measure("value loss", "reward units²", 0.0),  # squared error of the returns
    "advantage_abs_mean": Measure("mean |advantage|", "advantage units", 0.0),
    # DPO's (`edgerlhf.align.dpo`): its loss per pair, and the implicit reward beta * log(policy / reference).
    "loss": Measure("preference loss", "per pair", 0.0),
    "eval_loss": Measure("held-out preference loss", "per pair", 0.0),
    "accuracy": _share("pairs ranked right", "pairs"),
    "eval_accuracy": _share("held-out pairs ranked right", "pairs"),
    "margin": Measure("implicit reward margin", "β · log-ratio"),
    "eval_margin": Measure("held-out implicit reward margin", "β · log-ratio"),
    "chosen_reward": Measure("implicit reward", "β · log-ratio"),
    "rejected_reward": Measure("implicit reward", "β · log-ratio"),
    "eval_chosen_reward": Measure("held-out implicit reward", "β · log-ratio"),
    "eval_rejected_reward": Measure("held-out implicit reward", "β · log-ratio"),
    # The independent signals of the rollouts (`rollout.independent_metrics`); the gold's unit: its scorer (`measure`).
    "validation_reward_mean": Measure("validation reward", "validation RM score"),
    "validation_reward_std": Measure("validation reward std", "validation RM score", 0.0),
    "proxy_validation_spearman": Measure("rank agreement, proxy vs validation RM", "Spearman ρ", -1.0, 1.0),
    "proxy_gold_spearman": Measure("rank agreement, proxy vs gold", "Spearman ρ", -1.0, 1.0),
}
"""The alignment stage's metrics by name (`<algorithm>/<name>`), but those in the unit of its reward."""

ALGORITHM_MEASURES: dict[str, dict[str, Measure]] = {
    # KTO's (`edgerlhf.align.kto`): a loss per labelled answer, 1 - sigmoid(beta * (log-ratio - z)) for a desirable
    # one (the other way round for an undesirable one), and z, TRL's estimate of the KL from mismatched answers.
    "kto": {
        "loss": Measure("KTO loss", "per answer", 0.0),
        "eval_loss": Measure("held-out KTO loss", "per answer", 0.0),
        "kl": Measure("KL estimate z (mismatched answers)", "nats per answer", 0.0),
        "eval_kl": Measure("held-out KL estimate z", "nats per answer", 0.0),
        "margin": Measure("implicit reward, desirable − undesirable", "β · log-ratio"),
        "eval_margin": Measure("held-out implicit reward, desirable − undesirable", "β · log-ratio"),
    },
}
"""An algorithm's own reading of a metric name that `ALIGNMENT_MEASURES` reads otherwise (KTO's loss and KL)."""

REWARD_MEASURES: dict[str, tuple[str, float | None, str]] = {
    "reward_mean": ("reward", None, ""), "reward_std": ("reward std", 0.0, ""),
    "non_score_reward": ("KL penalty", None, ""), "returns_mean": ("mean return", None, ""),
    "rlhf_reward_mean": ("reward − β · KL", None, ""),
    "ensemble_std_mean": ("reward ensemble disagreement (std)", 0.0, ""),
    "length_slope": ("reward per token of answer length", None, " per token")}
"""The alignment metrics in the unit of what scored the rollouts (`reward_unit`): name -> (what, least value, what
follows the unit)."""

LM_MEASURES: dict[str, Measure] = {
    **_TRAINING,
    "loss": Measure("cross-entropy", "nats per token", 0.0),
    "eval_loss": Measure("held-out cross-entropy", "nats per token", 0.0),
    "perplexity": Measure("held-out perplexity", "exp of nats per token", 1.0),
    "token_accuracy": _share("next token right", "tokens"),
}
"""SFT's and its warm-up's metrics (`sft/*`, `warmup/*`)."""

REWARD_MODEL_MEASURES: dict[str, Measure] = {
    **_TRAINING,
    "loss": Measure("Bradley–Terry loss", "nats per pair", 0.0),
    "eval_loss": Measure("held-out Bradley–Terry loss", "nats per pair", 0.0),
    "accuracy": _share("pairs ranked right", "pairs"),
    "eval_accuracy": _share("held-out pairs ranked right", "pairs"),
    "test_accuracy": _share("test pairs ranked right", "pairs"),
    "margin": Measure("score margin, chosen − rejected", "RM score"),
    "eval_margin": Measure("held-out score margin", "RM score"),
    "test_margin": Measure("test score margin", "RM score"),
}
"""The reward stage's metrics of each precision (`reward/<precision>/<name>`)."""

EVALUATE_MEASURES: dict[str, Measure] = {
    "kl": KL,
    "length_diff": Measure("length change, aligned − SFT", "tokens"),
    "cap_hit_rate_ppo": _share("aligned answers cut at the cap", "answers"),
    "win_rate": _share("aligned answer scored higher", "prompts"),
}
"""The evaluate stage's metrics (`evaluate/*`), but its rewards and gold scores (`measure`)."""


def reward_unit(function: str | None = None, terms: Sequence[Any] | None = None) -> str:
    """What scored the rollouts: a reward function (`ppo.reward_function`), the weighted sum of stated terms
    (`ppo.rewards`), or the reward model."""
    if function:
        return f"function {function}"
    if terms:
        return f"weighted sum of {len(terms)} terms"
    return "RM score"


def measure(feed: JobFeed | None, key: str) -> Measure:
    """How a person reads metric `key` of a job: an alignment metric (`grpo/kl`), SFT's and the warm-up's, the
    reward model's at any precision (`reward/int4/accuracy`), evaluation's, memory's (`mem/*`, `sys/*`) and the
    data stage's counts. The units of rewards and gold scores come from the job's config (what scored, which
    gold scorer); a key this table does not know reads as itself, "as logged"."""
    config = ((feed.job or {}).get("config") or {}) if feed is not None else {}
    namespace, _, name = key.partition("/")
    if namespace in ALGORITHM_TABLE:
        if name in ALGORITHM_MEASURES.get(namespace, {}):
            return ALGORITHM_MEASURES[namespace][name]
        if name in REWARD_MEASURES:
            what, low, per = REWARD_MEASURES[name]
            ppo = config.get("ppo") or {}
            return Measure(what, reward_unit(ppo.get("reward_function"), ppo.get("rewards")) + per, low)
        if name.startswith("rewards/"):  # one stated term of `ppo.rewards`
            return Measure(f"reward term {name.removeprefix('rewards/')}", "its own scale")
        if name in ("gold_mean", "gold_std"):  # the known-answer task's gold of the rollouts
            scorer = (config.get("data") or {}).get("gold_scorer", "gold scorer")
            return Measure("gold score" if name == "gold_mean" else "gold score std", scorer,
                           None if name == "gold_mean" else 0.0)
        if name in ("loss", "eval_loss") and (config.get("dpo") or {}).get("loss_type", "sigmoid") == "sigmoid":
            return Measure(ALIGNMENT_MEASURES[name].what, "nats per pair", 0.0)  # -log sigmoid(...)
        found = ALIGNMENT_MEASURES.get(name)
    elif namespace in ("sft", "warmup"):
        found = LM_MEASURES.get(name)
    elif namespace == "reward":
        found = REWARD_MODEL_MEASURES.get(name.rpartition("/")[2])
    elif namespace in ("mem", "sys"):
        found = Measure("rows per forward pass", "rows", 0.0) if key == MICRO_BATCH_METRIC else MEMORY
    elif namespace == "evaluate":
        if name.startswith("reward_"):
            ppo = config.get("ppo") or {}
            found = Measure("reward", reward_unit(ppo.get("reward_function"), ppo.get("rewards")))
        elif name.startswith("gold_"):
            found = Measure("gold score", (config.get("data") or {}).get("gold_scorer", "gold scorer"))
        else:
            found = EVALUATE_MEASURES.get(name)
    elif namespace == "data":
        found = _share("votes among the pairs", "pairs") if name == "votes_share" else Measure("count", "records", 0.0)
    else:
        found = None
    return found or Measure(name or key, "as logged")


STAGE_NAMES = {"data": "data", "sft": "SFT", "reward": "reward model", "evaluate": "evaluation"}
"""How a person reads a stage (`contract.STAGES`); the alignment stage reads as its algorithm (`stage_name`)."""


def stage_name(stage: str, algorithm: str) -> str:
    """A stage as a person reads it: the alignment stage, stored as `ppo` whatever it runs, by its algorithm."""
    return algorithm_traits(algorithm).label if stage == "ppo" else STAGE_NAMES.get(stage, stage)


# --- smoothing and ranges (pure) -------------------------------------------------------------------


def ema(values: Sequence[float | None], weight: float) -> list[float | None]:
    """The debiased exponential moving average of `values` (W&B's and TensorBoard's smoothing): `weight` 0 is
    the raw series, near 1 the smoothest. A gap (None or NaN) stays a gap and does not reset the average;
    dividing by 1 - weight^n removes the pull towards 0 of the first points."""
    if not 0.0 <= weight < 1.0:
        raise ValueError(f"smoothing weight must be in [0, 1), got {weight}")
    out: list[float | None] = []
    last, n = 0.0, 0
    for v in values:
        if v is None or not math.isfinite(v):
            out.append(None)
            continue
        n += 1
        last = last * weight + (1.0 - weight) * v
        out.append(last / (1.0 - weight ** n))
    return out


def flat_range(values: Iterable[Any], low: float | None = None, high: float | None = None) -> list[float] | None:
    """The y-range of a flat series: ±50 % around its value (±1 around 0), kept within the quantity's bounds
    `low`..`high` (a small margin above `high`, so points on it stay whole); None when the values vary or
    there are none (Plotly's autorange then fits them)."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not finite:
        return None
    lo, hi = min(finite), max(finite)
    if hi - lo > 1e-9 * max(1.0, abs(hi)):
        return None
    pad = 0.5 * abs(lo) or 1.0
    bottom, top = lo - pad, hi + pad
    if low is not None:
        bottom = max(bottom, low)
    if high is not None:
        top = min(top, high + 0.05 * (high - (low or 0.0)))
    return [bottom, top]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


# --- building blocks ---------------------------------------------------------------------------------


def _layout(fig: go.Figure, title: str, height: int = HEIGHT) -> go.Figure:
    # Subplot titles are annotations just above the plots: leave room for them under the figure's title.
    top = 70 if fig.layout.annotations else 40
    # The legend sits at the figure's foot (container coordinates), below the x-axis title, never over it.
    fig.update_layout(title=dict(text=title, font=dict(size=14)), height=height, hovermode="x unified",
                      margin=dict(l=10, r=10, t=top, b=10),
                      legend=dict(orientation="h", xref="container", x=0, yref="container", y=0, yanchor="bottom"))
    return fig


def _axis_id(axis: Any) -> str:
    """`x2` of the layout's `xaxis2`: how traces name the axis they are drawn on."""
    return axis.plotly_name.replace("axis", "")


def _x(fig: go.Figure, title: str, axis: str = "x") -> None:
    # automargin: the figure's margins are thin; the axis makes room for its tick labels and title.
    fig.layout["xaxis" + axis[1:]].update(title_text=title, title_font_size=12, automargin=True)


def _y(fig: go.Figure, m: Measure, axis: str = "y", title: str | None = None, also: Iterable[float] = ()) -> None:
    """Title y-axis `axis` with `m` (or `title`) and fit its range to `m`'s bounds: a flat series gets a range
    around its value, a non-negative quantity never a negative range. `also`: values the range must show
    besides the traces' (a limit drawn as a line)."""
    values = [v for t in fig.data if (t.yaxis or "y") == axis for v in (t.y or ())]
    layout_axis = fig.layout["yaxis" + axis[1:]]
    layout_axis.update(title_text=title or m.title, title_font_size=12, automargin=True)
    span = flat_range([*values, *also], m.low, m.high)
    if span is not None:
        layout_axis.range = span
    elif m.low is not None and m.low >= 0:
        layout_axis.rangemode = "nonnegative"


def _panel(fig: go.Figure, row: int, col: int, m: Measure, x: str = STEP, y: str | None = None) -> None:
    """Title the axes of one subplot and fit its y-range (`_y`)."""
    sub = fig.get_subplot(row, col)
    _x(fig, x, _axis_id(sub.xaxis))
    _y(fig, m, _axis_id(sub.yaxis), y)


def _xy(points: Iterable[tuple[Any, float | None]]) -> tuple[list[Any], list[float | None]]:
    xs, ys = [], []
    for step, value in points:
        xs.append(step)
        # Plotly leaves a gap at None: a NaN step shows as a break in the line, not a fake value.
        ys.append(value if value is not None and math.isfinite(value) else None)
    return xs, ys


def line(fig: go.Figure, points, name: str, color: str | None = None, smoothing: float = 0.0,
         row: int | None = None, col: int | None = None, secondary_y: bool | None = None, **kw: Any) -> go.Figure:
    """One series, lines with markers. With `smoothing`, the raw series faint (still named `name`, in the
    hover) under its bold exponential moving average (`ema`), named `<name> (smoothed)` in the legend; one
    legend entry toggles both. `row`, `col`, `secondary_y` place it in a subplot; `kw` goes to the trace."""
    xs, ys = _xy(points)
    style = {**(kw.pop("line", None) or {}), **({"color": color} if color else {})}
    place = dict(row=row, col=col, secondary_y=secondary_y)
    if not smoothing:
        fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode="lines+markers", marker=kw.pop("marker", dict(size=5)),
                                 line=style, **kw), **place)
        return fig
    kw.pop("marker", None)
    group, shown = kw.pop("legendgroup", name), kw.pop("showlegend", None)
    # Small markers: a point alone between two gaps still shows.
    fig.add_trace(go.Scatter(x=xs, y=ys, name=name, mode="lines+markers", marker=dict(size=3),
                             line={**style, "width": 1}, opacity=0.35, legendgroup=group, showlegend=False, **kw),
                  **place)
    fig.add_trace(go.Scatter(x=xs, y=ema(ys, smoothing), name=f"{name} (smoothed)", mode="lines+markers",
                             marker=dict(size=3), line={**style, "width": 2.5}, legendgroup=group, showlegend=shown,
                             **kw), **place)
    return fig


def _stage_series(feed: JobFeed, name: str) -> list[tuple[int, float | None]]:
    """The alignment stage's series of metric `name` in the job's algorithm's namespace."""
    key = feed.key(name)
    return feed.series(key, "ppo") or feed.series(key)


def _label(algorithm: str) -> str:
    return algorithm_traits(algorithm).label


# --- a job's figures ---------------------------------------------------------------------------------


def reward_figure(feed: JobFeed, smoothing: float = 0.0) -> go.Figure:
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
    line(fig, mean, "reward mean", COLORS[0], smoothing)
    _layout(fig, f"Reward ({_label(feed.algorithm)} batch mean ± std)")
    _x(fig, STEP)
    _y(fig, measure(feed, feed.key("reward_mean")))
    return fig


def reward_terms(feed: JobFeed) -> list[str]:
    """The names of the stated reward terms (`ppo.rewards`) the job's alignment logged, in logging order."""
    prefix, suffix = algorithm_metric(feed.algorithm, "rewards/"), "_mean"
    return [key[len(prefix):-len(suffix)] for key in feed.keys() if key.startswith(prefix) and key.endswith(suffix)]


def reward_terms_figure(feed: JobFeed, smoothing: float = 0.0) -> go.Figure:
    """Each stated reward term's batch mean, unweighted, with its weight in its name: which part of the sum moved."""
    weights = {}
    for i, term in enumerate(((feed.job or {}).get("config") or {}).get("ppo", {}).get("rewards") or []):
        weights[term.get("name") or f"{term['kind']}{i}"] = term.get("weight", 1.0)
    fig = go.Figure()
    for i, name in enumerate(reward_terms(feed)):
        weight = weights.get(name)
        label = f"{name} (× {weight:g})" if weight is not None else name
        points = feed.series(algorithm_metric(feed.algorithm, f"rewards/{name}_mean"))
        line(fig, points, label, COLORS[i % len(COLORS)], smoothing)
    _layout(fig, f"Stated reward terms ({_label(feed.algorithm)} batch mean, before weighting)")
    _x(fig, STEP)
    _y(fig, Measure("reward term", "its own scale, unweighted"))
    return fig


def kl_figure(feed: JobFeed, smoothing: float = 0.0) -> go.Figure:
    """KL to the reference policy (DPO's and KTO's too, and their held-out KL), and the KL coefficient on a second
    axis (a constant coefficient gets a range around its value)."""
    coef = _stage_series(feed, "kl_coef")
    fig = make_subplots(specs=[[{"secondary_y": True}]]) if coef else go.Figure()
    for name, color in (("kl", COLORS[1]), ("eval_kl", COLORS[3])):
        pts = _stage_series(feed, name)
        if pts:
            line(fig, pts, name, color, smoothing, secondary_y=False if coef else None)
    if coef:
        xs, ys = _xy(coef)
        fig.add_trace(go.Scatter(x=xs, y=ys, name="kl_coef", mode="lines", line=dict(dash="dot", color="gray")),
                      secondary_y=True)
    _layout(fig, "KL to the reference policy")
    _x(fig, STEP)
    _y(fig, measure(feed, feed.key("kl")))
    if coef:
        _y(fig, measure(feed, feed.key("kl_coef")), "y2")
        # Its own round ticks: an overlaying axis copies the left one's gridlines by default (tickmode "sync").
        fig.layout.yaxis2.update(showgrid=False, tickmode="auto")
    return fig


INDEPENDENT_SIGNALS = (("validation_reward_mean", "validation_reward_std", "validation reward model"),
                       ("gold_mean", "gold_std", "gold"))
"""The signals of the rollouts the policy is not trained on (`rollout.independent_metrics`): (mean, std, name)."""
SIGNAL_CHANGE = Measure("change since the first step", "first step's batch std")
"""The proxy chart's common scale: a signal's change since its first logged step, in that step's batch std."""


def signal_change(means: Sequence[tuple[int, float | None]], stds: Sequence[tuple[int, float | None]] = ()
                  ) -> list[tuple[int, float | None]]:
    """A signal's batch means (step, mean) as their change since the first finite one, in units of that step's
    batch standard deviation (`stds`): one scale for a reward model's score and a gold's, whatever their units.
    When that std is missing or 0 (a gold every answer of the batch got alike), the spread of the means over the
    steps is the unit, and 1 when they are flat too."""
    finite = [(step, v) for step, v in means if _finite(v)]
    if not finite:
        return []
    first_step, first = finite[0]
    unit = dict(stds).get(first_step)
    if not (_finite(unit) and unit > 0):
        values = [v for _, v in finite]
        mean = sum(values) / len(values)
        unit = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values)) or 1.0
    return [(step, (v - first) / unit if _finite(v) else None) for step, v in means]


def independent_signals(feed: JobFeed) -> list[str]:
    """The names (`INDEPENDENT_SIGNALS`) of the independent signals the job's alignment stage logged."""
    return [name for mean, _, name in INDEPENDENT_SIGNALS if _stage_series(feed, mean)]


def proxy_figure(feed: JobFeed, smoothing: float = 0.0) -> go.Figure:
    """The proxy reward (what the policy is trained against) beside the signals it is not trained on (the validation
    reward model, the known-answer task's gold), each as its change since the first step in that step's batch stds
    (`signal_change`), against the KL to the reference (left, as Gao et al. 2022 draw over-optimisation) and against
    the step (right). Healthy: they rise together. Reward hacking: the proxy climbs on while the others stay flat
    or fall (`alerts.proxy_divergence` says so in words)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["against KL to the reference", "against step"],
                        horizontal_spacing=0.12)
    kl = dict(_stage_series(feed, "kl"))
    unit = measure(feed, feed.key("reward_mean")).unit
    signals = [("reward_mean", "reward_std", f"proxy reward ({unit})")]
    signals += [(mean, std, name if mean != "gold_mean" else f"gold ({measure(feed, feed.key(mean)).unit})")
                for mean, std, name in INDEPENDENT_SIGNALS if _stage_series(feed, mean)]
    for i, (mean, std, label) in enumerate(signals):
        change = signal_change(_stage_series(feed, mean), _stage_series(feed, std))
        color = COLORS[i % len(COLORS)]
        line(fig, [(kl[step], v) for step, v in change if _finite(kl.get(step))], label, color, smoothing, row=1,
             col=1, legendgroup=label, marker=dict(size=4))
        line(fig, change, label, color, smoothing, row=1, col=2, legendgroup=label, showlegend=False,
             marker=dict(size=4))
    _panel(fig, 1, 1, SIGNAL_CHANGE, x=KL.title)
    _panel(fig, 1, 2, SIGNAL_CHANGE)
    fig.layout.xaxis.rangemode = "nonnegative"
    fig.update_annotations(font_size=12)
    _layout(fig, f"Proxy vs independent signal ({_label(feed.algorithm)}: change since step 1)", height=340)
    fig.update_layout(hovermode="closest")  # the left panel's x is KL, not a step's column
    return fig


def keys_figure(feed: JobFeed, keys: list[str], title: str, stage: str | None = None, y: str | None = None,
                smoothing: float = 0.0) -> go.Figure:
    """Several metrics of one stage on one chart; the y-axis reads `y` (or what the first key is) and the first
    key's unit."""
    fig = go.Figure()
    for i, key in enumerate(keys):
        pts = feed.series(key, stage) if stage else feed.series(key)
        if pts:
            line(fig, pts, key.split("/", 1)[-1] if stage else key, COLORS[i % len(COLORS)], smoothing)
    _layout(fig, title)
    _x(fig, STEP)
    m = measure(feed, keys[0]) if keys else Measure("value", "as logged")
    _y(fig, m, title=f"{y} ({m.unit})" if y else None)
    return fig


DIAGNOSTICS = ("response_length", "length_slope", "cap_hit_rate", "entropy", "clip_frac", "approx_kl",
               "ensemble_std_mean", "tokens_per_s")
"""The health signals of a sampling algorithm, in its namespace; those it does not log are left out (the reward
ensemble's disagreement on the rollouts only with `reward.ensemble` > 1: growing, the policy is moving where the
reward models were not trained; the reward's slope on answer length: far from 0, length alone earns reward, see
`ppo.length_control`)."""
DIAGNOSTIC_COLUMNS = 3


def diagnostics_figure(feed: JobFeed, smoothing: float = 0.0) -> go.Figure:
    """Small multiples of the sampling algorithm's health signals: response length, the share of answers cut at
    the cap, entropy, clip fraction, the size of one update (approximate KL of the policy before and after it),
    throughput (the ones the job's algorithm logs), three to a row."""
    names = [n for n in DIAGNOSTICS if _stage_series(feed, n)] or list(DIAGNOSTICS[:1])
    measures = [measure(feed, feed.key(n)) for n in names]
    cols = min(DIAGNOSTIC_COLUMNS, len(names))
    rows = math.ceil(len(names) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[m.what for m in measures],
                        specs=[[{} if r * cols + c < len(names) else None for c in range(cols)] for r in range(rows)],
                        vertical_spacing=0.25)
    for i, (name, m) in enumerate(zip(names, measures)):
        row, col = divmod(i, cols)
        line(fig, _stage_series(feed, name), feed.key(name), COLORS[i % len(COLORS)], smoothing, row=row + 1,
             col=col + 1, marker=dict(size=4), showlegend=False)
        _panel(fig, row + 1, col + 1, m, y=m.unit)
    fig.update_annotations(font_size=12)
    return _layout(fig, f"{_label(feed.algorithm)} diagnostics", height=40 + 230 * rows)


OFFLINE_PANELS = {
    "dpo": (("loss", ("loss", "eval_loss")), ("accuracy", ("accuracy", "eval_accuracy")),
            ("margin", ("margin", "eval_margin")), ("implicit rewards", ("chosen_reward", "rejected_reward"))),
    "kto": (("loss", ("loss", "eval_loss")), ("KL estimate z", ("kl", "eval_kl")),
            ("margin", ("margin", "eval_margin")), ("implicit rewards", ("chosen_reward", "rejected_reward"))),
}
"""The panels of each algorithm that trains offline: (title, metric names); a held-out `eval_*` series is drawn
dotted."""
OFFLINE_DATA = {"dpo": "on the preference pairs", "kto": "on desirable and undesirable answers"}
"""What each offline algorithm trains on, in words (its figure's title, the job page's notice)."""


def offline_figure(feed: JobFeed, smoothing: float = 0.0) -> go.Figure:
    """The training of the job's offline algorithm (DPO, KTO; `OFFLINE_PANELS`): its loss, its accuracy (DPO) or KL
    estimate (KTO) and its margin (training, and dotted held-out), and the implicit rewards beta * log(policy /
    reference) of the chosen (desirable) and rejected (undesirable) answers."""
    panels = OFFLINE_PANELS[feed.algorithm]
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels])
    for col, (_, names) in enumerate(panels, start=1):
        for i, name in enumerate(names):
            pts = _stage_series(feed, name)
            if pts:
                line(fig, pts, name, COLORS[(col - 1 + 4 * i) % len(COLORS)], smoothing, row=1, col=col,
                     marker=dict(size=4), line=dict(dash="dot" if name.startswith("eval_") else None))
        m = measure(feed, feed.key(names[0]))
        _panel(fig, 1, col, m, y=m.unit)
    fig.update_annotations(font_size=12)
    return _layout(fig, f"{_label(feed.algorithm)} {OFFLINE_DATA[feed.algorithm]}", height=300)


def reward_model_figure(feed: JobFeed, smoothing: float = 0.0) -> go.Figure:
    """Reward-model training per precision: loss (left) and accuracy (right), training solid and held-out
    dotted; one legend entry per precision toggles its four curves."""
    keys = feed.keys()
    precisions = sorted({m.group(1) for k in keys
                         if (m := re.match(r"reward/([^/]+)/(loss|eval_loss|accuracy|eval_accuracy)$", k))})
    fig = make_subplots(rows=1, cols=2, subplot_titles=["loss (dotted: held-out)", "accuracy (dotted: held-out)"])
    for i, p in enumerate(precisions):
        color = COLORS[i % len(COLORS)]
        for col, metric, dash in ((1, "loss", None), (1, "eval_loss", "dot"), (2, "accuracy", None),
                                  (2, "eval_accuracy", "dot")):
            pts = feed.series(f"reward/{p}/{metric}")
            if pts:
                line(fig, pts, f"{p} held-out" if dash else p, color, smoothing, row=1, col=col, legendgroup=p,
                     showlegend=(col, dash) in ((1, None), (2, "dot")), line=dict(dash=dash))
    some = precisions[0] if precisions else "bf16"
    for col, metric in ((1, "loss"), (2, "accuracy")):
        m = measure(feed, f"reward/{some}/{metric}")
        _panel(fig, 1, col, m, y=m.unit)
    fig.update_annotations(font_size=12)
    return _layout(fig, "Reward model per precision")


PRECISION_PANELS = (("accuracy", _share("held-out accuracy", "pairs")),
                    ("peak_train_mb", Measure("peak memory", "MB", 0.0)),
                    ("throughput_pairs_per_s", Measure("scoring throughput", "pairs/s", 0.0)))
"""The precision study's panels: (column of `reports.precision_rows`, what it is)."""


def precision_figure(rows: list[dict[str, Any]]) -> go.Figure:
    """The precision study (rows of `reports.precision_rows`) side by side: held-out accuracy, peak memory,
    scoring throughput."""
    fig = make_subplots(rows=1, cols=len(PRECISION_PANELS), subplot_titles=[m.what for _, m in PRECISION_PANELS])
    names = [r["precision"] for r in rows]
    for col, (key, m) in enumerate(PRECISION_PANELS, start=1):
        fig.add_trace(go.Bar(x=names, y=[r[key] for r in rows], name=m.what, showlegend=False,
                             marker_color=[COLORS[i % len(COLORS)] for i in range(len(rows))]), row=1, col=col)
        _panel(fig, 1, col, m, x="precision", y=m.unit)
    fig.update_annotations(font_size=12)
    return _layout(fig, "Precision study", height=260)


def eval_figure(report: EvalReport | dict[str, Any]) -> go.Figure:
    """SFT vs the aligned policy (named after its algorithm) on held-out prompts: mean reward and gold score,
    those the run has, with ± one standard deviation; response length when it has neither (a DPO run without
    a reward model on human labels)."""
    report = parse(EvalReport, report)
    measures = {"reward": Measure("reward", reward_unit(report.reward_function, report.rewards)),
                "gold": Measure("gold score", report.gold_scorer or "gold scorer"),
                "response_tokens": Measure("response length", "tokens", 0.0)}
    shown = [m for m in ("reward", "gold")
             if getattr(report.sft, m) is not None and getattr(report.ppo, m) is not None] or ["response_tokens"]
    aligned = _label(report.algorithm)
    fig = make_subplots(rows=1, cols=len(shown), horizontal_spacing=0.15)
    for col, m in enumerate(shown, start=1):
        for i, (who, policy) in enumerate((("SFT", report.sft), (aligned, report.ppo))):
            summary = getattr(policy, m)
            fig.add_trace(go.Bar(x=[who], y=[summary.mean], name=who, showlegend=col == 1,
                                 error_y=dict(type="data", array=[summary.std or 0.0], visible=True),
                                 marker_color=COLORS[i]), row=1, col=col)
        _panel(fig, 1, col, measures[m], x="policy")
    return _layout(fig, f"SFT vs {aligned} (mean ± std)", height=280)


MEMORY_SERIES = {
    "mem/allocated_mb": "GPU allocated by tensors (at steps)",
    "mem/peak_mb": "GPU peak allocated (at steps)",
    "mem/reserved_mb": "GPU reserved by PyTorch (at steps)",
    "sys/gpu_used_mb": "GPU in use, all processes (sampled)",
    "mem/rss_mb": "job process RSS (at steps)",
    "sys/rss_mb": "job process RSS (sampled)",
}
"""The memory chart's series: a stage's `mem/*` at its steps (`edgerlhf.memory.snapshot`), the worker's `sys/*`
every few seconds between them (`edgerlhf.memory.sampled`); the first four exist only on a GPU."""
GPU_SERIES = ("mem/allocated_mb", "mem/peak_mb", "mem/reserved_mb", "sys/gpu_used_mb")


def stage_starts(feed: JobFeed) -> list[tuple[float, str]]:
    """(time of its first metric, stage) of each stage the feed has metrics of, in time order."""
    first: dict[str, float] = {}
    for (stage, _, _), row in feed.metrics.items():
        if _finite(row["time"]) and row["time"] < first.get(stage, math.inf):
            first[stage] = row["time"]
    return sorted((t, stage) for stage, t in first.items())


def memory_figure(feed: JobFeed, gpu_total_mb: float | None, smoothing: float = 0.0) -> go.Figure:
    """Memory over the whole job (all stages, by clock time) against the GPU's total when there is a GPU: one
    line per reading (`MEMORY_SERIES`) in time order, and a dotted line with the stage's name where each stage
    began."""
    fig = go.Figure()
    keys = [k for k in MEMORY_SERIES if gpu_total_mb or k not in GPU_SERIES]
    for i, key in enumerate(keys):
        rows = sorted((r for r in feed.timed(key) if _finite(r[0])), key=lambda r: r[0])
        if not rows:
            continue
        # Unix seconds -> datetimes, so the axis reads as clock time (local time of the dashboard host).
        points = [(datetime.fromtimestamp(t), v) for t, _, _, v in rows]
        text = [f"{stage_name(stage, feed.algorithm)} step {step}" for _, step, stage, _ in rows]
        dash = "dot" if key == "mem/rss_mb" and gpu_total_mb else None
        line(fig, points, MEMORY_SERIES[key], COLORS[i % len(COLORS)], smoothing, text=text, marker=dict(size=4),
             hovertemplate="%{y:,.0f} MB (%{text})", line=dict(dash=dash))
    for i, (t, stage) in enumerate(stage_starts(feed) if fig.data else ()):
        at = datetime.fromtimestamp(t)
        fig.add_shape(type="line", xref="x", yref="paper", x0=at, x1=at, y0=0, y1=1,
                      line=dict(color="gray", width=1, dash="dot"))
        # Stages a few seconds apart (data, then SFT) would print their names over each other: three heights.
        fig.add_annotation(x=at, xref="x", y=1 - 0.09 * (i % 3), yref="paper", text=stage_name(stage, feed.algorithm),
                           showarrow=False, xanchor="left", yanchor="top", font=dict(size=11, color="gray"))
    if gpu_total_mb:
        fig.add_hline(y=gpu_total_mb, line=dict(color="red", dash="dash"),
                      annotation_text=f"GPU total {gpu_total_mb:,.0f} MB", annotation_position="bottom right")
    _layout(fig, "Memory vs the GPU's total" if gpu_total_mb else "Process memory (RSS): no GPU", height=360)
    _x(fig, "clock time")
    _y(fig, MEMORY, also=[gpu_total_mb] if gpu_total_mb else ())
    return fig


# --- several jobs (the Compare page) -------------------------------------------------------------------


X_AXES = {"step": "step", "samples": "samples seen"}
"""The Compare page's common x-axes: a metric's own step, or the samples its stage had consumed by then
(`JobFeed.samples_per_step`: responses for PPO/GRPO/RLOO, preference pairs for DPO, labelled answers for KTO)."""


def _titles(titles: Iterable[str]) -> str:
    """One axis title for several runs: theirs if they agree, else each once."""
    return " / ".join(dict.fromkeys(titles))


def compare_figure(feeds: dict[str, JobFeed], name: str, x: str = "step", smoothing: float = 0.0) -> go.Figure:
    """Metric `name` of several jobs overlaid on a common x-axis (`X_AXES`).

    An alignment metric (`reward_mean`, no namespace) is read in each job's own algorithm's namespace, so a PPO
    job's `ppo/reward_mean` and a GRPO job's `grpo/reward_mean` share the chart; a full key (`sft/eval_loss`)
    is read as it is. On the samples axis a job whose metric has no samples per step is left out.
    """
    if x not in X_AXES:
        raise ValueError(f"unknown x-axis {x!r}; choose from {list(X_AXES)}")
    fig = go.Figure()
    drawn: dict[str, JobFeed] = {}
    for i, (label, feed) in enumerate(feeds.items()):
        pts = feed.series(feed.key(name))
        per_step = feed.samples_per_step(name)
        if not pts or (x == "samples" and per_step is None):
            continue
        if x == "samples":
            pts = [(step * per_step, value) for step, value in pts]
        line(fig, pts, label if "/" in name else f"{label} ({feed.algorithm})", COLORS[i % len(COLORS)], smoothing)
        drawn[label] = feed
    fig.update_layout(showlegend=True)  # even for one job: say which job a line is
    algorithms = ", ".join(dict.fromkeys(feed.algorithm for feed in drawn.values())) or "alignment"
    _layout(fig, name if "/" in name else f"{name} ({algorithms})")
    _x(fig, X_AXES[x])
    measures = [measure(feed, feed.key(name)) for feed in drawn.values()] or [measure(None, name)]
    _y(fig, measures[0], title=_titles(m.title for m in measures))
    return fig


def frontier_figure(feeds: dict[str, JobFeed]) -> go.Figure:
    """Reward against KL to the reference, the trade every alignment run makes.

    Each sampling run's training trajectory (one point per step, its batch's mean KL and reward), and each
    finished run's held-out pair from its evaluate report: the SFT policy at KL 0 and the aligned policy at
    its KL, joined by a dotted line. DPO and KTO sample nothing while they train, so they appear by that
    held-out pair (when the run has a reward model to score it).
    """
    fig = go.Figure()
    rewards = []
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
            rewards.append(measure(feed, feed.key("reward_mean")).title)
        ev = feed.report.evaluate if feed.report is not None else None
        if ev is not None and ev.sft.reward is not None and ev.ppo.reward is not None \
                and _finite(ev.sft.reward.mean) and _finite(ev.ppo.reward.mean) and _finite(ev.kl):
            aligned = _label(ev.algorithm)
            fig.add_trace(go.Scatter(x=[0.0, ev.kl], y=[ev.sft.reward.mean, ev.ppo.reward.mean],
                                     name=f"{name} held-out: SFT → {aligned}", legendgroup=label,
                                     text=["SFT", aligned], mode="lines+markers",
                                     marker=dict(size=[9, 15], symbol=["circle-open", "star"], color=color),
                                     line=dict(color=color, dash="dot"),
                                     hovertemplate="%{text}: KL %{x:.3g}, reward %{y:.3g} (held-out)"))
            rewards.append(Measure("reward", reward_unit(ev.reward_function, ev.rewards)).title)
    fig.update_layout(showlegend=True)
    _layout(fig, "Reward vs KL (training steps; ★ the aligned policy on held-out prompts)", height=420)
    fig.update_layout(hovermode="closest")  # points, not a step's column: the x-axis is KL
    _x(fig, KL.title)
    fig.layout.xaxis.rangemode = "nonnegative"
    fig.layout.yaxis.update(title_text=_titles(rewards) or Measure("reward", reward_unit()).title, title_font_size=12,
                            automargin=True)
    return fig


ROUND_MEASURES = {"gold": "gold score", "reward": "reward"}
"""What `rounds_figure` plots across a chain of rounds: the known-answer gold, or each round's own reward."""


def rounds_figure(rounds: Sequence[tuple[int, str, EvalReport | dict[str, Any]]], measure: str = "gold") -> go.Figure:
    """A chain of rounds of RLHF (round 1 → 2 → 3) on one measure of their evaluate reports: `rounds` is (round, job
    label, report) in order. Left, each round's start (its SFT policy: in a later round, the parent's aligned policy)
    and end (its aligned policy), mean ± one std on its held-out prompts; right, each round's gain, end − start per
    prompt, with its bootstrap interval. A round whose report lacks the measure is left out. A reward is each round's
    own reward model's score: its levels do not compare across rounds, its gains do; the gold is one scale for all."""
    if measure not in ROUND_MEASURES:
        raise ValueError(f"unknown measure {measure!r}; choose from {list(ROUND_MEASURES)}")
    parsed = [(n, label, parse(EvalReport, report)) for n, label, report in rounds]
    shown = [(n, label, r) for n, label, r in parsed
             if getattr(r.sft, measure) is not None and getattr(r.ppo, measure) is not None
             and getattr(r, f"{measure}_diff") is not None]
    units = [r.gold_scorer or "gold scorer" if measure == "gold" else reward_unit(r.reward_function, r.rewards)
             for _, _, r in shown]
    m = Measure(ROUND_MEASURES[measure], _titles(units) or ("gold scorer" if measure == "gold" else reward_unit()))
    gain = Measure(f"{ROUND_MEASURES[measure]} gain, end − start", m.unit)
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.14,
                        subplot_titles=("Start and end of each round (mean ± std)", "Gain of each round (interval)"))
    names = [f"round {n} · {label}" for n, label, _ in shown]
    for i, (side, who) in enumerate((("sft", "start (SFT; in a later round the parent's aligned policy)"),
                                     ("ppo", "end (the round's aligned policy)"))):
        summaries = [getattr(getattr(r, side), measure) for _, _, r in shown]
        fig.add_trace(go.Scatter(x=names, y=[s.mean for s in summaries], name=who, mode="lines+markers",
                                 marker=dict(size=9), line=dict(color=COLORS[i]),
                                 error_y=dict(type="data", array=[s.std or 0.0 for s in summaries], visible=True)),
                      row=1, col=1)
    diffs = [getattr(r, f"{measure}_diff") for _, _, r in shown]
    confidence = diffs[0].confidence if diffs else 0.95
    fig.add_trace(go.Bar(x=names, y=[d.mean for d in diffs], name=f"gain, end − start ({confidence:.0%} interval)",
                         marker_color=COLORS[2], error_y=dict(
                             type="data", symmetric=False, visible=True,
                             array=[(d.high - d.mean) if _finite(d.high) else 0.0 for d in diffs],
                             arrayminus=[(d.mean - d.low) if _finite(d.low) else 0.0 for d in diffs])), row=1, col=2)
    _panel(fig, 1, 1, m, x="round", y=m.title)
    _panel(fig, 1, 2, gain, x="round", y=gain.title)
    fig.update_xaxes(type="category")
    fig.update_annotations(font_size=12)
    fig.update_layout(showlegend=True)
    _layout(fig, f"Rounds of RLHF: {ROUND_MEASURES[measure]} by round", height=340)
    fig.update_layout(hovermode="closest")  # a round's points, not a column across both panels
    return fig


# --- probes and data ------------------------------------------------------------------------------------


def last_question(prompt: str) -> str:
    """The last human turn of a dialogue prompt (`...\n\nHuman: question\n\nAssistant:`), for labels."""
    text = prompt.rsplit("Human:", 1)[-1].split("Assistant:", 1)[0]
    return " ".join(text.split()) or "?"


def checkpoint_label(sample: dict[str, Any]) -> str:
    """The checkpoint that produced a sample (`sft/step-30`, `ppo/step-10`); `<stage>/step-<step>` when unnamed."""
    return sample["checkpoint"] or f"{sample['stage']}/step-{sample['step']}"


def checkpoint_name(label: str, algorithm: str) -> str:
    """A checkpoint label as a person reads it: the alignment stage's (stored as `ppo/step-10` whatever ran)
    under the job's algorithm, `grpo/step-10` of a GRPO job; any other label as it is."""
    stage, sep, rest = label.partition("/")
    return f"{algorithm}{sep}{rest}" if stage == "ppo" else label


def probe_reward_figure(rows: list[dict[str, Any]], order: list[str], scorer: str | None = None,
                        algorithm: str = "ppo") -> go.Figure:
    """The probe answers' scores per checkpoint, one line per probe prompt. A probe is scored with the gold
    scorer `scorer` (`gold.probe_score`: the same scale from SFT to the last aligned step; a reward model
    cannot be, SFT runs before it exists), so the axis says gold score, never reward; checkpoints read with
    the job's `algorithm` (`checkpoint_name`)."""
    fig = go.Figure()
    by_prompt: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["reward"] is not None:
            by_prompt.setdefault(r["prompt"], {})[checkpoint_label(r)] = r["reward"]
    names = [checkpoint_name(c, algorithm) for c in order]
    for i, (prompt, scores) in enumerate(by_prompt.items()):
        xs = [c for c in order if c in scores]
        short = last_question(prompt)[:40]
        fig.add_trace(go.Scatter(x=[checkpoint_name(c, algorithm) for c in xs], y=[scores[c] for c in xs],
                                 name=f"#{i + 1} {short}", mode="lines+markers",
                                 line=dict(color=COLORS[i % len(COLORS)])))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=names)
    _layout(fig, "Probe answers' gold score per checkpoint")
    _x(fig, "checkpoint")
    _y(fig, Measure("gold score", scorer or "gold scorer"))
    return fig


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
    _layout(fig, title)
    _x(fig, "length (tokens)")
    _y(fig, Measure("count", "records", 0.0))
    fig.update_layout(hovermode="closest", showlegend=False, bargap=0.05)
    return fig
