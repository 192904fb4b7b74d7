"""Where a model, a tokenizer or a data set comes from: a hub id or an absolute local path, never a guess.

A value from a config (`model.name_or_path`, `model.tokenizer`, `data.source`) is local if and only if it
is an absolute path (`~` is expanded). Anything else is a Hugging Face hub id (`name` or `org/name`) and
is never looked up on disk: `from_pretrained("outside")` and `datasets.load_dataset("outside")` would
first try `./outside` relative to the working directory, so a job could read files outside the allowed
roots. A hub id is therefore fetched with `huggingface_hub.snapshot_download` (which only ever looks in
the hub cache) and loaded from the absolute directory it returns. The command line turns the relative
paths a person types into absolute ones before a config is built (`absolute_local_paths`); the service
refuses them (backend/api/validation.py).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
"""`distilgpt2`, `Anthropic/hh-rlhf`: what the hub accepts as a repository id."""

LOCAL_SUFFIXES = (".json", ".jsonl", ".gz", ".csv", ".parquet", ".txt", ".arrow", ".bin", ".safetensors", ".pt")
"""A name ending like a file is a local path, never a hub id."""

MODEL_FILES = ["*.json", "*.safetensors", "*.bin", "*.txt", "*.model", "*.tiktoken", "*.jinja"]
"""What a model or tokenizer snapshot downloads (not the TF/Flax/ONNX copies many repositories also hold)."""


class LocationError(ValueError):
    """A config value is neither an absolute local path nor a hub id, or the hub copy cannot be had."""


def is_local(value: str) -> bool:
    return os.path.isabs(os.path.expanduser(value))


def is_hub_id(value: str) -> bool:
    return bool(HUB_ID.match(value)) and ".." not in value and not value.lower().endswith(LOCAL_SUFFIXES)


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers at all; False at once when HF_HUB_OFFLINE is set."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def offline_hub():
    """Put huggingface_hub in offline mode for a moment, so nothing waits on network retries."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def hub_snapshot(repo_id: str, repo_type: str = "model", allow_patterns: list[str] | None = None) -> Path:
    """The absolute local directory of a hub repository: downloaded, or from the cache when offline.

    huggingface_hub retries an unreachable hub for about a minute; we probe the hub once (a TCP connect,
    3 s at most) and, when it does not answer, use the cache only. Raises `LocationError` saying what to
    do when the repository can be had neither way.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError

    if not is_hub_id(repo_id):
        raise LocationError(f"{repo_id!r} is neither a hub id ('name' or 'org/name') nor an absolute local path")
    online = hub_reachable()
    if online and repo_type == "model" and allow_patterns == MODEL_FILES:
        allow_patterns = _without_duplicate_weights(repo_id)
    try:
        with contextlib.nullcontext() if online else offline_hub():
            return Path(snapshot_download(repo_id, repo_type=repo_type, allow_patterns=allow_patterns,
                                          local_files_only=not online))
    except LocalEntryNotFoundError as exc:
        raise LocationError(f"{repo_id!r}: the Hugging Face hub cannot be reached (offline) and it is not in the "
                            "local cache") from exc
    except GatedRepoError as exc:
        raise LocationError(f"{repo_id!r} is gated on the Hugging Face hub: accept its licence on "
                            f"https://huggingface.co/{repo_id} and set HF_TOKEN to an access token of that account "
                            f"(or `hf auth login`)") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise LocationError(f"{repo_id!r} cannot be downloaded from the hub: {exc}") from exc


def _without_duplicate_weights(repo_id: str) -> list[str]:
    """`MODEL_FILES`, less the `.bin` weights when the repository also has safetensors (most hold both)."""
    from huggingface_hub import list_repo_files

    try:
        files = list_repo_files(repo_id)
    except Exception:  # the download that follows reports the real problem
        return MODEL_FILES
    if any(f.endswith(".safetensors") for f in files):
        return [p for p in MODEL_FILES if p != "*.bin"]
    return MODEL_FILES


def absolute_local_paths(value: str) -> str:
    """For the command line: a value that is not a hub id (`./x`, `data/pairs.jsonl`) is a path relative to
    the current directory and becomes absolute; hub ids and absolute paths stay as they are."""
    if is_local(value) or is_hub_id(value):
        return value
    return str(Path(value).expanduser().resolve())
