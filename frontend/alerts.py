"""Warnings a person watching a run would otherwise miss, as pure functions of the metric series.

- Reward rising while KL or the response length runs away: the policy is likely exploiting the reward
  model (reward hacking; Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").
- KL collapsing to zero: the policy stopped moving away from the reference (learning rate too low,
  KL coefficient too high, or the adapter is not being trained).
- NaN or infinite losses / rewards.
- Memory close to the GPU's total (the next spike is an out-of-memory error).
- A step that ran out of memory and was retried on a smaller micro-batch (`edgerlhf.oom`).

The module is named `alerts` rather than `warnings` because Streamlit puts `frontend/` on `sys.path`,
where a `warnings.py` would shadow the standard library's.

Series are `{key: [(step, value), ...]}` sorted by step; values may be `None` (a NaN the backend could not
put into JSON). Nothing here imports Streamlit, so the checks are unit-tested directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable

from edgerlhf.contract import MICRO_BATCH_METRIC

Series = dict[str, list[tuple[int, float | None]]]


@dataclass(frozen=True)
class Alert:
    level: str
    """`warning` or `error`."""
    code: str
    """Stable identifier: `reward_hacking`, `kl_collapse`, `nan`, `memory`."""
    message: str


def _finite(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _ends(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last third of a series (at least two points each)."""
    k = max(2, len(values) // 3)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def nan_values(series: Series) -> list[Alert]:
    """Any loss, reward or KL that became NaN or infinite, with the first step it happened at."""
    alerts = []
    for key in sorted(series):
        watched = "loss" in key or key.endswith(("reward_mean", "/kl", "approx_kl", "perplexity"))
        if not watched:
            continue
        bad = [step for step, v in series[key] if v is None or not math.isfinite(v)]
        if bad:
            alerts.append(Alert("error", "nan",
                                f"`{key}` is NaN/inf from step {bad[0]} ({len(bad)} of {len(series[key])} points): "
                                "training diverged; lower the learning rate or check the data."))
    return alerts


def reward_hacking(series: Series, min_points: int = 6, kl_growth: float = 3.0, kl_floor: float = 1.0,
                   kl_limit: float | None = None, length_growth: float = 1.5,
                   max_response_length: int | None = None) -> list[Alert]:
    """Reward going up while KL or response length runs away.

    The reward counts as rising when the mean of its last third exceeds the mean of its first third by
    more than a tenth of its range. KL runs away when its last third is `kl_growth` times its first third
    (and above `kl_floor` nats, so noise around zero does not fire) or above `kl_limit`. The response
    length runs away when it grows by `length_growth` times or sits at `max_response_length`.
    """
    reward = _finite(v for _, v in series.get("ppo/reward_mean", []))
    if len(reward) < min_points:
        return []
    r0, r1 = _ends(reward)
    spread = max(reward) - min(reward)
    if not (r1 - r0 > 0.1 * spread and spread > 0):
        return []
    alerts = []
    kl = _finite(v for _, v in series.get("ppo/kl", []))
    if len(kl) >= min_points:
        k0, k1 = _ends(kl)
        grew = k1 > kl_floor and k1 > kl_growth * max(k0, 1e-8)
        over = kl_limit is not None and k1 > kl_limit
        if grew or over:
            alerts.append(Alert("warning", "reward_hacking",
                                f"Reward rising ({r0:.3g} → {r1:.3g}) while KL runs away ({k0:.3g} → {k1:.3g} nats): "
                                "the policy may be exploiting the reward model. Raise the KL coefficient or "
                                "lower the target KL, and read the samples."))
    length = _finite(v for _, v in series.get("ppo/response_length", []))
    if len(length) >= min_points:
        l0, l1 = _ends(length)
        grew = l1 > length_growth * max(l0, 1e-8)
        capped = max_response_length is not None and l1 >= 0.95 * max_response_length and l0 < 0.95 * max_response_length
        if grew or capped:
            alerts.append(Alert("warning", "reward_hacking",
                                f"Reward rising ({r0:.3g} → {r1:.3g}) while responses grow ({l0:.3g} → {l1:.3g} tokens"
                                + (f", limit {max_response_length}" if capped else "")
                                + "): the reward model may be paying for length, not quality."))
    return alerts


def kl_collapse(series: Series, eps: float = 1e-3, last: int = 3, min_points: int = 5) -> list[Alert]:
    """KL to the reference stuck at (or below) zero over the last `last` PPO steps."""
    kl = _finite(v for _, v in series.get("ppo/kl", []))
    if len(kl) < min_points:
        return []
    tail = kl[-last:]
    if all(v < eps for v in tail):
        was = max(kl[:-last], default=0.0)
        before = f" (it was {was:.3g} earlier)" if was >= eps else ""
        return [Alert("warning", "kl_collapse",
                      f"KL to the reference is ≈0 over the last {len(tail)} steps ({tail[-1]:.2g}){before}: "
                      "the policy is not moving. Check the learning rate and the KL coefficient.")]
    return []


def memory_near_limit(series: Series, gpu_total_mb: float | None, fraction: float = 0.9) -> list[Alert]:
    """Peak (or allocated/reserved) GPU memory above `fraction` of the GPU's total."""
    if not gpu_total_mb:
        return []
    used = _finite(v for key in ("mem/peak_mb", "mem/reserved_mb", "mem/allocated_mb", "sys/gpu_used_mb")
                   for _, v in series.get(key, []))
    if not used:
        return []
    peak = max(used)
    if peak < fraction * gpu_total_mb:
        return []
    level = "error" if peak >= 0.98 * gpu_total_mb else "warning"
    return [Alert(level, "memory",
                  f"GPU memory peaked at {peak:,.0f} MB of {gpu_total_mb:,.0f} MB ({peak / gpu_total_mb:.0%}): "
                  "close to out-of-memory. Lower the batch size or sequence length, or quantize the reward model.")]


def out_of_memory_retries(series: Series) -> list[Alert]:
    """Steps that ran out of memory and went on with half the micro-batch (the metric `mem/micro_batch`)."""
    retries = [(step, v) for step, v in series.get(MICRO_BATCH_METRIC, []) if v is not None]
    if not retries:
        return []
    step, size = retries[-1]
    return [Alert("warning", "out_of_memory",
                  f"ran out of memory {len(retries)} time(s); since step {step} the micro-batch is {size:.0f} rows, "
                  "accumulated to the same effective batch (slower, same maths). The logs say which stage.")]


def check_all(series: Series, gpu_total_mb: float | None = None, target_kl: float | None = None,
              max_response_length: int | None = None) -> list[Alert]:
    """Every check above; errors first."""
    kl_limit = 2 * target_kl if target_kl else None
    alerts = (nan_values(series)
              + reward_hacking(series, kl_limit=kl_limit, max_response_length=max_response_length)
              + kl_collapse(series)
              + memory_near_limit(series, gpu_total_mb)
              + out_of_memory_retries(series))
    return sorted(alerts, key=lambda a: a.level != "error")
