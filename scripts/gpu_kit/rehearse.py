"""The rehearsal (`scripts/gpu-rehearse`): the GPU run's Python on a CPU machine, before a GPU minute is spent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .check import OFFLINE_ENV
from .target import KIT, REPO, TARGET_PACKAGES, WHEELHOUSE

TARGET_VERSIONS = {"torch": "2.11.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0", "accelerate": "1.15.0",
                   "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2"}
"""The lent GPU machine's versions, as sessions read them there (`pip list`, 2026-11; the device tool's KINDS.md);
the rest of `TARGET_PACKAGES` comes at whatever pip resolves beside them."""

REHEARSAL_TEST_ONLY = ("tensorboard",)
"""What the CPU tests import beyond the GPU run (the GPU image has tensorboard; `openai`, the chat tests' client, is
carried since the judge reward uses it)."""

REHEARSAL_TESTS = ("tests/edgerlhf", "tests/test_families.py", "tests/backend/test_chat_api.py",
                   "tests/backend/test_chat_models.py", "tests/backend/test_chat_pipeline.py", "tests/worker",
                   "--deselect", "tests/edgerlhf/test_known_answer.py", "-k", "not postgresql")
"""The CPU tests of every code path the GPU run takes (training, reward precisions, PPO/GRPO/RLOO/DPO, the bench,
the planner, every model family, the chat endpoint, the worker on SQLite), without the 8-minute known-answer
suite and without PostgreSQL (`NOT_NEEDED`)."""


def find_python312() -> str | None:
    """A Python 3.12 here that runs: `python3.12` on PATH (a pyenv shim may not), else pyenv's own."""
    pyenv = sorted(map(str, Path.home().glob(".pyenv/versions/3.12*/bin/python3.12")), reverse=True)
    candidates = [shutil.which("python3.12"), *pyenv]
    for python in filter(None, candidates):
        ok = subprocess.run([python, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True)
        if ok.returncode == 0:
            return python
    return None


def rehearse(venv: Path, kit: Path, out: Path, python: str | None) -> int:
    """On a CPU machine with the package registry: build a Python like the GPU machine's (`TARGET_VERSIONS`, the
    carried distributions left out), let `gpu-check` install the wheelhouse into it and import everything the GPU
    run needs, then run `REHEARSAL_TESTS` in it. Catches, before a GPU minute is spent, what the target's older
    torch, transformers and huggingface-hub break, and a wheelhouse that does not install or import."""
    out.mkdir(parents=True, exist_ok=True)
    python = python or find_python312()
    if python is None:
        print("no Python 3.12 here (the GPU machine's): pass --python", file=sys.stderr)
        return 2
    bin_python = venv / "bin" / "python"
    pip = [str(bin_python), "-m", "pip", "--disable-pip-version-check", "-q"]
    t0 = time.monotonic()
    if not bin_python.exists():
        subprocess.run([python, "-m", "venv", str(venv)], check=True)
    pins = [f"{name}=={version}" for name, version in TARGET_VERSIONS.items()]
    rest = sorted(TARGET_PACKAGES - set(TARGET_VERSIONS) - {"triton", "setuptools"})
    print(f"[rehearse] {venv}: {' '.join(pins)} and {len(rest)} more (a CUDA build of torch: about 3.5 GB)",
          flush=True)
    subprocess.run(pip + ["install", *pins, *rest, *REHEARSAL_TEST_ONLY], check=True)
    # The carried distributions must come from the wheelhouse, as on the GPU machine, not from pip's resolution.
    subprocess.run(pip + ["uninstall", "-y", *WHEELHOUSE], check=True, capture_output=True)
    setup_out = out / "setup"
    subprocess.run([str(bin_python), str(KIT), "check", "--wheels", str(kit), "--out",
                    str(setup_out), "--skip-tests", "--skip-bench"], check=False)
    found = json.loads((setup_out / "gpu-check.json").read_text())["phases"]["setup"]
    wheels, imports = found.get("wheels", {}), found.get("imports", {})
    problems = ([f"wheels did not install (exit {wheels.get('status')})"] if wheels.get("status") not in (0, None)
                else []) + [f"import {k}: {v}" for k, v in (imports.get("errors") or {}).items()]
    if "error" in imports:
        problems.append(f"import probe: {imports['error']}")
    versions = imports.get("versions", {})
    print(f"[rehearse] setup: installed {len(wheels.get('installed', []))} wheels; torch {versions.get('torch')}, "
          f"transformers {versions.get('transformers')}, huggingface_hub {versions.get('huggingface_hub')}, "
          f"Python {imports.get('python')}; problems: {problems or 'none'}", flush=True)
    env = {**os.environ, **OFFLINE_ENV, "PYTHONPATH": str(REPO)}
    tests = subprocess.run([str(bin_python), "-m", "pytest", "-q", "-p", "no:cacheprovider", *REHEARSAL_TESTS],
                           cwd=REPO, env=env)
    print(f"[rehearse] pytest exit {tests.returncode}; {time.monotonic() - t0:.0f}s in all", flush=True)
    return 0 if not problems and tests.returncode == 0 else 1
