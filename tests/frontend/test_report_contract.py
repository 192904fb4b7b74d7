"""The dashboard reads the stage reports field by field: real reports in, the same numbers on screen, and a
renamed field is an error, never a blank cell.

The session's service (`finished_service`): the `tiny` preset shrunk to seconds, a PPO and a GRPO job created
through the real backend and run by real workers (`edgerlhf worker --once`, its job process running every stage),
so the report JSON is exactly what `GET /api/jobs/{id}/report` serves (`edgerlhf.reports.JobReports`). The PPO job
(reward models in bf16 and int8) is the one whose pages are read; the Compare page shows both.
"""

from __future__ import annotations

import copy
import re

import pandas as pd
import pytest
from pydantic import ValidationError
from streamlit.testing.v1 import AppTest

from edgerlhf.reports import JobReports
from frontend import ui
from frontend.api_client import ApiClient
from frontend.reports import eval_headline, eval_pairs, eval_rows, precision_rows
from tests.support.dashboard import APP, TIMEOUT, answering, open_job_page

MB = 1024 * 1024


@pytest.fixture
def finished_job(finished_service):
    """(backend, job id, the job's report JSON as the backend serves it) of the PPO job the real worker ran."""
    return finished_service.backend, finished_service.jobs["ppo"], finished_service.reports["ppo"]


def interval(diff: dict) -> str:
    return f"[{diff['low']:+.3g}, {diff['high']:+.3g}] ({diff['confidence']:.0%})"


def expected_eval_rows(ev: dict) -> list[dict]:
    """The SFT-vs-PPO table as the report's own numbers say it must read."""
    def shares(measure: str, field: str) -> dict:
        return {"measure": measure, "SFT": ev["sft"][field], "PPO": ev["ppo"][field],
                "PPO − SFT": ev["ppo"][field] - ev["sft"][field]}

    return [
        {"measure": f"reward (RM {ev['reward_precision']})", "SFT": ev["sft"]["reward"]["mean"],
         "PPO": ev["ppo"]["reward"]["mean"], "PPO − SFT": ev["reward_diff"]["mean"],
         "interval": interval(ev["reward_diff"])},
        {"measure": f"gold score ({ev['gold_scorer']})", "SFT": ev["sft"]["gold"]["mean"],
         "PPO": ev["ppo"]["gold"]["mean"], "PPO − SFT": ev["gold_diff"]["mean"],
         "interval": interval(ev["gold_diff"])},
        {"measure": "gold at equal length", "SFT": None, "PPO": None,
         "PPO − SFT": ev["gold_diff_equal_length"]["mean"], "interval": interval(ev["gold_diff_equal_length"])},
        {"measure": "response tokens", "SFT": ev["sft"]["response_tokens"]["mean"],
         "PPO": ev["ppo"]["response_tokens"]["mean"], "PPO − SFT": ev["length_diff"]["mean"],
         "interval": interval(ev["length_diff"])},
        shares(f"hit the {ev['response_length']}-token cap", "cap_hit_rate"),
        shares("empty answers", "empty_rate")]


def test_report_tables_hold_the_values_of_the_real_reports(finished_job):
    backend, job_id, raw = finished_job
    assert all(raw[stage] is not None for stage in ("data", "sft", "reward", "ppo", "evaluate")), raw
    reports = ApiClient(backend.url).report(job_id)
    assert isinstance(reports, JobReports)

    # The precision study: one row per precision, every value the report's own.
    study = raw["reward"]["precisions"]
    rows = precision_rows(reports.reward)
    assert [r["precision"] for r in rows] == list(study) == ["bf16", "int8"]
    for row in rows:
        p = study[row["precision"]]
        assert (row["accuracy"], row["mean_margin"], row["peak_train_mb"], row["throughput_pairs_per_s"],
                row["spearman_vs_bf16"], row["compute_dtype"]) == (
            p["accuracy"], p["mean_margin"], p["peak_train_mb"], p["throughput_pairs_per_s"], p["spearman_vs_bf16"],
            p["compute_dtype"])
        assert row["memory_footprint_mb"] == round(p["memory_footprint_bytes"] / MB, 2)
        skipped = {"precision", "normalization", "memory_footprint_bytes", "memory_footprint_mb"}
        assert {k: v for k, v in row.items() if k not in skipped} == {k: v for k, v in p.items() if k not in skipped}
    assert study["int8"]["spearman_vs_bf16"] is not None

    # SFT vs PPO: means, differences and their bootstrap intervals, headline numbers, sample pairs.
    ev = raw["evaluate"]
    assert eval_rows(reports.evaluate) == expected_eval_rows(ev)
    assert eval_headline(reports.evaluate) == {
        "reward SFT": ev["sft"]["reward"]["mean"], "reward PPO": ev["ppo"]["reward"]["mean"],
        "reward PPO−SFT": ev["reward_diff"]["mean"], "win rate": ev["win_rate"], "KL": ev["kl"],
        "gold PPO−SFT": ev["gold_diff"]["mean"],
        "gold PPO−SFT at equal length": ev["gold_diff_equal_length"]["mean"],
        "gold win rate": ev["gold_win_rate"], "length PPO−SFT": ev["length_diff"]["mean"],
        "PPO cap hits": ev["ppo"]["cap_hit_rate"]}
    assert eval_pairs(reports.evaluate) == ev["samples"] and len(ev["samples"]) == 2


def test_job_page_shows_the_real_reports_values(finished_job, dashboard_env):
    backend, job_id, raw = finished_job
    dashboard_env(backend.url)
    at = open_job_page(job_id, check=False)
    assert not at.exception, at.exception

    frames = [df.value for df in at.dataframe]
    study = next(f for f in frames if "accuracy" in f.columns)
    expected = raw["reward"]["precisions"]
    assert study["precision"].tolist() == list(expected)
    for column in ("accuracy", "mean_margin", "peak_train_mb", "spearman_vs_bf16"):
        assert study[column].tolist() == [p[column] for p in expected.values()], column
    assert study["memory_footprint_mb"].tolist() == [round(p["memory_footprint_bytes"] / MB, 2)
                                                     for p in expected.values()]

    ev = raw["evaluate"]
    table = next(f for f in frames if "measure" in f.columns)
    expected = expected_eval_rows(ev)
    assert table["measure"].tolist() == [row["measure"] for row in expected]
    for column in ("SFT", "PPO", "PPO − SFT"):  # the equal-length row has no means: NaN on the page
        assert [None if pd.isna(v) else v for v in table[column]] == [row[column] for row in expected], column
    assert [None if pd.isna(v) else v for v in table["interval"]] == [row.get("interval") for row in expected]
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["win rate"] == ui.fmt(ev["win_rate"]) and metrics["KL"] == ui.fmt(ev["kl"])
    assert metrics["gold PPO−SFT at equal length"] == ui.fmt(ev["gold_diff_equal_length"]["mean"])
    assert metrics["length PPO−SFT"] == ui.fmt(ev["length_diff"]["mean"])
    assert metrics["PPO cap hits"] == ui.fmt(ev["ppo"]["cap_hit_rate"])
    texts = [t.value for t in at.text]
    assert all(pair["ppo"] in texts and pair["sft"] in texts for pair in ev["samples"])


def renamed(report: dict, path: tuple[str, ...], new: str) -> dict:
    """A copy of `report` with the field at `path` renamed to `new`."""
    out = copy.deepcopy(report)
    parent = out
    for part in path[:-1]:
        parent = parent[part]
    parent[new] = parent.pop(path[-1])
    return out


@pytest.mark.parametrize("stage, path, new, read", [
    ("reward", ("precisions", "bf16", "accuracy"), "acc", precision_rows),
    ("reward", ("precisions", "int8", "memory_footprint_bytes"), "footprint_bytes", precision_rows),
    ("reward", ("precisions", "int8", "spearman_vs_bf16"), "spearman", precision_rows),
    ("reward", ("precisions",), "study", precision_rows),
    ("evaluate", ("samples",), "pairs", eval_pairs),
    ("evaluate", ("reward_diff", "low"), "lo", eval_rows),
    ("evaluate", ("sft", "reward", "mean"), "average", eval_headline),
    ("evaluate", ("ppo", "gold"), "gold_score", eval_rows),
    ("evaluate", ("gold_diff_equal_length",), "gold_diff_same_length", eval_rows),
    ("evaluate", ("ppo", "cap_hit_rate"), "capped", eval_headline),
])
def test_a_renamed_report_field_raises_instead_of_blanking_a_cell(finished_job, stage, path, new, read):
    backend, job_id, raw = finished_job
    assert read(raw[stage]), "the report as served reads fine"
    bad = renamed(raw[stage], path, new)
    with pytest.raises(ValidationError, match=re.escape(new)):
        read(bad)
    # The same through the API client: the page never gets a half-read report.
    with pytest.raises(ValidationError, match=re.escape(new)):
        answering({f"/api/jobs/{job_id}/report": {**raw, stage: bad}}).report(job_id)


def test_compare_page_shows_the_real_reports_values(finished_service, dashboard_env):
    dashboard_env(finished_service.url)
    at = AppTest.from_file(str(APP), default_timeout=TIMEOUT).run()
    at.switch_page("app_pages/compare.py").run()
    assert not at.exception, at.exception
    jobs = finished_service.jobs
    assert sorted(at.multiselect(key="compare_jobs").value) == sorted(jobs.values()), \
        "the succeeded jobs are chosen by default"

    frames = [df.value for df in at.dataframe]
    headline = next(f for f in frames if "win rate" in f.columns)
    study = next(f for f in frames if "accuracy" in f.columns)
    assert sorted(headline["job"]) == sorted(f"#{i} {a}-run" for a, i in jobs.items())
    for algorithm, job_id in jobs.items():
        label, raw = f"#{job_id} {algorithm}-run", finished_service.reports[algorithm]
        ev = raw["evaluate"]
        row = headline[headline["job"] == label]
        # The report calls the aligned side `ppo` whatever trained it; the page says "aligned" and the algorithm.
        aligned = {k.replace("PPO", "aligned"): v for k, v in eval_headline(ev).items()}
        assert row.to_dict("records") == [{"job": label, "algorithm": algorithm.upper(), **aligned}]
        assert row["reward aligned−SFT"].tolist() == [ev["reward_diff"]["mean"]]
        rows = study[study["job"] == label]
        assert rows["precision"].tolist() == list(raw["reward"]["precisions"])
        assert rows["accuracy"].tolist() == [p["accuracy"] for p in raw["reward"]["precisions"].values()]
    ppo = study[study["job"] == f"#{jobs['ppo']} ppo-run"]
    assert ppo["precision"].tolist() == ["bf16", "int8"]


def test_job_page_exports_the_aligned_model(finished_job, dashboard_env):
    """The Export button merges the job's policy into one model directory the page then offers for download."""
    backend, job_id, raw = finished_job
    dashboard_env(backend.url)
    at = open_job_page(job_id, check=False)
    at.button(key=f"export-{job_id}-button").click().run(timeout=300)
    assert not at.exception, at.exception
    (done,) = [s.value for s in at.success if "Exported to" in s.value]
    path = re.search(r"`([^`]+)`", done).group(1)
    assert path.endswith(f"job-{job_id}/export/model")
    from pathlib import Path

    assert (Path(path) / "config.json").is_file() and (Path(path) / "model.safetensors").is_file()
    assert f"/api/jobs/{job_id}/export.tar" in at.code[-1].value


def test_job_page_exports_the_aligned_model_as_gguf(finished_job, dashboard_env):
    """With GGUF chosen, the page says roughly how much disk and memory the export needs, then writes the GGUF file,
    its Modelfile and README, and offers that directory's download."""
    from pathlib import Path

    backend, job_id, raw = finished_job
    dashboard_env(backend.url)
    at = open_job_page(job_id, check=False)
    at.radio(key=f"export-{job_id}-format").set_value("gguf").run()
    at.selectbox(key=f"export-{job_id}-quant").set_value("f16").run()
    assert any("Needs about" in c.value and "(an estimate)" not in c.value and "an estimate" in c.value
               for c in at.caption), [c.value for c in at.caption]
    at.button(key=f"export-{job_id}-button").click().run(timeout=300)
    assert not at.exception, at.exception
    (done,) = [s.value for s in at.success if "Exported to" in s.value]
    path = Path(re.search(r"`([^`]+)`", done).group(1))
    assert path.parts[-3:] == (f"job-{job_id}", "export", "gguf-f16")
    assert sorted(p.name for p in path.iterdir()) == ["Modelfile", "README.md", "model-f16.gguf"]
    assert f"/api/jobs/{job_id}/export.tar?format=gguf&quant=f16" in at.code[-1].value
