"""Stage reports (`GET /api/jobs/{id}/report`, the models of `edgerlhf.reports`) turned into table rows.

Every function takes a stage's report model, or its JSON, which it validates into that model first; then
it reads the model's fields by name. A renamed or missing field fails (pydantic's `ValidationError`, or
an `AttributeError` here) instead of leaving a blank cell or an empty chart.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel

from edgerlhf.contract import MEMORY_PREFIX
from edgerlhf.reports import EvalReport, Interval, PPOReport, RewardReport

if TYPE_CHECKING:
    from frontend.live import JobFeed

M = TypeVar("M", bound=BaseModel)
MB = 1024 * 1024

PRECISION_COLUMNS = ["precision", "accuracy", "mean_margin", "memory_footprint_mb", "peak_train_mb",
                     "throughput_pairs_per_s", "spearman_vs_bf16", "compute_dtype"]
"""The precision study's headline columns, first and in this order; the result's other scalar fields follow."""
_NOT_COLUMNS = {"normalization", "memory_footprint_bytes"}
"""Fields of `PrecisionResult` not shown as their own column (nested, or shown in MB)."""


def parse(model: type[M], report: M | dict[str, Any] | None) -> M | None:
    """`report` as `model`: validated when it is JSON, as is when it already is one (None stays None)."""
    if report is None or isinstance(report, model):
        return report
    return model.model_validate(report)


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def precision_rows(report: RewardReport | dict[str, Any] | None) -> list[dict[str, Any]]:
    """The reward stage's precision study (`RewardReport.precisions`) as one row per precision.

    The headline columns first (`PRECISION_COLUMNS`; the weights' `memory_footprint_bytes` shown in MB), then
    every other scalar field of `PrecisionResult`.
    """
    report = parse(RewardReport, report)
    if report is None:
        return []
    rows = []
    for name, r in report.precisions.items():
        row: dict[str, Any] = {
            "precision": name, "accuracy": r.accuracy, "mean_margin": r.mean_margin,
            "memory_footprint_mb": round(r.memory_footprint_bytes / MB, 2), "peak_train_mb": r.peak_train_mb,
            "throughput_pairs_per_s": r.throughput_pairs_per_s, "spearman_vs_bf16": r.spearman_vs_bf16,
            "compute_dtype": r.compute_dtype}
        for field in type(r).model_fields:
            if field not in row and field not in _NOT_COLUMNS and _scalar(value := getattr(r, field)):
                row[field] = value
        rows.append(row)
    return rows


def flatten(d: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a nested report (as plain data) as `a/b/c` -> value."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif isinstance(d, (int, float)) and not isinstance(d, bool):
        out[prefix.rstrip("/")] = d
    return out


def _diff(row: dict[str, Any], diff: Interval | None) -> None:
    """The PPO - SFT difference of a row and its bootstrap interval, from an `Interval`."""
    if diff is None or diff.mean is None:
        return
    row["PPO − SFT"] = diff.mean
    if diff.low is not None and diff.high is not None:
        row["interval"] = f"[{diff.low:+.3g}, {diff.high:+.3g}] ({diff.confidence:.0%})"


def eval_rows(report: EvalReport | dict[str, Any] | None) -> list[dict[str, Any]]:
    """SFT vs PPO per measure: reward, the validation reward model's score, gold score and the gold at equal length
    (no means: a difference within length strata), response length, then the shares of responses that hit the length
    cap or came out empty; means, difference, its interval. Rows whose fields an older report lacks are left out."""
    report = parse(EvalReport, report)
    if report is None:
        return []
    sft, ppo = report.sft, report.ppo
    rows = []
    if sft.reward is not None and ppo.reward is not None:  # None: a run without a reward model (DPO)
        source = f"function {report.reward_function}" if report.reward_function else f"RM {report.reward_precision}"
        reward = {"measure": f"reward ({source})", "SFT": sft.reward.mean, "PPO": ppo.reward.mean}
        _diff(reward, report.reward_diff)
        rows.append(reward)
    if sft.validation_reward is not None and ppo.validation_reward is not None:  # reward.validation
        validation = {"measure": "validation reward (RM never trained against)", "SFT": sft.validation_reward.mean,
                      "PPO": ppo.validation_reward.mean}
        _diff(validation, report.validation_reward_diff)
        rows.append(validation)
    if sft.gold is not None and ppo.gold is not None:
        gold = {"measure": f"gold score ({report.gold_scorer})", "SFT": sft.gold.mean, "PPO": ppo.gold.mean}
        _diff(gold, report.gold_diff)
        rows.append(gold)
        if report.gold_diff_equal_length is not None:
            equal = {"measure": "gold at equal length", "SFT": None, "PPO": None}
            _diff(equal, report.gold_diff_equal_length)
            rows.append(equal)
    tokens: dict[str, Any] = {"measure": "response tokens", "SFT": sft.response_tokens.mean,
                              "PPO": ppo.response_tokens.mean}
    if report.length_diff is not None:
        _diff(tokens, report.length_diff)
    elif tokens["SFT"] is not None and tokens["PPO"] is not None:
        tokens["PPO − SFT"] = tokens["PPO"] - tokens["SFT"]
    rows.append(tokens)
    for measure, field in ((f"hit the {report.response_length}-token cap", "cap_hit_rate"),
                           ("empty answers", "empty_rate")):
        shares = getattr(sft, field), getattr(ppo, field)
        if None not in shares:
            rows.append({"measure": measure, "SFT": shares[0], "PPO": shares[1], "PPO − SFT": shares[1] - shares[0]})
    return rows


def eval_headline(report: EvalReport | dict[str, Any] | None) -> dict[str, float]:
    """The few numbers of the final report a person reads first (for the Compare page's table).

    The gold numbers only on the known-answer task (without a gold scorer they are None and left out), the
    reward numbers only with a reward model. "PPO" is the aligned policy, whichever algorithm trained it.
    """
    report = parse(EvalReport, report)
    if report is None:
        return {}
    scored = report.sft.reward is not None and report.ppo.reward is not None
    out = {"reward SFT": report.sft.reward.mean if scored else None,
           "reward PPO": report.ppo.reward.mean if scored else None,
           "reward PPO−SFT": report.reward_diff.mean if report.reward_diff is not None else None,
           "win rate": report.win_rate, "KL": report.kl,
           "gold PPO−SFT": report.gold_diff.mean if report.gold_diff is not None else None,
           "gold PPO−SFT at equal length": (report.gold_diff_equal_length.mean
                                            if report.gold_diff_equal_length is not None else None),
           "gold win rate": report.gold_win_rate,
           "length PPO−SFT": report.length_diff.mean if report.length_diff is not None else None,
           "PPO cap hits": report.ppo.cap_hit_rate}
    return {k: v for k, v in out.items() if v is not None}


def eval_scalars(report: EvalReport | dict[str, Any] | None) -> dict[str, float]:
    """Every number of the evaluate report except the samples, flattened (`sft/reward/mean` ...)."""
    report = parse(EvalReport, report)
    if report is None:
        return {}
    return flatten(report.model_dump(mode="json", exclude={"samples"}))


def eval_pairs(report: EvalReport | dict[str, Any] | None) -> list[dict[str, Any]]:
    """The SFT-vs-PPO sample pairs of the evaluate report (`SamplePair` fields: `prompt`, `sft`, `ppo`,
    `sft_reward`, `ppo_reward`, `sft_gold`, `ppo_gold`)."""
    report = parse(EvalReport, report)
    if report is None:
        return []
    return [pair.model_dump() for pair in report.samples]


# --- the verdict: did alignment help? ------------------------------------------------------------

BETTER, WORSE, NO_CHANGE = "better, significant", "worse, significant", "no detectable change"
"""The plain readings of a difference's interval (`reading`)."""


def reading(interval: Interval | dict[str, Any] | None, null: float = 0.0, up: str = BETTER,
            down: str = WORSE) -> str | None:
    """What a bootstrap interval of a difference says: `up` when it lies wholly above `null` (0: no difference),
    `down` wholly below, `NO_CHANGE` when it holds `null`; None without an interval."""
    interval = parse(Interval, interval)
    if interval is None or interval.low is None or interval.high is None:
        return None
    if interval.low > null:
        return up
    if interval.high < null:
        return down
    return NO_CHANGE


@dataclass(frozen=True)
class Finding:
    """One measure of the aligned policy against SFT on the held-out prompts."""

    measure: str
    unit: str
    """What the numbers count, in words."""
    sft: float | None
    aligned: float | None
    change: Interval
    """Aligned − SFT per prompt (a share, for the judge), with its bootstrap interval."""
    reading: str
    """`reading` of `change`."""
    null: float = 0.0
    """The value of `change` that means "no difference" (0.5 for the judge's share)."""


@dataclass(frozen=True)
class Verdict:
    """The evaluate report read as an answer to "did alignment help?" (`verdict`)."""

    algorithm: str
    findings: list[Finding]
    """Reward, gold, gold at equal length, judge: those the report has."""
    length: Finding | None
    kl: float | None
    """KL of the aligned policy from SFT, nats per answer."""
    n_prompts: int
    samples_per_prompt: int
    confidence: float


def _unit_of_reward(report: EvalReport) -> str:
    if report.reward_function:
        return f"score of the reward function `{report.reward_function}`"
    if report.rewards:
        return f"weighted sum of the rewards {', '.join(report.rewards)}"
    return (f"reward-model score ({report.reward_precision}), in standard deviations of its scores on the training "
            "answers")


def verdict(report: EvalReport | dict[str, Any] | None) -> Verdict | None:
    """The evaluate report as findings with a plain reading each (better / worse, significant, or no detectable
    change, from whether the interval excludes "no difference"), the KL and the length change; None without a
    report. Every number is the report's; nothing is recomputed."""
    report = parse(EvalReport, report)
    if report is None:
        return None
    sft, ppo = report.sft, report.ppo

    def finding(measure: str, unit: str, before: Any, after: Any, change: Interval | None, null: float = 0.0,
                up: str = BETTER, down: str = WORSE) -> Finding | None:
        if change is None or change.mean is None:
            return None
        return Finding(measure, unit, getattr(before, "mean", before), getattr(after, "mean", after), change,
                       reading(change, null, up, down) or "no interval (too few prompts)", null)

    found = [
        finding("reward", _unit_of_reward(report), sft.reward, ppo.reward, report.reward_diff),
        finding("gold score", f"the known-answer task's true score ({report.gold_scorer})", sft.gold, ppo.gold,
                report.gold_diff),
        finding("gold score at equal length", "the true score compared within answers of equal length: a gain here "
                "is content, not length", None, None, report.gold_diff_equal_length),
        finding("judge preference", "share of answer pairs where the judge preferred the aligned answer, both orders "
                "asked (0.5: no preference)", None, report.judge_win_rate, report.judge_win_rate, null=0.5),
    ]
    length = finding("answer length", "tokens per answer", sft.response_tokens, ppo.response_tokens,
                     report.length_diff, up="longer, significant", down="shorter, significant")
    return Verdict(report.algorithm, [f for f in found if f is not None], length, report.kl, report.n_prompts,
                   report.samples_per_prompt, report.confidence)


def result_columns(result: dict[str, Any] | None) -> dict[str, Any]:
    """A job's result columns in the Jobs list, from its compact `JobSummary.result` (the evaluate report's
    headline): the reward and gold change, the KL, and the reading of the reward's interval (of the gold's, marked,
    for a run without rewards); None where there is none."""
    result = result or {}
    reward, gold = parse(Interval, result.get("reward_diff")), parse(Interval, result.get("gold_diff"))
    said = reading(reward) or (f"{reading(gold)} (gold)" if reading(gold) else None)
    return {"reward Δ": reward.mean if reward is not None else None, "reading": said,
            "gold Δ": gold.mean if gold is not None else None, "KL": result.get("kl")}


def best_policy_line(report: PPOReport | dict[str, Any] | None) -> str | None:
    """What the alignment stage wrote with `ppo.keep_best`: "best policy: step K by <signal>", the smoothed value,
    and where the stage stopped early; None when it wrote the last policy (or has not finished)."""
    report = parse(PPOReport, report)
    if report is None or report.best_step is None:
        return None
    signal = {"validation": "the validation reward model", "gold": "the gold"}.get(report.best_signal,
                                                                                   report.best_signal)
    line = f"best policy: step {report.best_step} by {signal}"
    if report.best_value is not None:
        line += f" ({report.best_value:.4g} smoothed)"
    if report.stopped_early_at is not None:
        line += f"; stopped early at step {report.stopped_early_at} of {report.steps}"
    return line


# --- the Compare page ----------------------------------------------------------------------------


def run_row(label: str, feed: JobFeed) -> dict[str, Any]:
    """One run of the Compare page's table, the same columns whatever its algorithm.

    From the alignment stage's report (`PPOReport`) and metrics: its training reward at the end (the mean of
    its last steps; the latest step while it runs; none for DPO, which samples nothing), its peak memory
    (`mem/peak_mb` on a GPU, else the process's peak RSS) and time per step (the mean of its `<algorithm>/step_s`).
    From the evaluate report, the aligned policy on held-out prompts: reward, gain over SFT, gold gain (with a
    gold scorer), KL and response length. What a run has not measured yet is None.
    """
    reports = feed.report
    aligned = reports.ppo if reports is not None else None
    ev = reports.evaluate if reports is not None else None
    reward_key = feed.key("reward_mean")
    step_s = [v for _, v in feed.series(feed.key("step_s")) if v is not None]
    peak_mb, peak_of = None, None
    if aligned is not None:
        gpu_peak = aligned.memory.get(f"{MEMORY_PREFIX}peak_mb")
        peak_mb, peak_of = (gpu_peak, "GPU") if gpu_peak is not None else (aligned.peak_rss_mb, "RSS")
    return {
        "job": label,
        "algorithm": feed.algorithm,
        "steps": aligned.steps if aligned is not None else max((s for s, _ in feed.series(feed.key("step_s"))),
                                                               default=None),
        "final reward (training)": aligned.final.get(reward_key) if aligned is not None else feed.last(reward_key),
        "reward (held-out)": ev.ppo.reward.mean if ev is not None and ev.ppo.reward is not None else None,
        "reward gain": ev.reward_diff.mean if ev is not None and ev.reward_diff is not None else None,
        "gold gain": ev.gold_diff.mean if ev is not None and ev.gold_diff is not None else None,
        "KL (held-out)": ev.kl if ev is not None else None,
        "response tokens": ev.ppo.response_tokens.mean if ev is not None else None,
        "peak memory (MB)": peak_mb,
        "peak of": peak_of,
        "s / step": sum(step_s) / len(step_s) if step_s else None,
    }


def side_by_side(evals: dict[str, EvalReport | dict[str, Any] | None]) -> list[dict[str, Any]]:
    """The held-out prompts shown in the runs' evaluate reports (`EvalReport.samples`), each with every run's
    answer: `{"prompt", "answers": {label: SamplePair fields or None}}`. Prompts every run answered come first,
    in the order the reports list them; a run that did not show a prompt has None there."""
    parsed = {label: parse(EvalReport, report) for label, report in evals.items() if report is not None}
    answers: dict[str, dict[str, dict[str, Any]]] = {}
    for label, report in parsed.items():
        for pair in report.samples:
            answers.setdefault(pair.prompt, {}).setdefault(label, pair.model_dump())
    rows = [{"prompt": prompt, "answers": {label: by_run.get(label) for label in parsed}}
            for prompt, by_run in answers.items()]
    return sorted(rows, key=lambda row: sum(a is None for a in row["answers"].values()))  # stable sort


def config_overrides(config: dict[str, Any], preset: dict[str, Any]) -> dict[str, Any]:
    """The fields of a job's resolved `config` whose values differ from its `preset`'s, nested as the overrides
    of `POST /api/jobs` are: what a person changed, and what a clone of the job sends again."""
    changed: dict[str, Any] = {}
    for key, value in config.items():
        base = preset.get(key)
        if isinstance(value, dict) and isinstance(base, dict):
            inner = config_overrides(value, base)
            if inner:
                changed[key] = inner
        elif key not in preset or value != base:
            changed[key] = value
    return changed


def override_rows(config: dict[str, Any], preset: dict[str, Any]) -> list[dict[str, Any]]:
    """`config_overrides` as table rows, one per changed field: its dotted path (as `--set` and the form name it),
    the job's value and the preset's as text (a string as it is, anything else as JSON), the preset's None where the
    preset has no such field."""
    def shown(value: Any) -> str:
        return value if isinstance(value, str) else json.dumps(value)

    def walk(changed: dict[str, Any], base: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
        rows = []
        for key, value in changed.items():
            before = base.get(key) if isinstance(base, dict) else None
            if isinstance(value, dict) and isinstance(before, dict):
                rows += walk(value, before, f"{prefix}{key}.")
            else:
                absent = not isinstance(base, dict) or key not in base
                rows.append({"field": f"{prefix}{key}", "this job": shown(value),
                             "preset": None if absent else shown(before)})
        return rows

    return walk(config_overrides(config, preset), preset, "")
