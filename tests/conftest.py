"""Shared fixtures: paths to the local data in ../shared, free ports, a settings environment per test."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from edgerlhf.config import SHARED_DIR

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(SHARED_DIR)

# Tests never reach the hub; make any accidental hub access fail at once instead of retrying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def shared_dir() -> Path:
    if not SHARED.is_dir():
        pytest.fail(f"the shared data directory {SHARED} is missing (set EDGERLHF_SHARED_DIR)")
    return SHARED
