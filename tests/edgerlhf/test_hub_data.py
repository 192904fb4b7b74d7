"""Data sets read from the hub by id, against a stand-in hub (`tests/support/stand_in_hub.py`): the real
huggingface_hub client lists the repository, bounds and downloads the subset asked for, and `datasets` reads its split.

The repository `someorg/somedata` is written here from rows of the local HH-RLHF sample: two preference subsets
(`harmless-base` with a train and a test split, `helpful-base`) and one of multi-turn conversations (`chat`, a
`.jsonl.gz` the hub serves from LFS through its CDN redirect). Each check runs in a process of its own whose
`HF_ENDPOINT` is the stand-in, online and with a hub cache in the test's temp dir (the suite itself is offline).
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edgerlhf.config import HH_PREFS_SAMPLE
from edgerlhf.dialogue import HUMAN

from ..support.procs import REPO_ROOT
from ..support.stand_in_hub import StandInHub, hub_env, stand_in_hub

pytestmark = pytest.mark.timeout(120)

REPO_ID = "someorg/somedata"
SUBSET_FILES = {"harmless-base/train.jsonl", "harmless-base/test.jsonl"}


def sample_rows(n: int) -> list[dict[str, str]]:
    """The first `n` rows of the HH sample that cleaning keeps whole: two different non-empty answers, and no
    prompt or answer seen before (so every count below is exact)."""
    rows, seen = [], set()
    with open(HH_PREFS_SAMPLE, encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            texts = (row["prompt"], row["chosen"].strip(), row["rejected"].strip())
            if all(texts[1:]) and texts[1] != texts[2] and not seen & set(texts):
                seen.update(texts)
                rows.append(row)
                if len(rows) == n:
                    return rows
    raise AssertionError(f"the HH sample has fewer than {n} usable rows")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()
    path.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)


@pytest.fixture
def repo(tmp_path) -> dict:
    """The repository's directory and what each subset holds."""
    rows = sample_rows(102)
    chats = [{"messages": [{"role": "user", "content": f"Tell me something, please ({i})."},
                           {"role": "assistant", "content": rows[82 + 2 * i]["chosen"].strip()},
                           {"role": "user", "content": f"And then? ({i})"},
                           {"role": "assistant", "content": rows[83 + 2 * i]["chosen"].strip()}]} for i in range(10)]
    parts = {"harmless-base/train.jsonl": rows[:30], "harmless-base/test.jsonl": rows[30:42],
             "helpful-base/train.jsonl": rows[42:82], "chat/train.jsonl.gz": chats}
    root = tmp_path / "somedata"
    for path, part in parts.items():
        write_jsonl(root / path, part)
    (root / "README.md").write_text("# somedata\n\nA stand-in data set.\n")
    (root / ".gitattributes").write_text("*.gz filter=lfs diff=lfs merge=lfs -text\n")
    return {"root": root, **parts}


@pytest.fixture
def hub(repo) -> StandInHub:
    with stand_in_hub(datasets={REPO_ID: repo["root"]}) as hub:
        yield hub


def run_python(code: str, hub: StandInHub, tmp_path: Path, *args: str) -> dict:
    """Run `code` in a process talking to `hub`; what it prints last, as JSON."""
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=90, env=hub_env(hub, tmp_path / "hf-home", OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def snapshot_files(tmp_path: Path) -> set[str]:
    """The files of the repository in the hub cache of `run_python`'s processes."""
    snapshots = tmp_path / "hf-home" / "hub" / f"datasets--{REPO_ID.replace('/', '--')}" / "snapshots"
    return {p.relative_to(s).as_posix() for s in snapshots.iterdir() for p in s.rglob("*") if p.is_file()}


READ = """
import json, sys
from edgerlhf import formats, locations
if len(sys.argv) > 3:
    locations.set_download_limit(int(sys.argv[3]))
try:
    read = formats.read(sys.argv[1], setting="data.source", **json.loads(sys.argv[2]))
except Exception as exc:
    print(json.dumps({"error": type(exc).__name__, "module": type(exc).__module__, "message": str(exc)}))
else:
    print(json.dumps({"kind": read.detected.kind, "conversational": read.detected.conversational, "rows": read.rows,
                      "records": read.records, "source": read.source}))
"""


def read_hub(hub, tmp_path, repo_id: str, limit: int | None = None, **subset) -> dict:
    return run_python(READ, hub, tmp_path, repo_id, json.dumps(subset), *([str(limit)] if limit else []))


def test_a_subset_and_split_of_a_hub_data_set(hub, repo, tmp_path):
    got = read_hub(hub, tmp_path, REPO_ID, data_dir="harmless-base", split="test")
    assert "error" not in got, got
    assert (got["kind"], got["conversational"], got["rows"]) == ("preference", False, 12)
    assert got["source"] == {"kind": "hub", "dataset": REPO_ID, "name": None, "data_dir": "harmless-base",
                             "split": "test"}
    # The test split's rows, in order, and nothing of the train split.
    assert [r["chosen"] for r in got["records"]] == [r["chosen"].strip() for r in repo["harmless-base/test.jsonl"]]
    assert all(r["prompt"].startswith(HUMAN) and r["prompt"].endswith("\n\nAssistant:") for r in got["records"])
    # Only the subset was downloaded: neither the other subsets nor the files at the root.
    assert sorted(path for _, path in hub.fetched) == sorted(SUBSET_FILES)
    assert snapshot_files(tmp_path) == SUBSET_FILES
    assert hub.unanswered == []


def test_the_data_stage_reads_its_data_sets_from_the_hub(hub, repo, tmp_path):
    code = ("import json, sys\nfrom edgerlhf.config import load_config\nfrom edgerlhf.context import RunContext\n"
            "from edgerlhf.pipeline import run_stage\n"
            "run_stage('data', load_config('tiny', json.loads(sys.argv[1])), RunContext(sys.argv[2]))\n"
            "print('{}')")
    overrides = {"data": {"source": REPO_ID, "data_dir": "harmless-base", "split": "train", "labels": "human",
                          "max_pairs": None, "test_fraction": 0.25, "max_prompt_tokens": 4096,
                          "max_response_tokens": 4096},
                 "sft_data": {"source": REPO_ID, "data_dir": "chat", "split": "train"}}
    run_python(code, hub, tmp_path, json.dumps(overrides), str(tmp_path / "run"))

    data = tmp_path / "run" / "data"
    rows = {name: [json.loads(line) for line in (data / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train_prefs", "test_prefs", "sft_train", "sft_test", "prompts_train", "prompts_test")}
    # The 30 pairs of harmless-base's train split, all of them and nothing else, split by prompt.
    pairs = rows["train_prefs"] + rows["test_prefs"]
    assert rows["train_prefs"] and rows["test_prefs"]
    assert sorted(p["chosen"] for p in pairs) == sorted(r["chosen"].strip() for r in repo["harmless-base/train.jsonl"])
    assert not {p["prompt"] for p in rows["train_prefs"]} & {p["prompt"] for p in rows["test_prefs"]}
    assert [p["prompt"] for p in rows["prompts_train"]] == [p["prompt"] for p in rows["train_prefs"]]
    assert len(rows["prompts_test"]) == len(rows["test_prefs"])
    # SFT's own data set: one demonstration per assistant turn of the 10 conversations, the turns before it its prompt.
    demos = rows["sft_train"] + rows["sft_test"]
    answers = [m["content"] for chat in repo["chat/train.jsonl.gz"] for m in chat["messages"]
               if m["role"] == "assistant"]
    assert rows["sft_train"] and rows["sft_test"]
    assert sorted(d["completion"] for d in demos) == sorted(answers)
    assert sorted(d["prompt"].count(HUMAN) for d in demos) == [1] * 10 + [2] * 10
    report = json.loads((data / "report.json").read_text())
    assert report["source"]["dataset"] == REPO_ID and report["source"]["data_dir"] == "harmless-base"
    assert (report["pairs_read"], report["kept"], report["dropped"]) == (30, 30, {})
    sft = report["demonstrations"]
    assert (sft["source"]["data_dir"], sft["source"]["format"], sft["source"]["conversational"]) == \
        ("chat", "demonstration", True)
    assert (sft["read"], sft["train"] + sft["test"]) == (20, 20)
    # Both subsets came from the hub (the LFS one through the CDN); the third never did.
    assert sorted(path for _, path in hub.fetched) == sorted(SUBSET_FILES | {"chat/train.jsonl.gz"})
    assert hub.unanswered == []


def test_an_unknown_repository_is_a_data_error_naming_it(hub, tmp_path):
    got = read_hub(hub, tmp_path, "someorg/nope", data_dir="harmless-base", split="train")
    assert (got.get("module"), got.get("error")) == ("edgerlhf.formats", "DataError"), got
    assert "'someorg/nope'" in got["message"] and "no such dataset repository on the hub" in got["message"]
    assert "Point data.source at an absolute local file" in got["message"]
    assert hub.fetched == [] and hub.unanswered == []
    assert ("GET", "/api/datasets/someorg/nope/revision/main") in hub.requests


def test_a_subset_above_the_download_limit_is_refused_before_any_download(hub, repo, tmp_path):
    sizes = {path: (repo["root"] / path).stat().st_size for path in SUBSET_FILES | {"helpful-base/train.jsonl"}}
    assert sizes["helpful-base/train.jsonl"] > sizes["harmless-base/train.jsonl"] > sizes["harmless-base/test.jsonl"]
    got = read_hub(hub, tmp_path, REPO_ID, limit=1000, data_dir="harmless-base", split="train")
    assert got.get("error") == "DataError", got
    # The listing's sizes of the subset's two files, not of the larger file of the other subset.
    assert "its 2 file(s) to download" in got["message"] and "the largest, harmless-base/train.jsonl" in got["message"]
    assert "EDGERLHF_MAX_DOWNLOAD_BYTES" in got["message"]
    assert hub.fetched == []


@pytest.mark.parametrize("subset, named", [({"data_dir": "harmles-base", "split": "train"}, "harmles-base"),
                                           ({"data_dir": "harmless-base", "split": "validation"}, "validation")])
def test_an_unknown_subset_or_split_is_a_data_error_naming_it(hub, tmp_path, subset, named):
    got = read_hub(hub, tmp_path, REPO_ID, **subset)
    assert (got.get("module"), got.get("error")) == ("edgerlhf.formats", "DataError"), got
    assert REPO_ID in got["message"] and named in got["message"]
