"""Own data (`edgerlhf.formats`): every format, text and conversational, in every file type `datasets` reads, from
files written here out of the shared HH sample; detection and its refusals; column mapping; the data stage's
files for each stage."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from edgerlhf import formats
from edgerlhf.config import HH_PREFS_SAMPLE, load_config
from edgerlhf.context import RunContext
from edgerlhf.data import demonstrations, prompts, read_prefs, run
from edgerlhf.dialogue import normalize_prompt, to_messages
from edgerlhf.formats import DataError

N = 40


@pytest.fixture(scope="module")
def hh():
    """The first N pairs of the shared sample (prompt/chosen/rejected, single-turn prompts only)."""
    rows = [json.loads(line) for line in Path(HH_PREFS_SAMPLE).read_text().splitlines()]
    return [{**r, "prompt": normalize_prompt(r["prompt"])} for r in rows
            if r["prompt"].count("Human:") == 1 and r["chosen"] and r["rejected"]][:N]


def question(prompt: str) -> str:
    return to_messages(prompt)[0]["content"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` in the file type of `path`'s name: .jsonl, .json, .csv, .parquet, each also .gz."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif name.endswith(".json"):
        text = json.dumps(rows)
    elif name.endswith(".csv"):
        import io

        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = buffer.getvalue()
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
        return path
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# --- formats, text and conversational -------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".jsonl.gz", ".csv.gz"])
def test_explicit_preferences_in_every_file_type(tmp_path, hh, suffix):
    rows = [{"prompt": question(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]} for r in hh]
    read = formats.read(str(write(tmp_path / f"pairs{suffix}", rows)))
    assert read.detected.kind == "preference" and not read.detected.conversational
    assert read.records == [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in hh]


def test_conversational_preferences_explicit_and_implicit(tmp_path, hh):
    explicit = [{"prompt": user(question(r["prompt"])), "chosen": assistant(r["chosen"]),
                 "rejected": assistant(r["rejected"])} for r in hh]
    implicit = [{"chosen": user(question(r["prompt"])) + assistant(r["chosen"]),
                 "rejected": user(question(r["prompt"])) + assistant(r["rejected"])} for r in hh]
    expected = [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in hh]
    for rows in (explicit, implicit):
        read = formats.read(str(write(tmp_path / "pairs.jsonl", rows)))
        assert read.detected.kind == "preference" and read.detected.conversational
        assert read.records == expected


def test_hh_raw_dialogues_are_implicit_preferences(tmp_path, hh):
    rows = [{"chosen": r["prompt"] + " " + r["chosen"], "rejected": r["prompt"] + " " + r["rejected"]} for r in hh]
    read = formats.read(str(write(tmp_path / "raw.jsonl", rows)))
    assert "HH-RLHF dialogues" in read.detected.reason
    assert read.records == [{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in hh]


def test_demonstrations_prompt_completion_messages_and_text(tmp_path, hh):
    expected = [{"prompt": r["prompt"], "completion": r["chosen"]} for r in hh]
    standard = [{"prompt": question(r["prompt"]), "completion": r["chosen"]} for r in hh]
    conversational = [{"prompt": user(question(r["prompt"])), "completion": assistant(r["chosen"])} for r in hh]
    messages = [{"messages": user(question(r["prompt"])) + assistant(r["chosen"])} for r in hh]
    text = [{"text": r["prompt"] + " " + r["chosen"]} for r in hh]
    for name, rows in (("standard", standard), ("conversational", conversational), ("messages", messages),
                       ("text", text)):
        read = formats.read(str(write(tmp_path / f"{name}.jsonl", rows)))
        assert read.detected.kind == "demonstration", name
        assert read.records == expected, name


def test_a_multi_turn_conversation_gives_one_demonstration_per_assistant_turn(tmp_path):
    conversation = [{"role": "system", "content": "Be brief."}, *user("Hi"), *assistant("Hello."),
                    *user("Name a colour"), *assistant("Blue."), *user("Thanks")]
    read = formats.read(str(write(tmp_path / "chat.jsonl", [{"messages": conversation}])))
    assert read.records == [
        {"prompt": "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant:", "completion": "Hello."},
        {"prompt": "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour\n\nAssistant:",
         "completion": "Blue."}]
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Name a colour\n\nAssistant: Blue."
    assert [r["completion"] for r in formats.read(str(write(tmp_path / "t.jsonl", [{"text": dialogue}]))).records] \
        == ["Hello.", "Blue."]


def test_prompts_keep_their_other_columns_and_unpaired_labels_are_read(tmp_path, hh):
    rows = [{"prompt": question(r["prompt"]), "answer": str(i), "source": "hh"} for i, r in enumerate(hh)]
    read = formats.read(str(write(tmp_path / "prompts.csv", rows)))
    assert read.detected.kind == "prompt" and read.detected.extra == ("answer", "source")
    assert read.records[3] == {"prompt": hh[3]["prompt"], "answer": 3, "source": "hh"}  # a CSV column of numbers
    unpaired = [{"prompt": question(r["prompt"]), "completion": r["chosen"], "label": label}
                for r, label in zip(hh, [True, False, "true", "0"] * N)]
    read = formats.read(str(write(tmp_path / "kto.jsonl", unpaired)))
    assert read.detected.kind == "unpaired" and [r["label"] for r in read.records[:4]] == [True, False, True, False]


# --- detection, mapping, errors ------------------------------------------------------------------------


def test_a_column_mapping_renames_before_detection(tmp_path, hh):
    rows = [{"question": question(r["prompt"]), "good": r["chosen"], "bad": r["rejected"]} for r in hh]
    path = str(write(tmp_path / "mine.jsonl", rows))
    with pytest.raises(DataError, match=r"columns \['bad', 'good', 'question'\] fit no format"):
        formats.read(path)
    read = formats.read(path, columns={"question": "prompt", "good": "chosen", "bad": "rejected"})
    assert read.records[0] == {"prompt": hh[0]["prompt"], "chosen": hh[0]["chosen"], "rejected": hh[0]["rejected"]}


@pytest.mark.parametrize("columns, message", [
    ({"prompt", "chosen", "rejected", "completion"}, "ambiguous: they fit preference"),
    ({"prompt", "completion", "messages"}, "ambiguous"),
    ({"chosen", "answer"}, "fit no format"),
])
def test_ambiguous_or_unknown_columns_are_refused_naming_them(columns, message):
    row = {c: "x" for c in columns}
    with pytest.raises(DataError, match=message) as info:
        formats.detect(row, [row])
    assert all(c in str(info.value) for c in columns)


def test_a_named_format_picks_its_columns_from_a_wider_file(tmp_path, hh):
    path = str(write(tmp_path / "pairs.jsonl", [{"prompt": question(r["prompt"]), "chosen": r["chosen"],
                                                  "rejected": r["rejected"]} for r in hh]))
    read = formats.read(path, kind="prompt")
    assert read.detected.kind == "prompt" and read.records[0]["prompt"] == hh[0]["prompt"]


def test_a_bad_row_is_named_by_file_row_and_column(tmp_path, hh):
    rows = [{"prompt": question(r["prompt"]), "completion": r["chosen"]} for r in hh[:3]]
    rows[1]["completion"] = 7
    path = write(tmp_path / "demos.csv", rows)  # a CSV reads 7 as text: only JSON keeps the type
    assert formats.read(str(path)).records[1]["completion"] == "7"
    path = write(tmp_path / "demos.jsonl", rows)
    with pytest.raises(DataError, match=rf"{path}:2: column 'completion': expected text"):
        formats.read(str(path))
    read = formats.read(str(path), skip_bad_rows=True)
    assert read.bad_rows == 1 and len(read.records) == 2 and read.bad_row_examples[0].startswith(f"{path}:2:")


def test_an_unreadable_file_or_an_unknown_type_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="not a data file"):
        formats.read(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: cannot read it as parquet"):
        formats.read(str(tmp_path / "broken.parquet"))


# --- the data stage: a file per stage --------------------------------------------------------------


def data_stage(tmp_path, name: str, **sections) -> tuple[dict, Path]:
    cfg = load_config("tiny", {**sections, "data": {"labels": "human", "max_pairs": None, "test_fraction": 0.25,
                                                    "max_prompt_tokens": 4096, "max_response_tokens": 4096,
                                                    **sections.get("data", {})}})
    ctx = RunContext(tmp_path / name)
    ctx.begin_stage("data")
    return run(cfg, ctx).model_dump(), ctx.run_dir


def test_preference_data_gives_every_stage_its_file(tmp_path, hh):
    path = write(tmp_path / "pairs.jsonl", [{"prompt": user(question(r["prompt"])), "chosen": assistant(r["chosen"]),
                                             "rejected": assistant(r["rejected"])} for r in hh])
    report, run_dir = data_stage(tmp_path, "prefs", data={"source": str(path)})
    assert report["format"] == "preference" and report["source"]["conversational"]
    train = read_prefs(run_dir / "data/train_prefs.jsonl")
    assert demonstrations(run_dir) == [{"prompt": p, "completion": c}
                                       for p, c in sorted({(r["prompt"], r["chosen"]) for r in train})]
    assert prompts(run_dir) == [{"prompt": r["prompt"]} for r in train]
    assert report["sft_examples"]["train"] == len(demonstrations(run_dir))


def test_separate_data_per_stage(tmp_path, hh):
    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": question(r["prompt"]), "chosen": r["chosen"],
                                              "rejected": r["rejected"]} for r in hh[:20]])
    demos = write(tmp_path / "demos.jsonl", [{"messages": user(f"Say {i}") + assistant(f"{i}.")} for i in range(12)])
    asks = write(tmp_path / "asks.csv", [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(16)])
    report, run_dir = data_stage(tmp_path, "split", data={"source": str(pairs)},
                                 sft_data={"source": str(demos)},
                                 prompt_data={"source": str(asks), "columns": {"question": "prompt"}})
    sft_rows = demonstrations(run_dir) + demonstrations(run_dir, "test")
    assert sorted(r["completion"] for r in sft_rows) == sorted(f"{i}." for i in range(12))
    assert {r["prompt"] for r in demonstrations(run_dir)}.isdisjoint(r["prompt"] for r in demonstrations(run_dir, "test"))
    rows = prompts(run_dir) + prompts(run_dir, "test")
    assert len(rows) == 16 and all(set(r) == {"prompt", "answer"} for r in rows)
    assert report["demonstrations"]["source"]["format"] == "demonstration"
    assert report["prompts"]["source"]["detected"].startswith("columns prompt")
    assert report["prompts"]["train"] + report["prompts"]["test"] == 16
    assert len(read_prefs(run_dir / "data/train_prefs.jsonl")) + report["test"] == report["kept"]


def test_prompt_only_data_has_prompts_and_no_pairs(tmp_path):
    asks = write(tmp_path / "asks.jsonl", [{"prompt": f"Count to {i}.", "target": i} for i in range(20)])
    report, run_dir = data_stage(tmp_path, "prompts", data={"source": str(asks)})
    assert report["format"] == "prompt" and report["train"] == report["test"] == 0
    assert len(prompts(run_dir)) + len(prompts(run_dir, "test")) == 20 and demonstrations(run_dir) == []
    assert {"prompt", "target"} == set(prompts(run_dir)[0])
    with pytest.raises(DataError, match="prompts only"):
        data_stage(tmp_path, "no-sft", data={"source": str(asks)}, sft_data={"source": str(asks)})


# --- SFT's loss covers the assistant turns ----------------------------------------------------------


@pytest.mark.parametrize("template", [False, True], ids=["hh", "chatml"])
def test_sft_learns_every_assistant_turn_of_a_conversation_and_nothing_else(tmp_path, template):
    from edgerlhf.config import TINY_TOKENIZER_DIR
    from edgerlhf.dialogue import PromptFormat
    from edgerlhf.models import load_tokenizer
    from edgerlhf.sft import sft_dataset
    from tests.support.tiny import chat_template_tokenizer

    tokenizer = chat_template_tokenizer(tmp_path) if template else load_tokenizer(TINY_TOKENIZER_DIR)
    turns = ["Hello there.", "Blue, mostly.", "You are welcome."]
    conversation = [*user("Hi"), *assistant(turns[0]), *user("Name a colour"), *assistant(turns[1]),
                    *user("Thanks"), *assistant(turns[2])]
    records = formats.read(str(write(tmp_path / "chat.jsonl", [{"messages": conversation}]))).records
    examples = sft_dataset(records, tokenizer)
    fmt = PromptFormat.of(tokenizer)
    learned = sorted(tokenizer.decode([t for t, m in zip(e["input_ids"], e["completion_mask"]) if m])
                     for e in examples)
    assert learned == sorted(tokenizer.decode(tokenizer(fmt.answer(t), add_special_tokens=False)["input_ids"])
                             for t in turns)
    for e in examples:  # the rest of each example is its conversation so far, in the model's format
        prompt_ids = [t for t, m in zip(e["input_ids"], e["completion_mask"]) if not m]
        assert "Hi" in tokenizer.decode(prompt_ids)


# --- the pipeline on own data -------------------------------------------------------------------------


def test_the_pipeline_runs_on_own_pairs_demonstrations_and_prompts(tmp_path, hh):
    """Conversational pairs for the reward model, multi-turn demonstrations for SFT, a CSV of prompts with other
    column names for GRPO and the evaluation: every stage runs and reads its own data set."""
    from edgerlhf.pipeline import run_pipeline
    from tests.support.tiny import PIPELINE, tiny_config

    pairs = write(tmp_path / "pairs.jsonl", [{"prompt": user(question(r["prompt"])), "chosen": assistant(r["chosen"]),
                                              "rejected": assistant(r["rejected"])} for r in hh])
    demos = write(tmp_path / "demos.jsonl", [{"messages": user(question(r["prompt"])) + assistant(r["chosen"][:80])
                                              + user("Thanks") + assistant("Glad to help.")} for r in hh[:20]])
    asks = write(tmp_path / "asks.csv", [{"question": f"What is {i} plus {i}?", "answer": 2 * i} for i in range(24)])
    config = tiny_config(PIPELINE, algorithm="grpo", ppo={"samples_per_prompt": 2},
                         reward={"precisions": ["bf16"]},
                         data={"source": str(pairs), "labels": "human", "max_pairs": None,
                               "max_prompt_tokens": 96, "max_response_tokens": 64},
                         sft_data={"source": str(demos)},
                         prompt_data={"source": str(asks), "columns": {"question": "prompt"}})
    ctx = RunContext(tmp_path / "run")
    reports = run_pipeline(config, ctx)
    assert reports["data"].demonstrations.source.format == "demonstration"
    assert reports["sft"].train_examples == len(demonstrations(ctx.run_dir))
    own_prompts = {r["prompt"] for r in prompts(ctx.run_dir) + prompts(ctx.run_dir, "test")}
    trained_on = {s.prompt for s in ctx.samples if s.kind == "sample"}
    assert trained_on and trained_on <= own_prompts  # GRPO sampled the prompt set, not the pairs' prompts
    evaluated = {s.prompt for s in ctx.samples if s.kind == "eval"}
    assert evaluated and evaluated <= {r["prompt"] for r in prompts(ctx.run_dir, "test")}


def test_demonstrations_and_prompts_alone_align_against_a_stated_reward(tmp_path):
    """No preference pairs at all: SFT on demonstrations, then PPO on the prompts against a gold scorer."""
    from edgerlhf.pipeline import run_pipeline
    from tests.support.tiny import PIPELINE, tiny_config

    demos = write(tmp_path / "demos.jsonl", [{"prompt": f"Say {i}", "completion": f"I say {i}."} for i in range(24)])
    config = tiny_config(PIPELINE, stages=["data", "sft", "ppo", "evaluate"],
                         data={"source": str(demos), "labels": "human"}, ppo={"reward_function": "starts_with_i"})
    ctx = RunContext(tmp_path / "run")
    reports = run_pipeline(config, ctx)
    assert reports["data"].format == "demonstration" and reports["data"].train == 0
    assert reports["ppo"].steps == config.ppo.steps
    assert {s.prompt for s in ctx.samples if s.kind == "sample"} <= {r["prompt"] for r in prompts(ctx.run_dir)}


def test_the_data_command_shows_the_format_the_rows_and_the_budget_drops(tmp_path, hh, capsys):
    from edgerlhf import cli
    from edgerlhf.config import TINY_TOKENIZER_DIR

    assert cli.DISPATCH["data"] == "edgerlhf.formats:main"
    path = write(tmp_path / "mine.csv", [{"question": question(r["prompt"]), "answer": r["chosen"]} for r in hh])
    assert formats.main([str(path), "--columns", '{"question": "prompt", "answer": "completion"}', "--model",
                         TINY_TOKENIZER_DIR, "--max-response-tokens", "20", "--json", "--rows", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["format"] == "demonstration" and shown["records"] == N
    assert shown["examples"][0]["prompt"] == hh[0]["prompt"]  # GPT-2 has no chat template: the HH text
    assert shown["examples"][0]["completion"] == " " + hh[0]["chosen"] + "<|endoftext|>"
    assert 0 < shown["dropped_by_budget"] < N
    assert formats.main([str(path)]) == 2 and "fit no format" in capsys.readouterr().err
