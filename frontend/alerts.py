"""Warnings a person watching a run would otherwise miss, as pure functions of the metric series.

- Reward rising while KL or the response length runs away: the policy is likely exploiting the reward
  model (reward hacking; Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization").
- The proxy reward rising while a signal the policy does not train on (the validation reward model, the
  known-answer gold) stays flat or falls: the policy is getting better at the reward model, not at the task
  (reward hacking seen directly, `proxy_divergence`).
- KL far above its target while the reward does not rise: the policy drifts away for nothing (KL blow-up).
- Responses shrinking towards nothing: the policy may be collapsing to empty answers (length collapse).
- KL collapsing to zero: the policy stopped moving away from the reference (learning rate too low,
  KL coefficient too high, or the adapter is not being trained).
- NaN or infinite losses / rewards.
- Memory close to the GPU's total (the next spike is an out-of-memory error).
- A step that ran out of memory and was retried on a smaller micro-batch (`edgerlhf.oom`).

The module is named `alerts` rather than `warnings` because Streamlit puts `frontend/` on `sys.path`,
where a `warnings.py` would shadow the standard library's.

Series are `{key: [(step, value), ...]}` sorted by step; values may be `None` (a NaN the backend could not
put into JSON). The alignment checks read the metrics of the job's algorithm (`grpo/kl` for a GRPO job,
`contract.algorithm_metric`); `check_job` takes the algorithm and the limits from the job's config. Nothing
here imports Streamlit, so the checks are unit-tested directly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

from edgerlhf.contract import MICRO_BATCH_METRIC, algorithm_metric, algorithm_traits
from frontend.live import job_algorithm

Series = dict[str, list[tuple[int, float | None]]]


@dataclass(frozen=True)
class Alert:
    level: str
    """`warning` or `error`."""
    code: str
    """Stable identifier: `reward_hacking`, `proxy_divergence`, `kl_blowup`, `length_collapse`, `kl_collapse`, `nan`,
    `memory`, `out_of_memory`."""
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


def _values(series: Series, algorithm: str, name: str) -> list[float]:
    """The finite values of the alignment metric `name` of `algorithm` (`grpo/kl`)."""
    return _finite(v for _, v in series.get(algorithm_metric(algorithm, name), []))


def _reward_rise(series: Series, algorithm: str, min_points: int) -> tuple[float, float] | None:
    """(first-third mean, last-third mean) of the reward when it rises: the last third above the first by more
    than a tenth of its range; None when it does not rise or has fewer than `min_points` points."""
    reward = _values(series, algorithm, "reward_mean")
    if len(reward) < min_points:
        return None
    r0, r1 = _ends(reward)
    spread = max(reward) - min(reward)
    return (r0, r1) if spread > 0 and r1 - r0 > 0.1 * spread else None


def reward_hacking(series: Series, min_points: int = 6, kl_growth: float = 3.0, kl_floor: float = 1.0,
                   kl_limit: float | None = None, length_growth: float = 1.5,
                   max_response_length: int | None = None, algorithm: str = "ppo") -> list[Alert]:
    """Reward going up while KL or response length runs away.

    The reward counts as rising when the mean of its last third exceeds the mean of its first third by
    more than a tenth of its range. KL runs away when its last third is `kl_growth` times its first third
    (and above `kl_floor` nats, so noise around zero does not fire) or above `kl_limit`. The response
    length runs away when it grows by `length_growth` times or sits at `max_response_length`.
    """
    rise = _reward_rise(series, algorithm, min_points)
    if rise is None:
        return []
    r0, r1 = rise
    alerts = []
    kl = _values(series, algorithm, "kl")
    if len(kl) >= min_points:
        k0, k1 = _ends(kl)
        grew = k1 > kl_floor and k1 > kl_growth * max(k0, 1e-8)
        over = kl_limit is not None and k1 > kl_limit
        if grew or over:
            alerts.append(Alert("warning", "reward_hacking",
                                f"Reward rising ({r0:.3g} → {r1:.3g}) while KL runs away ({k0:.3g} → {k1:.3g} nats): "
                                "the policy may be exploiting the reward model. Raise the KL coefficient or "
                                "lower the target KL, and read the samples."))
    length = _values(series, algorithm, "response_length")
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


def trend(values: list[float]) -> tuple[float, float]:
    """(change, its standard error) of a noisy series: the mean of its last third minus that of its first third
    (`_ends`), and the noise of such a difference, sigma * sqrt(2 / k) for thirds of k points, where the noise per
    point sigma is read from the step-to-step differences (std / sqrt 2), which a steady trend does not inflate."""
    k = max(2, len(values) // 3)
    first, last = _ends(values)
    diffs = [b - a for a, b in zip(values, values[1:])]
    mean = sum(diffs) / len(diffs)
    sigma = math.sqrt(sum((d - mean) ** 2 for d in diffs) / max(1, len(diffs) - 1) / 2)
    return last - first, sigma * math.sqrt(2 / k)


INDEPENDENT = (("validation_reward_mean", "the validation reward model's score"), ("gold_mean", "the gold score"))
"""The signals of the rollouts the policy is not trained on (`rollout.independent_metrics`), in words."""


def proxy_divergence(series: Series, min_points: int = 8, rise: float = 2.0, allowance: float = 1.0,
                     algorithm: str = "ppo") -> list[Alert]:
    """The proxy reward (`reward_mean`, what the policy is trained against) rising over the recent steps while an
    independent signal of the same rollouts (`INDEPENDENT`) does not: one alert per such signal.

    Recent steps: the later half of the steps where both were logged, at least `min_points`. Each side's `trend`
    compares the mean of the last third of them with the first third's, against the noise of that difference: the
    proxy rises when its change exceeds `rise` standard errors, the signal counts as flat or falling when its change
    stays under `allowance` standard errors (a signal that rises more than that, even slower than the proxy, is
    left alone).
    """
    def finite(name: str) -> dict[int, float]:
        return {step: v for step, v in series.get(algorithm_metric(algorithm, name), [])
                if v is not None and math.isfinite(v)}

    proxy = finite("reward_mean")
    alerts = []
    for name, words in INDEPENDENT:
        other = finite(name)
        steps = sorted(set(proxy) & set(other))
        if len(steps) < min_points:
            continue
        recent = steps[-max(min_points, len(steps) // 2):]
        p_change, p_error = trend([proxy[s] for s in recent])
        o_change, o_error = trend([other[s] for s in recent])
        if not (p_change > 0 and p_change > rise * p_error and o_change <= allowance * o_error):
            continue
        p0, p1 = _ends([proxy[s] for s in recent])
        o0, o1 = _ends([other[s] for s in recent])
        alerts.append(Alert(
            "warning", "proxy_divergence",
            f"The proxy reward rose ({p0:.3g} → {p1:.3g}) over steps {recent[0]}–{recent[-1]} while {words}, which "
            f"the policy is not trained on, did not ({o0:.3g} → {o1:.3g}): the policy is likely getting better at "
            "the reward model, not at the task (reward hacking; Gao et al. 2022). The chart \"Proxy vs independent "
            "signal\" shows where they part. Stop early (re-run with ppo.steps ending before that step), or lower "
            "the learning rate, or raise the KL coefficient (ppo.init_kl_coef, or a lower ppo.target_kl)."))
    return alerts


def kl_blowup(series: Series, kl_limit: float | None, min_points: int = 6, algorithm: str = "ppo") -> list[Alert]:
    """KL's last third above `kl_limit` while the reward does not rise (a rising reward makes it
    `reward_hacking`): the policy moves away from the reference and gains nothing for it."""
    kl = _values(series, algorithm, "kl")
    if kl_limit is None or len(kl) < min_points or _reward_rise(series, algorithm, min_points) is not None:
        return []
    k0, k1 = _ends(kl)
    if k1 <= kl_limit:
        return []
    return [Alert("warning", "kl_blowup",
                  f"KL to the reference is {k1:.3g} nats (from {k0:.3g}), over {kl_limit:.3g}, and the reward is not "
                  "rising: the policy drifts away for nothing. Lower the learning rate or raise the KL coefficient.")]


def length_collapse(series: Series, min_points: int = 6, drop: float = 0.4, min_tokens: float = 4.0,
                    algorithm: str = "ppo") -> list[Alert]:
    """Responses shrinking to under `drop` times their early length (which was at least `min_tokens`): the
    policy may be learning that an (almost) empty answer pays, whether or not the reward rises."""
    length = _values(series, algorithm, "response_length")
    if len(length) < min_points:
        return []
    l0, l1 = _ends(length)
    if l0 < min_tokens or l1 >= drop * l0:
        return []
    return [Alert("warning", "length_collapse",
                  f"Responses shrink from {l0:.3g} to {l1:.3g} tokens: the policy may be collapsing to (almost) empty "
                  "answers. Read the samples; if they are empty, the reward model pays for ending early.")]


def kl_collapse(series: Series, eps: float = 1e-3, last: int = 3, min_points: int = 5,
                algorithm: str = "ppo") -> list[Alert]:
    """KL to the reference stuck at (or below) zero over the last `last` steps of the alignment stage; not for an
    algorithm whose KL is a clamped estimate (`Algorithm.exact_kl`: KTO's), whose zero says nothing of the policy."""
    kl = _values(series, algorithm, "kl")
    if len(kl) < min_points or not algorithm_traits(algorithm).exact_kl:
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
              max_response_length: int | None = None, algorithm: str = "ppo") -> list[Alert]:
    """Every check above, the alignment ones on `algorithm`'s metrics; errors first."""
    kl_limit = 2 * target_kl if target_kl else None
    alerts = (nan_values(series)
              + reward_hacking(series, kl_limit=kl_limit, max_response_length=max_response_length,
                               algorithm=algorithm)
              + proxy_divergence(series, algorithm=algorithm)
              + kl_blowup(series, kl_limit, algorithm=algorithm)
              + length_collapse(series, algorithm=algorithm)
              + kl_collapse(series, algorithm=algorithm)
              + memory_near_limit(series, gpu_total_mb)
              + out_of_memory_retries(series))
    return sorted(alerts, key=lambda a: a.level != "error")


def check_job(job: dict[str, Any], series: Series, gpu_total_mb: float | None = None) -> list[Alert]:
    """`check_all` for a job (`JobPublic`): its algorithm's metrics; for the algorithms that sample, the KL
    limit (twice `ppo.target_kl`) and the length cap (`ppo.response_length`) of its config. DPO and KTO sample
    nothing while they train: only their NaN, KL-collapse (DPO's) and memory checks apply."""
    algorithm = job_algorithm(job)
    sampling = algorithm_traits(algorithm).samples
    ppo = job["config"].get("ppo", {})
    return check_all(series, gpu_total_mb=gpu_total_mb, algorithm=algorithm,
                     target_kl=ppo.get("target_kl") if sampling else None,
                     max_response_length=ppo.get("response_length") if sampling else None)
