"""Stage reports (`<stage>/report.json`, from `GET /api/jobs/{id}/report`) turned into table rows."""

from __future__ import annotations

from typing import Any


def _scalar(v: Any) -> bool:
    return v is None or isinstance(v, (int, float, str, bool))


def precision_rows(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The reward stage's precision study as one row per precision (scalar fields only)."""
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
        row.update({k: x for k, x in v.items() if _scalar(x) and k != "precision"})
        rows.append(row)
    return rows


def eval_scalars(report: dict[str, Any] | None) -> dict[str, float]:
    """Numbers of the evaluate report, nested groups flattened as `group/name` (e.g. `sft/reward_mean`)."""
    out: dict[str, float] = {}
    if not isinstance(report, dict):
        return out
    for k, v in report.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = v
        elif isinstance(v, dict):
            out.update({f"{k}/{kk}": vv for kk, vv in v.items()
                        if isinstance(vv, (int, float)) and not isinstance(vv, bool)})
    return out


def eval_pairs(report: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The SFT-vs-PPO sample pairs of the evaluate report (the first list of objects in it)."""
    if not isinstance(report, dict):
        return []
    for key in ("samples", "pairs", "examples"):
        if isinstance(report.get(key), list):
            return [p for p in report[key] if isinstance(p, dict)]
    return next((v for v in report.values() if isinstance(v, list) and v and isinstance(v[0], dict)), [])
