"""The next round of RLHF in the pipeline (issue 32): a run that continues a finished run (`round.parent_run`) has the
parent's aligned policy, merged by the export's own merge, as its SFT policy (SFT trains nothing), or fine-tunes it
on demonstrations of its own; it records its round and parent; and `edgerlhf rounds` runs round 1, a simulated voter
(the gold voting on two of round 1's answers per prompt) and round 2 on those votes, end to end at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgerlhf import gold
from edgerlhf.config import HH_PREFS_SAMPLE, ConfigError, load_config, next_round
from edgerlhf.context import RunContext
from edgerlhf.contract import RANDOM_BASE, SFT_MERGED, merge_overrides
from edgerlhf.errors import StageError
from edgerlhf.export import merged_policy
from edgerlhf.lab import rounds
from edgerlhf.pipeline import main as pipeline_main
from edgerlhf.pipeline import run_pipeline, run_stage
from tests.support.tiny import PIPELINE, as_sets


def weights(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def round_two(parent, **sections) -> object:
    """The trained run's config continued as round 2, at the `PIPELINE` budget with one reward precision."""
    stored = json.loads((parent.run_dir / "config.json").read_text())
    return load_config("tiny", merge_overrides(merge_overrides(PIPELINE, {
        "data": stored["data"], "reward": {"precisions": ["bf16"]},
        "round": next_round(parent.run_dir, stored)}), sections))


def test_a_round_names_its_absolute_parent_run_and_its_number(tmp_path, monkeypatch, capsys):
    for round_, field in (({"parent_run": "runs/one", "number": 2}, "round.parent_run"),
                          ({"parent_run": "/runs/one"}, "round.number"),
                          ({"number": 2}, "round.number"), ({"number": 0}, "round.number")):
        with pytest.raises(ConfigError) as refused:
            load_config("tiny", {"round": round_})
        assert refused.value.field == field, round_
    assert load_config("tiny").round.parent_run is None and load_config("tiny").round.number == 1
    assert next_round("/runs/two", {"round": {"parent_run": "/runs/one", "number": 2}}) == \
        {"parent_run": "/runs/two", "number": 3}
    assert next_round("/runs/old", {}) == {"parent_run": "/runs/old", "number": 2}, "a config from before rounds"

    # `--from-run` takes a path relative to where it was typed and reads the parent's round.
    parent = tmp_path / "runs" / "second"
    parent.mkdir(parents=True)
    stored = load_config("tiny", {"round": {"parent_run": "/runs/first", "number": 2}, "ppo": {"steps": 7}})
    (parent / "config.json").write_text(stored.to_json())
    monkeypatch.chdir(tmp_path)
    assert pipeline_main(["--run-dir", "third", "--from-run", "runs/second", "--print-config", "--set", "seed=4"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["round"] == {"parent_run": str(parent), "number": 3}
    assert printed == {**stored.to_dict(), "round": printed["round"], "seed": 4}, "the parent's settings, then --set"
    assert pipeline_main(["--run-dir", "third", "--from-run", "runs/nothing-here", "--print-config"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_round_two_starts_from_the_parents_merged_policy_and_records_its_parent(trained_run, tmp_path):
    config = round_two(trained_run)
    ctx = RunContext(tmp_path / "round2")
    reports = run_pipeline(config, ctx)
    merged, _ = merged_policy(trained_run.run_dir)
    start = weights(ctx.run_dir / SFT_MERGED)
    assert same(start, merged.state_dict()), "round 2's SFT policy is round 1's aligned policy, as export merges it"
    assert not same(start, weights(trained_run.run_dir / SFT_MERGED)), "the aligned policy, not round 1's SFT"
    assert not (ctx.run_dir / RANDOM_BASE).exists() and not ctx.metric_series("warmup/perplexity")
    sft = reports["sft"]
    assert (sft.round, sft.parent_run, sft.trained, sft.steps) == (2, str(trained_run.run_dir), False, 0)
    assert sft.probes and sft.probes[0].step == 0, "where the round starts, for the Probes page"
    assert json.loads((ctx.run_dir / "config.json").read_text())["round"] == {
        "parent_run": str(trained_run.run_dir), "number": 2}
    assert json.loads((ctx.run_dir / "sft" / "report.json").read_text())["trained"] is False
    # The reward model and the alignment ran on it, and the evaluation compared round 2 with it.
    assert reports["reward"].precisions["bf16"].accuracy is not None and reports["ppo"].steps == 2
    assert reports["evaluate"].gold_diff is not None


def test_a_round_with_demonstrations_fine_tunes_the_parents_policy(trained_run, tmp_path):
    config = round_two(trained_run, stages=["data", "sft"], sft_data={"source": HH_PREFS_SAMPLE, "max_rows": 24})
    ctx = RunContext(tmp_path / "round2")
    sft = run_pipeline(config, ctx)["sft"]
    merged, _ = merged_policy(trained_run.run_dir)
    assert same(weights(ctx.run_dir / RANDOM_BASE), merged.state_dict()), "SFT starts from the parent's policy"
    assert not same(weights(ctx.run_dir / SFT_MERGED), merged.state_dict()), "and trains on the demonstrations"
    assert (sft.trained, sft.round, sft.steps) == (True, 2, config.sft.max_steps) and sft.train_examples > 0
    assert not ctx.metric_series("warmup/perplexity"), "a trained parent is not warmed up again"


def test_a_parent_without_an_aligned_policy_is_refused_naming_the_field(trained_run, tmp_path):
    parent = trained_run.copy_to(tmp_path / "parent", parts=("data", "sft"))
    stored = json.loads((parent / "config.json").read_text())
    config = load_config("tiny", merge_overrides(PIPELINE, {"data": stored["data"],
                                                           "round": next_round(parent, stored)}))
    ctx = RunContext(tmp_path / "round2")
    run_stage("data", config, ctx)
    with pytest.raises(StageError, match=r"round.parent_run: .*ppo/adapter missing"):
        run_stage("sft", config, ctx)


def test_the_rounds_command_votes_with_the_gold_on_round_ones_answers_and_runs_round_two_on_them(tmp_path, capsys):
    budget = merge_overrides(PIPELINE, {"data": {"max_prompt_tokens": 96, "max_response_tokens": 24},
                                        "reward": {"precisions": ["bf16"]}})
    sets = [arg for item in as_sets(budget) for arg in ("--set", item)]
    out, root = tmp_path / "rows.json", tmp_path / "runs"
    assert rounds.main(["--gold", "concise", "--seeds", "0", "--threads", "1", "--run-root", str(root),
                        "--out", str(out), *sets]) == 0
    printed = capsys.readouterr().out
    assert "round 2 − round 1" in printed and "round 2 beat round 1 in" in printed
    [row] = json.loads(out.read_text())
    one, two = root / "concise-seed0", root / "concise-seed0-round2"
    assert (row["round1"]["run_dir"], row["round2"]["run_dir"]) == (str(one), str(two))

    # Round 2 starts from round 1's aligned policy, merged as export merges it.
    assert json.loads((two / "config.json").read_text())["round"] == {"parent_run": str(one), "number": 2}
    merged, _ = merged_policy(one)
    assert same(weights(two / SFT_MERGED), merged.state_dict())

    # Its pairs are votes of the gold on two answers of round 1's policy to round 1's training prompts.
    votes_file = Path(row["votes"]["file"])
    pairs = [json.loads(line) for line in votes_file.read_text().splitlines()]
    assert len(pairs) == row["votes"]["pairs"] == row["votes"]["votes"] - row["votes"]["ties"] > 0
    trained_on = {json.loads(line)["prompt"] for line in (one / "data" / "prompts_train.jsonl").open()}
    data_answers = {r[side] for line in (one / "data" / "train_prefs.jsonl").open()
                    for r in [json.loads(line)] for side in ("chosen", "rejected")}
    for pair in pairs:
        assert pair["prompt"] in trained_on and gold.prefers(pair["prompt"], pair["chosen"], pair["rejected"],
                                                             "concise") is True
        answers = {pair["chosen"], pair["rejected"]} - {""}  # an empty answer is in the data too (the gold's rule)
        assert answers.isdisjoint(data_answers), "the policy's answers, not the data set's"
        assert pair["chosen_by"] == pair["rejected_by"] == rounds.VOTER
    again = rounds.simulate_votes(one, "concise", tmp_path / "again.jsonl", seed=0)
    assert Path(again["file"]).read_text() == votes_file.read_text(), "the voter is seeded"

    # ... and round 2's reward model trained on those votes alone.
    data = json.loads((two / "data" / "report.json").read_text())
    assert data["votes"]["file"] == str(votes_file) and data["votes"]["with_data_set"] is False
    voted = {(p["prompt"], p["chosen"], p["rejected"]) for p in pairs}
    train = [json.loads(line) for line in (two / "data" / "train_prefs.jsonl").open()]
    assert train and all((r["prompt"], r["chosen"], r["rejected"]) in voted for r in train)
    assert (two / "reward" / "bf16" / "score_head.pt").is_file()
    assert json.loads((two / "evaluate" / "report.json").read_text())["gold_diff"] is not None

    # The verdict: round 2 against round 1 on round 1's own held-out prompts.
    versus = Path(row["round2_vs_round1"]["run_dir"])
    assert versus == root / "concise-seed0-round2-vs-round1"
    assert (versus / "data" / "prompts_test.jsonl").read_text() == (one / "data" / "prompts_test.jsonl").read_text()
    assert same(weights(versus / SFT_MERGED), merged.state_dict())
    compared = json.loads((versus / "evaluate" / "report.json").read_text())
    assert compared["n_prompts"] == json.loads((one / "evaluate" / "report.json").read_text())["n_prompts"]
    assert row["round2_vs_round1"]["gold_diff"] == compared["gold_diff"]
    assert row["improved"] == row["round2_vs_round1"]["learned"]


def test_the_rounds_table_reads_round_twos_gain_over_round_one():
    def row(seed, gain):
        interval = {"mean": gain, "low": gain - 0.05, "high": gain + 0.05}
        run = {"gold_diff": interval, "gold_diff_equal_length": interval, "length_diff": {"mean": -1.0}, "kl": 2.0,
               "reward_accuracy": 0.9}
        return {"gold": "question", "seed": seed, "algorithm": "ppo", "mix": 1.0, "content": True, "round1": run,
                "round2": run, "round2_vs_round1": run, "votes": {"votes": 200, "ties": 150},
                "improved": gain - 0.05 > 0}
    text = rounds.table([row(0, 0.2), row(1, 0.01)])
    assert "| question | ppo | 1 | 0 | +0.200 [+0.150, +0.250] | 50 (150) | +0.200 [+0.150, +0.250] |" in text
    assert "round 2 beat round 1 in 1 of 2 seeds (gain at equal length above 0)" in text
    assert rounds.main(["--mix", "0", "--seeds", "0"]) == 2
