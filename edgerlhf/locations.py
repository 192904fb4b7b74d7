"""Where a model, a tokenizer or a data set comes from: a hub id or an absolute local path, never a guess.

A value from a config (`model.name_or_path`, `model.tokenizer`, `data.source`) is local if and only if it
is an absolute path (`~` is expanded). Anything else is a Hugging Face hub id (`name` or `org/name`) and
is never looked up on disk: `from_pretrained("outside")` and `datasets.load_dataset("outside")` would
first try `./outside` relative to the working directory, so a job could read files outside the allowed
roots. A hub id is therefore fetched with `huggingface_hub.snapshot_download` (which only ever looks in
the hub cache) and loaded from the absolute directory it returns. The command line turns the relative
paths a person types into absolute ones before a config is built (`absolute_local_paths`); the service
refuses them (backend/api/validation.py).

A hub download is bounded: before `snapshot_download` fetches anything, the hub's listing of the repository (each
file's path and size) gives the bytes of the files the snapshot would fetch (`download_size`), and a snapshot above
`download_limit()` (the service sets it from `EDGERLHF_MAX_DOWNLOAD_BYTES`) is refused with a `LocationError`.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from collections.abc import Iterable
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


_download_limit = 20 * 2**30


def download_limit() -> int:
    """The largest hub snapshot (bytes of the files it fetches) this process downloads."""
    return _download_limit


def set_download_limit(limit: int) -> None:
    """Set `download_limit()` (the worker's job process: from `Settings.max_download_bytes`)."""
    global _download_limit
    _download_limit = int(limit)


def download_size(repo_id: str, files: Iterable[tuple[str, int | None]], allow_patterns: list[str] | None,
                  limit: int) -> int:
    """The bytes a snapshot of `repo_id` with `allow_patterns` fetches, from the repository's listing `files`
    ((path, size) of each file, as the hub lists them; the patterns match as `snapshot_download` matches them);
    `LocationError` when that is above `limit`, or when a file it would fetch has no size."""
    from huggingface_hub.utils import filter_repo_objects

    fetched = list(filter_repo_objects(list(files), allow_patterns=allow_patterns, key=lambda f: f[0]))
    unsized = [path for path, size in fetched if size is None]
    if unsized:
        raise LocationError(f"{repo_id!r}: the hub gives no size for {unsized[0]!r}, so the download cannot be "
                            "bounded; download it yourself and point the config at the absolute local path")
    total = sum(size for _, size in fetched)
    if total > limit:
        largest = max(fetched, key=lambda f: f[1])
        raise LocationError(f"{repo_id!r}: its {len(fetched)} file(s) to download hold {total / 1e9:.1f} GB "
                            f"(the largest, {largest[0]}, {largest[1] / 1e9:.1f} GB), above this service's download "
                            f"limit of {limit / 1e9:.1f} GB (EDGERLHF_MAX_DOWNLOAD_BYTES). Download it yourself and "
                            f"point the config at the absolute local path, or raise the limit")
    return total


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
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    if not is_hub_id(repo_id):
        raise LocationError(f"{repo_id!r} is neither a hub id ('name' or 'org/name') nor an absolute local path")
    online = hub_reachable()
    if online:
        files = _repo_files(repo_id, repo_type)
        if files is not None:
            if repo_type == "model" and allow_patterns == MODEL_FILES:
                allow_patterns = _without_duplicate_weights(files)
            download_size(repo_id, files, allow_patterns, download_limit())
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
    except RepositoryNotFoundError as exc:  # after GatedRepoError, its subclass
        raise LocationError(f"{repo_id!r}: no such {repo_type} repository on the hub (or it is private: set "
                            "HF_TOKEN)") from exc
    except (HfHubHTTPError, OSError) as exc:
        raise LocationError(f"{repo_id!r} cannot be downloaded from the hub: {exc}") from exc


def _repo_files(repo_id: str, repo_type: str) -> list[tuple[str, int | None]] | None:
    """(path, size) of every file of a hub repository; None when the hub does not list it (the download that
    follows reports the real problem: not found, gated, unreachable)."""
    from huggingface_hub import HfApi
    from huggingface_hub.hf_api import RepoFile

    try:
        tree = HfApi().list_repo_tree(repo_id, recursive=True, repo_type=repo_type)
        return [(entry.path, entry.size) for entry in tree if isinstance(entry, RepoFile)]
    except Exception:
        return None


def _without_duplicate_weights(files: list[tuple[str, int | None]]) -> list[str]:
    """`MODEL_FILES`, less the `.bin` weights when the repository also has safetensors (most hold both)."""
    if any(path.endswith(".safetensors") for path, _ in files):
        return [p for p in MODEL_FILES if p != "*.bin"]
    return MODEL_FILES


def check_location(value: str, roots: list[Path]) -> str | None:
    """None if `value` is a hub id or an absolute local path that, after resolving symlinks and `..`, lies under one
    of `roots`; else what is wrong with it (the service's rule: `edgerlhf.config.service_problems`)."""
    if is_hub_id(value):
        return None
    if "\x00" in value:
        return "contains a NUL byte"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:  # no file system path holds one: `Path.resolve` would raise
        return "holds a lone surrogate: not valid Unicode"
    path = Path(value).expanduser()
    if not is_local(value):
        return ("is neither a hub id ('name' or 'org/name') nor an absolute local path; "
                "give local files as absolute paths")
    resolved = path.resolve()
    for root in roots:
        if resolved.is_relative_to(Path(root).expanduser().resolve()):
            return None
    allowed = ", ".join(str(r) for r in roots)
    return f"local path {value!r} is outside the allowed roots ({allowed}); set EDGERLHF_ALLOWED_ROOTS to allow it"


def absolute_local_paths(value: str) -> str:
    """For the command line: a value that is not a hub id (`./x`, `data/pairs.jsonl`) is a path relative to
    the current directory and becomes absolute; hub ids and absolute paths stay as they are."""
    if is_local(value) or is_hub_id(value):
        return value
    return str(Path(value).expanduser().resolve())
