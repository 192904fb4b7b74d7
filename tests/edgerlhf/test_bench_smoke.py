"""Smoke test of `edgerlhf bench` on a toy model, so the benchmark cannot rot. It asserts structure, not speed."""

import json

import pytest

from edgerlhf.lab import bench

SMALL = ["--set", "ppo.batch_size=4", "--set", "ppo.mini_batch_size=2", "--set", "ppo.response_length=6",
         "--set", "ppo.ppo_epochs=1", "--set", "sft.batch_size=2", "--set", "sft.max_length=32",
         "--set", "reward.batch_size=2", "--set", "reward.max_length=32", "--set", "data.max_prompt_tokens=48",
         "--set", "dpo.batch_size=2", "--set", "dpo.max_length=32", "--set", "kto.batch_size=2",
         "--set", "kto.max_length=32",
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
    stages = report["stages"]
    for stage in ("generation", "sft", "reward_bf16", "reward_int8", "reward_int4", "ppo", "ppo_naive", "grpo", "rloo",
                  "dpo", "trl_dpo", "kto", "trl_kto"):
        fl = stages[stage]["floor"]
        assert fl["total"] == fl["weights"] + fl["optimizer"] + fl["activations"] > 0
    for stage in ("ppo", "grpo", "rloo"):  # one network whatever the algorithm
        assert stages[stage]["network_copies"] == 1.0 and stages[stage]["algorithm"] == stage
    # PPO keeps the preset's one response per prompt; the group algorithms, ours and TRL's, get their group of 4.
    assert stages["ppo"]["samples_per_prompt"] == 1
    assert {stages[s]["samples_per_prompt"] for s in ("grpo", "rloo", "trl_grpo", "trl_rloo")} == {4}
    assert stages["trl_grpo"]["trainer"] == "trl.GRPOTrainer" and stages["trl_rloo"]["trainer"] == "trl.RLOOTrainer"
    # TRL loads the reward model as a network of its own beside the policy (without an LM head: the toy model's
    # untied head is about half its weights).
    assert 1.3 < stages["trl_grpo"]["network_copies"] < 2.0
    # Each trained the same LoRA on the same pairs: ours and TRL's DPO train as many parameters.
    assert stages["dpo"]["trainable_parameters"] == stages["trl_dpo"]["trainable_parameters"] > 0
    assert stages["kto"]["trainable_parameters"] == stages["trl_kto"]["trainable_parameters"] > 0  # and KTO
    # Policy, reference and value network are whole copies; the reward network has no LM head, which in
    # the toy model (untied head) is a sizeable share of the weights: between three and four copies.
    assert 3.0 < report["stages"]["ppo_naive"]["network_copies"] <= 4.0
    # The naive design holds four networks, so even its floor is larger.
    assert report["stages"]["ppo_naive"]["floor"]["weights"] > 3 * report["stages"]["ppo"]["floor"]["weights"] * 0.9
    expected = {"naive_vs_ours_peak_ratio", "naive_vs_ours_step_time_ratio", "ppo_vs_trl_rloo_step_time_ratio"}
    expected |= {f"{a}_ours_vs_trl_{r}_ratio" for a in ("grpo", "rloo", "dpo", "kto") for r in ("peak", "step_time")}
    assert expected <= set(report["comparisons"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert rows["ppo_naive"][1:3] == ["ours-naive", "ppo"] and rows["trl_grpo"][1:3] == ["TRL", "grpo"]  # the table
    assert rows["rloo"][1:3] == ["ours", "rloo"] and rows["trl_dpo"][1:3] == ["TRL", "dpo"]
    assert rows["kto"][1:3] == ["ours", "kto"] and rows["trl_kto"][1:3] == ["TRL", "kto"]


def test_stages_run_in_their_own_process(tmp_path):
    out = tmp_path / "bench.json"
    assert bench.main(SMALL + ["--stages", "generation", "--threads", "1", "--out", str(out)]) == 0
    r = json.loads(out.read_text())["stages"]["generation"]
    assert r["peak_mb"] >= r["rss_baseline_mb"] > 0 and r["tokens_per_step"] > 0
    assert r["torch_threads"] == 1


def test_group_stages_get_a_group_and_keep_one_set_by_hand():
    config = bench.bench_config("distilgpt2-8gb", None, {"ppo": {"batch_size": 8}}, tiny=True)
    assert config.ppo.samples_per_prompt == 1  # the preset's PPO
    assert bench.stage_config(config, "ppo").ppo.samples_per_prompt == 1
    for stage in ("grpo", "rloo", "trl_grpo", "trl_rloo"):
        assert bench.stage_config(config, stage).algorithm == bench.ALIGNMENT_STAGES[stage][1]
        assert bench.stage_config(config, stage).ppo.samples_per_prompt == 4
    assert bench.stage_config(config, "trl_dpo").algorithm == "dpo"
    assert bench.stage_config(config, "trl_kto").algorithm == "kto"
    assert bench.stage_config(config, "sft") is config
    pairs = bench.bench_config("distilgpt2-8gb", None, {"ppo": {"batch_size": 8, "samples_per_prompt": 2}}, tiny=True)
    assert bench.stage_config(pairs, "grpo").ppo.samples_per_prompt == 2


def test_compare_gives_ours_over_trl_for_each_algorithm():
    def result(peak, step_s):
        return {"peak_mb": peak, "rss_baseline_mb": 100.0, "step_s": step_s}

    c = bench.compare({"grpo": result(300.0, 2.0), "trl_grpo": result(500.0, 4.0), "rloo": result(300.0, 1.0),
                       "trl_rloo": {"error": "boom"}, "ppo": result(200.0, 3.0)})
    assert c["grpo_ours_vs_trl_peak_ratio"] == 0.6 and c["grpo_ours_vs_trl_step_time_ratio"] == 0.5
    assert c["grpo_ours_vs_trl_peak_ratio_above_baseline"] == 0.5
    # nothing measured to compare
    assert not any(k.startswith(("rloo_", "dpo_", "kto_", "naive_", "ppo_vs")) for k in c)


def test_unknown_stage_is_refused():
    with pytest.raises(SystemExit):
        bench.main(["--stages", "nope"])
