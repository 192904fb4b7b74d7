"""The data stage on the real HH-RLHF files in ../shared and on small hand-made files: parsing, malformed
lines (error naming file:line, or counted skip), drop reasons and their counts, dedupe, gold relabelling,
and a deterministic train/test split."""

import gzip
import json
from pathlib import Path

import pytest

from edgerlhf import gold
from edgerlhf.config import HH_PREFS_SAMPLE, SHARED_DIR, load_config
from edgerlhf.context import RunContext
from edgerlhf.data import DataError, read_prefs, run

RAW_HH = Path(SHARED_DIR) / "data" / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"


def config(source, **data):
    base = {"source": str(source), "labels": "human", "max_pairs": None, "test_fraction": 0.25,
            "max_prompt_tokens": 4096, "max_response_tokens": 4096}
    return load_config("tiny", {"data": {**base, **data}})


def run_data(tmp_path, cfg, name="run"):
    ctx = RunContext(tmp_path / name)
    ctx.begin_stage("data")
    report = run(cfg, ctx).model_dump()
    return report, ctx.run_dir / "data"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def raw(prompt_turns: str, chosen: str, rejected: str) -> str:
    return json.dumps({"chosen": f"{prompt_turns}\n\nAssistant: {chosen}",
                       "rejected": f"{prompt_turns}\n\nAssistant: {rejected}"})


def test_processed_sample_counts_and_canonical_rows(tmp_path):
    report, out = run_data(tmp_path, config(HH_PREFS_SAMPLE))
    assert report["pairs_read"] == 1000 and report["bad_lines"] == 0
    assert report["dropped"] == {"empty_response": 1, "identical_responses": 6}
    assert report["kept"] == 993
    assert (report["train"], report["test"]) == (745, 248)
    train, test = read_prefs(out / "train_prefs.jsonl"), read_prefs(out / "test_prefs.jsonl")
    assert len(train) == 745 and len(test) == 248
    for row in train + test:
        assert set(row) == {"prompt", "chosen", "rejected"}
        assert row["prompt"].startswith("\n\nHuman:") and row["prompt"].endswith("\n\nAssistant:")
        assert row["chosen"] and row["rejected"] and row["chosen"] != row["rejected"]
        assert row["chosen"] == row["chosen"].strip()
    lengths = report["lengths"]["train"]
    assert lengths["prompt_tokens"]["max"] >= lengths["prompt_tokens"]["p95"] >= lengths["prompt_tokens"]["p50"]


def test_raw_gz_file_counts_and_budget_drops(tmp_path):
    report, out = run_data(tmp_path, config(RAW_HH, max_prompt_tokens=128, max_response_tokens=48))
    assert report["pairs_read"] == 2312
    dropped = report["dropped"]
    assert dropped["prompt_mismatch"] == 5 and dropped["empty_response"] == 4
    assert dropped["prompt_too_long"] > 0 and dropped["response_too_long"] > 0
    assert report["kept"] + sum(dropped.values()) == 2312
    assert report["train"] + report["test"] == report["kept"]
    assert report["lengths"]["train"]["prompt_tokens"]["max"] <= 128
    assert report["lengths"]["train"]["chosen_tokens"]["max"] <= 48
    assert report["lengths"]["test"]["rejected_tokens"]["max"] <= 48


def test_split_is_deterministic_and_disjoint(tmp_path):
    cfg = config(HH_PREFS_SAMPLE, max_pairs=200)
    _, out_a = run_data(tmp_path, cfg, "a")
    _, out_b = run_data(tmp_path, cfg, "b")
    assert (out_a / "train_prefs.jsonl").read_bytes() == (out_b / "train_prefs.jsonl").read_bytes()
    assert (out_a / "test_prefs.jsonl").read_bytes() == (out_b / "test_prefs.jsonl").read_bytes()
    train, test = read_prefs(out_a / "train_prefs.jsonl"), read_prefs(out_a / "test_prefs.jsonl")
    assert (len(train), len(test)) == (150, 50)
    key = lambda r: (r["prompt"], r["chosen"], r["rejected"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in test}

    cfg_other_seed = load_config("tiny", {**{"seed": 1}, "data": cfg.data.__dict__})
    _, out_c = run_data(tmp_path, cfg_other_seed, "c")
    assert read_prefs(out_c / "test_prefs.jsonl") != test


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        raw("\n\nHuman: hi", "Hello.", "Go away."),
        raw("\n\nHuman: how are you", "Fine, thanks.", "Bad."),
        '{"chosen": "\\n\\nHuman: broken',
        raw("\n\nHuman: name a colour", "Blue.", "I will not."),
    ])
    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        run_data(tmp_path, config(path))


@pytest.mark.parametrize("bad_line, reason", [
    ('["a list"]', "expected a JSON object"),
    ('{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: yes"}', "'rejected' is missing"),
    ('{"chosen": "no dialogue at all", "rejected": "none here"}', "not an HH dialogue"),
    ('{"chosen": [{"role": "user", "content": "hi"}], "rejected": "no"}', "both must be text or both lists"),
])
def test_malformed_record_kinds(tmp_path, bad_line, reason):
    path = write_lines(tmp_path / "pairs.jsonl", [raw("\n\nHuman: hi", "Hello.", "Go away."), bad_line])
    with pytest.raises(DataError, match=rf"pairs.jsonl:2: .*{reason}"):
        run_data(tmp_path, config(path))


def test_skip_bad_lines_counts_them(tmp_path):
    lines = [raw(f"\n\nHuman: question {i}", f"Answer {i}.", f"Another answer {i}.") for i in range(8)]
    lines.insert(2, "not json")
    lines.insert(5, '{"chosen": 1, "rejected": 2}')
    path = write_lines(tmp_path / "pairs.jsonl", lines)
    report, _ = run_data(tmp_path, config(path, skip_bad_lines=True))
    assert report["bad_lines"] == 2
    assert report["source"]["bad_line_examples"][0].startswith(f"{path}:3:")
    assert report["source"]["bad_line_examples"][1].startswith(f"{path}:6:")
    assert report["pairs_read"] == 8 and report["kept"] == 8


def test_drop_reasons_and_dedupe(tmp_path):
    path = write_lines(tmp_path / "pairs.jsonl", [
        raw("\n\nHuman: a", "Yes.", "No."),
        raw("\n\nHuman: a", "Yes.", "No."),              # exact duplicate
        raw("\n\nHuman: a", "No.", "Yes."),              # the same pair, labels swapped: duplicate too
        raw("\n\nHuman: b", "Same.", "Same."),           # identical responses
        raw("\n\nHuman: c", "", "Something."),           # empty response
        json.dumps({"chosen": "\n\nHuman: d\n\nAssistant: x", "rejected": "\n\nHuman: e\n\nAssistant: y"}),
        raw("\n\nHuman: " + "long " * 60, "Ok.", "Fine."),  # prompt over budget
        raw("\n\nHuman: f", "word " * 30, "Short."),     # response over budget
        raw("\n\nHuman: g", "Good.", "Bad."),
        raw("\n\nHuman: h", "Sure.", "Nope."),
    ])
    report, _ = run_data(tmp_path, config(path, max_prompt_tokens=40, max_response_tokens=20))
    assert report["dropped"] == {"duplicate": 2, "identical_responses": 1, "empty_response": 1,
                                 "prompt_mismatch": 1, "prompt_too_long": 1, "response_too_long": 1}
    assert report["kept"] == 3 and report["train"] + report["test"] == 3


def test_processed_prompts_are_normalised(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [
        json.dumps({"prompt": "Human: hi\n\nAssistant: hello\n\nHuman: bye", "chosen": " Bye! ", "rejected": "No."}),
        json.dumps({"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": "A.", "rejected": "B."}),
    ])
    _, out = run_data(tmp_path, config(path, test_fraction=0.5))
    rows = sorted(read_prefs(out / "train_prefs.jsonl") + read_prefs(out / "test_prefs.jsonl"),
                  key=lambda r: r["prompt"])
    assert rows == [
        {"prompt": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:", "chosen": "Bye!",
         "rejected": "No."},
        {"prompt": "\n\nHuman: q\n\nAssistant:", "chosen": "A.", "rejected": "B."},
    ]


def test_directory_source_reads_every_file(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    write_lines(src / "a.jsonl", [raw("\n\nHuman: a", "Yes.", "No.")])
    with gzip.open(src / "sub" / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(raw("\n\nHuman: b", "Yes.", "No.") + "\n" + raw("\n\nHuman: c", "Yes.", "No.") + "\n")
    (src / "notes.txt").write_text("ignored")
    report, _ = run_data(tmp_path, config(src))
    assert report["pairs_read"] == 3
    assert report["source"]["files"] == [str(src / "a.jsonl"), str(src / "sub" / "b.jsonl.gz")]


def test_gold_labels_follow_the_gold_scorer(tmp_path):
    report, out = run_data(tmp_path, config(HH_PREFS_SAMPLE, labels="gold", max_pairs=300, gold_empty_fraction=0.2))
    assert report["dropped"]["gold_tie"] > 0
    assert 0.3 < report["gold_agrees_with_human"] < 0.7  # human labels on HH are not about length
    train, test = read_prefs(out / "train_prefs.jsonl"), read_prefs(out / "test_prefs.jsonl")
    rows = train + test
    empties = [r for r in train if r["rejected"] == ""]
    assert 0 < len(empties) == report["gold_empty_pairs_added"]
    assert not any(r["rejected"] == "" for r in test)  # augmentation is for training only
    for row in rows:
        assert gold.prefers(row["prompt"], row["chosen"], row["rejected"]) is True
    assert report["lengths"]["train"]["chosen_shorter_fraction"] > 0.9


def test_no_prompt_is_on_both_sides_of_the_split(tmp_path):
    """Split by prompt, before augmentation: held-out prompts and their responses are never trained on."""
    # Several pairs per prompt, as HH-RLHF has: a pair-level split would put most prompts on both sides.
    lines = [raw(f"\n\nHuman: question {q}", f"Answer {q}.{k} " + "yes " * (k + 1), f"No {q}.{k}.")
             for q in range(30) for k in range(4)]
    path = write_lines(tmp_path / "many.jsonl", lines)
    for labels in ("human", "gold"):
        report, out = run_data(tmp_path / labels, config(path, labels=labels, test_fraction=0.2,
                                                         gold_empty_fraction=1.0))
        train, test = read_prefs(out / "train_prefs.jsonl"), read_prefs(out / "test_prefs.jsonl")
        assert train and test
        assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
        assert report["test"] == len(test) and abs(len(test) - 0.2 * report["kept"]) <= 4  # whole prompts


def test_missing_source_and_too_few_pairs(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        run_data(tmp_path, config(tmp_path / "nope.jsonl"))
    path = write_lines(tmp_path / "one.jsonl", [raw("\n\nHuman: a", "Yes.", "No.")])
    with pytest.raises(DataError, match="too few"):
        run_data(tmp_path, config(path))


@pytest.mark.timeout(60)
def test_hub_source_offline_fails_at_once_with_advice(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as info:
        run_data(tmp_path, config("Anthropic/hh-rlhf", data_dir="harmless-base"))
    message = str(info.value)
    assert "Anthropic/hh-rlhf" in message and "cannot be reached" in message
    assert "data.source" in message


def test_balance_by_length_leaves_length_no_say_in_the_labels():
    from edgerlhf.data import balance_by_length

    def pair(i, chosen_words, rejected_words):
        return {"prompt": f"p{i}", "chosen": " ".join(["a"] * chosen_words),
                "rejected": " ".join(["b"] * rejected_words)}

    pairs = ([pair(i, 10, 4) for i in range(5)]          # chosen longer by 6: stratum [6, 11)
             + [pair(10 + i, 4, 10) for i in range(2)]   # chosen shorter by 6
             + [pair(20 + i, 5, 5) for i in range(3)]    # equal lengths: always kept
             + [pair(30, 30, 2)])                         # longer by 28, alone in its stratum: dropped
    kept = balance_by_length(pairs)
    assert [p["prompt"] for p in kept] == ["p0", "p1", "p10", "p11", "p20", "p21", "p22"]  # input order


def test_content_gold_data_is_balanced_by_length_and_reports_length_correlations(tmp_path):
    report, out = run_data(tmp_path, config(HH_PREFS_SAMPLE, labels="gold", gold_scorer="you", max_pairs=None))
    assert report["dropped"]["length_balance"] > 0
    rows = read_prefs(out / "train_prefs.jsonl") + read_prefs(out / "test_prefs.jsonl")
    real = [r for r in rows if r["rejected"]]
    longer = sum(gold.words(r["chosen"]) > gold.words(r["rejected"]) for r in real)
    shorter = sum(gold.words(r["chosen"]) < gold.words(r["rejected"]) for r in real)
    assert longer == shorter  # balanced before the split, so over both sides together
    assert all(gold.prefers(r["prompt"], r["chosen"], r["rejected"], "you") for r in rows)
    correlation = report["gold_length_correlation"]
    assert set(correlation) == set(gold.SCORERS)
    assert correlation["concise"] == -1.0  # minus the word count, exactly
    assert all(abs(correlation[name]) < 0.3 for name in gold.CONTENT_GOLDS), correlation
