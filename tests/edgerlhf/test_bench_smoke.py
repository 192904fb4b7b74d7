"""Smoke test of `edgerlhf bench` on a toy model, so the benchmark cannot rot. It asserts structure, not speed."""

import json

import pytest

from edgerlhf import bench

SMALL = ["--set", "ppo.batch_size=4", "--set", "ppo.mini_batch_size=2", "--set", "ppo.response_length=6",
         "--set", "ppo.ppo_epochs=1", "--set", "sft.batch_size=2", "--set", "sft.max_length=32",
         "--set", "reward.batch_size=2", "--set", "reward.max_length=32", "--set", "data.max_prompt_tokens=48",
         "--device", "cpu", "--tiny", "--steps", "1", "--warmup", "0"]


@pytest.mark.slow
def test_every_stage_runs_and_reports(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench.main(SMALL + ["--in-process", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["stages"]) == set(bench.STAGES)
    for stage, r in report["stages"].items():
        assert "error" not in r, (stage, r)
        assert r["peak_mb"] > 0 and r["step_s"] > 0 and r["tokens_per_s"] > 0, stage
    for stage in ("generation", "sft", "reward_bf16", "reward_int8", "reward_int4", "ppo", "ppo_naive"):
        fl = report["stages"][stage]["floor"]
        assert fl["total"] == fl["weights"] + fl["optimizer"] + fl["activations"] > 0
    assert report["stages"]["ppo"]["network_copies"] == 1.0
    # Policy, reference and value network are whole copies; the reward network has no LM head, which in
    # the toy model (untied head) is a sizeable share of the weights: between three and four copies.
    assert 3.0 < report["stages"]["ppo_naive"]["network_copies"] <= 4.0
    # The naive design holds four networks, so even its floor is larger.
    assert report["stages"]["ppo_naive"]["floor"]["weights"] > 3 * report["stages"]["ppo"]["floor"]["weights"] * 0.9
    assert {"naive_vs_ours_peak_ratio", "naive_vs_ours_step_time_ratio", "ours_vs_rloo_step_time_ratio"} <= set(
        report["comparisons"])
    assert "ppo_naive" in capsys.readouterr().out  # the table


def test_stages_run_in_their_own_process(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(SMALL + ["--stages", "generation", "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["stages"]["generation"]
    assert r["peak_mb"] >= r["rss_baseline_mb"] > 0 and r["tokens_per_step"] > 0
    assert r["torch_threads"] == 1


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--stages", "nope"])
