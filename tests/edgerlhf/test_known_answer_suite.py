"""The known-answer suite's command (`edgerlhf known-answer`): its table and its verdicts, without running
the pipeline (the runs themselves are the benchmark's; tests/edgerlhf/test_known_answer.py runs one)."""

import json
from pathlib import Path

import pytest

from edgerlhf import cli
from edgerlhf.config import load_config
from edgerlhf.lab import known_answer


def interval(mean, low, high):
    return {"mean": mean, "low": low, "high": high, "confidence": 0.95, "n": 48}


def row(gold, seed, content, equal_low, learned):
    return {"gold": gold, "seed": seed, "content": content, "gold_diff": interval(0.2, 0.1, 0.3),
            "gold_diff_equal_length": interval(0.05, equal_low, 0.1), "length_diff": interval(-3.0, -4.0, -2.0),
            "kl": 1.5, "reward_accuracy": 0.98, "sft_perplexity": 250.0, "empty_rate": {"sft": 0.02, "ppo": 0.0},
            "cap_hit_rate": {"sft": 0.25, "ppo": 0.05}, "gold_length_correlation": -0.1, "learned": learned}


def test_table_has_a_row_per_run_and_counts_the_seeds_where_a_gold_was_learned():
    rows = [row("question", 0, True, 0.02, True), row("question", 1, True, -0.01, False),
            row("concise", 0, False, -0.2, True)]
    text = known_answer.table(rows)
    lines = text.splitlines()
    assert lines[0].startswith("| gold | algorithm | seed | gold gain aligned − SFT | gain at equal length")
    assert ("| question | ppo | 0 | +0.200 [+0.100, +0.300] | +0.050 [+0.020, +0.100] | -3.0 | 1.50 | 0.980 | 250 | "
            "2%/0% | 25%/5% | yes |") in lines
    assert "- `question` with ppo: learned in 1 of 2 seeds (gain at equal length above 0); gold-length correlation " \
           "in the data -0.100" in lines
    assert any(line.startswith("- `concise` with ppo: learned in 1 of 1 seeds (plain gain: a gold about length")
               for line in lines)


def test_table_counts_each_algorithm_apart():
    rows = [row("you", 0, True, 0.02, True), {**row("you", 0, True, -0.01, False), "algorithm": "dpo"},
            {**row("you", 1, True, 0.01, True), "algorithm": "dpo"}]
    lines = known_answer.table(rows).splitlines()
    assert any(line.startswith("| you | dpo | 0 |") and line.endswith("| no |") for line in lines)
    assert any(line.startswith("- `you` with ppo: learned in 1 of 1 seeds") for line in lines)
    assert any(line.startswith("- `you` with dpo: learned in 1 of 2 seeds") for line in lines)


def test_with_a_validation_reward_model_the_table_gives_the_proxys_and_its_change_and_the_kept_step():
    defended = {**row("hedge", 0, True, 0.02, True), "reward_diff": interval(0.8, 0.6, 1.0),
                "validation_reward_diff": interval(0.1, -0.1, 0.3), "best_step": 21}
    lines = known_answer.table([defended, {**row("hedge", 1, True, 0.0, False), "validation_reward_diff": None}])
    lines = lines.splitlines()
    assert lines[0].endswith("| learned | proxy Δ | validation RM Δ | kept step |")
    assert lines[1].count("---") == 15
    assert lines[2].endswith("| yes | +0.800 [+0.600, +1.000] | +0.100 [-0.100, +0.300] | 21 |")
    assert lines[3].endswith("| no | — | — | — |")
    assert "proxy" not in known_answer.table([row("hedge", 0, True, 0.02, True)])


def test_the_command_is_dispatched_and_refuses_a_bad_configuration(capsys):
    assert cli.DISPATCH["known-answer"] == "edgerlhf.lab.known_answer:main"
    assert known_answer.main(["--set", "ppo.steps=0", "--seeds", "0"]) == 2
    assert "ppo.steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        known_answer.main(["--golds", "no-such-gold"])


def test_resume_keeps_the_finished_rows_and_runs_only_the_missing(tmp_path, capsys):
    """Every (gold, seed, algorithm) asked for is already in --out, in this --run-root: nothing runs (a run would
    take minutes and write its directory), the table is the kept rows'."""
    import json

    root = tmp_path / "runs"
    rows = [{**row("question", 0, True, 0.02, True), "algorithm": "ppo", "run_dir": str(root / "question-seed0")},
            {**row("question", 0, True, -0.01, False), "algorithm": "dpo",
             "run_dir": str(root / "question-seed0-dpo")}]
    out = tmp_path / "rows.json"
    out.write_text(json.dumps(rows))
    assert known_answer.main(["--golds", "question", "--seeds", "0", "--algorithms", "ppo", "dpo", "--resume",
                              "--out", str(out), "--run-root", str(root)]) == 0
    assert not root.exists() and json.loads(out.read_text()) == rows
    assert "- `question` with dpo: learned in 0 of 1 seeds" in capsys.readouterr().out
    assert known_answer.main(["--resume", "--out", str(out)]) == 2  # without the run root a resume cannot share


def test_the_verifiable_task_asks_in_wordings_sft_never_saw_and_its_command_refuses_bad_input(tmp_path):
    """`edgerlhf verifiable`'s task (`edgerlhf.lab.verifiable`, echo): the demonstrations answer every word in the
    first `TAUGHT` wordings; the prompts ask every word in the others, each with the word as its answer (so no
    answer is right for two prompts); every word is one tokenizer token; the stated rewards score a right word in
    any format, the format on its own. The command checks its overrides like `known-answer`."""
    from edgerlhf.config import TINY_TOKENIZER_DIR
    from edgerlhf.lab import verifiable
    from edgerlhf.rewards import RewardSet

    demos, prompts = (Path(p) for p in verifiable.write_task(tmp_path, 0, TINY_TOKENIZER_DIR))
    demos = [json.loads(line) for line in demos.read_text().splitlines()]
    prompts = [json.loads(line) for line in prompts.read_text().splitlines()]
    taught, asked = verifiable.TEMPLATES[:verifiable.TAUGHT], verifiable.TEMPLATES[verifiable.TAUGHT:]
    assert len(demos) == len(verifiable.WORDS) * len(taught) and len(prompts) == len(verifiable.WORDS) * len(asked)
    assert {d["prompt"] for d in demos} == {t.format(w=w) for w in verifiable.WORDS for t in taught}
    assert not {d["prompt"] for d in demos} & {p["prompt"] for p in prompts}
    assert all(p["prompt"] in {t.format(w=p["answer"]) for t in asked} for p in prompts)
    assert all(d["completion"] == f"Answer: {w}" for d in demos for w in verifiable.WORDS
               if d["prompt"] in {t.format(w=w) for t in taught})
    assert len({p["answer"] for p in prompts}) == len(verifiable.WORDS)

    prompt = asked[0].format(w="tiger")
    rewards = RewardSet(load_config("tiny", verifiable.TASK).ppo.rewards, rows={prompt: {"answer": "tiger"}})
    for answer, correct, fmt in [("Answer: tiger", 1, 1), ("tiger.", 1, 0), ("Answer: horse", 0, 1), ("", 0, 0)]:
        _, parts = rewards.score([prompt], [answer])
        assert (parts["correct"][0], parts["format"][0]) == (correct, fmt), answer
    assert cli.DISPATCH["verifiable"] == "edgerlhf.lab.verifiable:main"
    assert verifiable.main(["--set", "ppo.steps=0"]) == 2 and verifiable.main(["--resume"]) == 2


def test_compare_judges_a_setting_per_gold_by_the_readmes_rule(tmp_path, capsys):
    """More runs learned helps; as many at a higher mean gain helps; fewer does not, whatever the gain; only the runs
    both files have are compared."""
    def ran(gold, seed, algorithm, gain, learned, content=True):
        r = {**row(gold, seed, content, 0.01 if learned else -0.01, learned), "algorithm": algorithm}
        r["gold_diff_equal_length" if content else "gold_diff"]["mean"] = gain
        return r

    base = [ran("comma", 0, "ppo", 0.02, True), ran("comma", 0, "grpo", 0.01, False),
            ran("negation", 0, "ppo", 0.004, True), ran("negation", 1, "ppo", 0.001, False),
            ran("concise", 0, "ppo", -0.10, True, content=False), ran("you", 0, "ppo", 0.05, True)]
    other = [ran("comma", 0, "ppo", 0.01, True), ran("comma", 0, "grpo", 0.005, True),  # one more learned
             ran("negation", 0, "ppo", 0.010, True), ran("negation", 1, "ppo", 0.002, False),  # as many, higher
             ran("concise", 0, "ppo", 0.30, False, content=False),  # fewer learned
             ran("positive", 0, "ppo", 0.5, True)]  # not in base: not compared
    lines = known_answer.compare(base, other).splitlines()
    assert lines[0].startswith("| gold | runs | learned: base → other |")
    rows = {line.split(" | ")[0].strip("| "): line for line in lines[2:]}
    assert set(rows) == {"comma", "negation", "concise"}, rows
    assert rows["comma"] == "| comma | 2 | 1 → 2 | +0.0150 → +0.0075 | ppo 1 → 1, grpo 0 → 1 | helps |"
    assert "| 1 → 1 | +0.0025 → +0.0060 | ppo 1 → 1 | helps |" in rows["negation"]
    assert rows["concise"].endswith("| 1 → 0 | -0.1000 → +0.3000 | ppo 1 → 0 | does not help |")

    (tmp_path / "base.json").write_text(json.dumps(base))
    (tmp_path / "other.json").write_text(json.dumps(other))
    assert known_answer.main(["--compare", str(tmp_path / "base.json"), str(tmp_path / "other.json")]) == 0
    assert "| comma | 2 | 1 → 2 |" in capsys.readouterr().out
    assert known_answer.main(["--compare", str(tmp_path / "base.json"), str(tmp_path / "missing.json")]) == 2
    assert "missing.json" in capsys.readouterr().err
    (tmp_path / "apart.json").write_text(json.dumps([ran("hedge", 0, "ppo", 0.0, False)]))
    assert known_answer.main(["--compare", str(tmp_path / "base.json"), str(tmp_path / "apart.json")]) == 2
    assert "no run in common" in capsys.readouterr().err
