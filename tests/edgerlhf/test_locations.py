"""Hub downloads are bounded: the files a snapshot would fetch are summed from the hub's listing (path and size of each
file, as `HfApi.list_repo_tree` gives them) before anything is downloaded, and a snapshot above the limit is refused
with a message that says how to go on. Offline tests cannot reach the hub, so the check is a pure function of that
listing, tested here on listings shaped like real repositories'."""

from __future__ import annotations

import pytest

from edgerlhf import locations
from edgerlhf.locations import LocationError, download_size

GB = 10**9
MODEL_REPO = [(".gitattributes", 1_519), ("README.md", 8_000), ("config.json", 762), ("generation_config.json", 124),
              ("merges.txt", 456_318), ("model.safetensors", 352_824_413), ("pytorch_model.bin", 352_833_716),
              ("tf_model.h5", 498_000_000), ("flax_model.msgpack", 497_000_000), ("onnx/decoder_model.onnx", 6 * GB),
              ("tokenizer.json", 1_355_256), ("vocab.json", 1_042_301)]
"""distilgpt2's layout: safetensors and a .bin copy, TF, Flax and a large ONNX export nobody here loads."""
DATASET_REPO = [("README.md", 5_000), ("harmless-base/train.jsonl.gz", 13_200_000),
                ("harmless-base/test.jsonl.gz", 743_000), ("helpful-base/train.jsonl.gz", 16_200_000),
                ("red-team-attempts/red_team_attempts.jsonl.gz", 3 * GB)]


def test_only_the_files_the_snapshot_would_fetch_count():
    weights = [p for p in locations.MODEL_FILES if p != "*.bin"]
    assert download_size("distilgpt2", MODEL_REPO, weights, limit=GB) == 762 + 124 + 456_318 + 352_824_413 + \
        1_355_256 + 1_042_301  # the ONNX export, the TF/Flax copies and the .bin duplicate are not fetched
    assert download_size("Anthropic/hh-rlhf", DATASET_REPO, ["harmless-base/*"], limit=GB) == 13_200_000 + 743_000


def test_a_snapshot_above_the_limit_is_refused_before_anything_is_downloaded():
    with pytest.raises(LocationError) as err:
        download_size("Anthropic/hh-rlhf", DATASET_REPO, None, limit=GB)
    message = str(err.value)
    assert "Anthropic/hh-rlhf" in message and "3.0 GB" in message and "1.0 GB" in message
    assert "EDGERLHF_MAX_DOWNLOAD_BYTES" in message and "absolute local" in message
    with pytest.raises(LocationError):
        download_size("distilgpt2", MODEL_REPO, ["*.onnx", "onnx/*"], limit=GB)
    # A file whose size the hub does not give counts as too large: nothing unbounded slips through.
    with pytest.raises(LocationError, match="size"):
        download_size("someone/model", [("config.json", 700), ("model.safetensors", None)], None, limit=GB)


def test_the_service_sets_the_limit_the_job_process_downloads_under():
    default = locations.download_limit()
    try:
        locations.set_download_limit(123)
        assert locations.download_limit() == 123
    finally:
        locations.set_download_limit(default)
