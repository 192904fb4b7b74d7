"""Stage reports (`<stage>/report.json`, from `GET /api/jobs/{id}/report`) turned into table rows."""

from __future__ import annotations

from typing import Any


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


MB = 1024 * 1024


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def precision_rows(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The reward stage's precision study (`reward/report.json`, key `precisions`) as one row per precision.

    Scalar fields only; the weights' footprint in bytes is shown in MB.
    """
    if not isinstance(report, dict):
        return []
    table = report.get("precisions") or report.get("study") or report.get("results") or report
    if isinstance(table, dict):
        items = [(k, v) for k, v in table.items() if isinstance(v, dict)]
    elif isinstance(table, list):
        items = [(v.get("precision"), v) for v in table if isinstance(v, dict)]
    else:
        items = []
    rows = []
    for name, v in items:
        row: dict[str, Any] = {"precision": name}
        for k, x in v.items():
            if k == "precision" or not _scalar(x):
                continue
            if k.endswith("_bytes") and _num(x):
                row[k[: -len("_bytes")] + "_mb"] = round(x / MB, 2)
            else:
                row[k] = x
        rows.append(row)
    # The study's headline columns first, in a fixed order; whatever else the stage reports follows.
    first = ["precision", "accuracy", "mean_margin", "memory_footprint_mb", "peak_train_mb",
             "throughput_pairs_per_s", "spearman_vs_bf16", "compute_dtype"]
    return [{**{k: r[k] for k in first if k in r}, **{k: v for k, v in r.items() if k not in first}} for r in rows]


def flatten(d: Any, prefix: str = "") -> dict[str, float]:
    """Every number of a nested report as `a/b/c` -> value."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}/"))
    elif _num(d):
        out[prefix.rstrip("/")] = d
    return out


def _mean(d: Any) -> float | None:
    if isinstance(d, dict):
        return d.get("mean") if _num(d.get("mean")) else None
    return d if _num(d) else None


def eval_rows(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """SFT vs PPO per measure (reward, gold score, response length): means, difference, its interval."""
    if not isinstance(report, dict):
        return []
    sft, ppo = report.get("sft") or {}, report.get("ppo") or {}
    measures = [("reward", f"reward (RM {report.get('reward_precision') or '?'})", "reward_diff"),
                ("gold", f"gold score ({report.get('gold_scorer')})", "gold_diff"),
                ("response_tokens", "response tokens", None)]
    rows = []
    for key, label, diff_key in measures:
        if key not in sft and key not in ppo:
            continue
        row: dict[str, Any] = {"measure": label, "SFT": _mean(sft.get(key)), "PPO": _mean(ppo.get(key))}
        diff = report.get(diff_key) if diff_key else None
        if isinstance(diff, dict) and _num(diff.get("mean")):
            row["PPO − SFT"] = diff["mean"]
            if _num(diff.get("low")) and _num(diff.get("high")):
                conf = diff.get("confidence") or report.get("confidence") or 0.95
                row["interval"] = f"[{diff['low']:+.3g}, {diff['high']:+.3g}] ({conf:.0%})"
        elif _num(row["SFT"]) and _num(row["PPO"]):
            row["PPO − SFT"] = row["PPO"] - row["SFT"]
        rows.append(row)
    return rows


def eval_headline(report: dict[str, Any] | None) -> dict[str, float]:
    """The few numbers of the final report a person reads first (for the Compare page's table)."""
    if not isinstance(report, dict):
        return {}
    sft, ppo = report.get("sft") or {}, report.get("ppo") or {}
    out = {"reward SFT": _mean(sft.get("reward")), "reward PPO": _mean(ppo.get("reward")),
           "reward PPO−SFT": _mean(report.get("reward_diff")), "win rate": report.get("win_rate"),
           "KL": report.get("kl"), "gold PPO−SFT": _mean(report.get("gold_diff")),
           "gold win rate": report.get("gold_win_rate")}
    out = {k: v for k, v in out.items() if _num(v)}
    return out or eval_scalars(report)


def eval_scalars(report: dict[str, Any] | None) -> dict[str, float]:
    """Every number of the evaluate report except the samples, flattened (`sft/reward/mean` ...)."""
    if not isinstance(report, dict):
        return {}
    return flatten({k: v for k, v in report.items() if k != "samples"})


def eval_pairs(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The SFT-vs-PPO sample pairs of the evaluate report."""
    if not isinstance(report, dict):
        return []
    for key in ("samples", "pairs", "examples"):
        if isinstance(report.get(key), list):
            return [p for p in report[key] if isinstance(p, dict)]
    return next((v for v in report.values() if isinstance(v, list) and v and isinstance(v[0], dict)), [])
