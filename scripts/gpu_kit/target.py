"""What the GPU target has and what travels to it: the lists every other part of the kit reads.

The target machine's own distributions (`TARGET_PACKAGES`), the wheels carried beside the repository
(`WHEELHOUSE`, pinned by constraints.txt), the shared files packed with them (`SHARED_FILES`), and the transfer
budget they share with the working tree (`CARRY_LIMIT`). Standard library only.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

KIT = Path(__file__).resolve().parent
"""This package's folder: `python KIT <command>` runs its `__main__.py` (how the kit starts itself in a child)."""
REPO = KIT.parent.parent
MiB = 2**20
GiB = 2**30

TARGET_PACKAGES = frozenset({
    # The list ...
    "torch", "transformers", "peft", "accelerate", "numpy", "pandas", "pyarrow", "safetensors", "tokenizers",
    # ... and what those require at the target's versions (torch 2.11, transformers 5.17, huggingface-hub 1.x),
    # as `pip install --dry-run --report` resolves them for Python 3.12 / manylinux x86-64. Left out: pydantic,
    # pydantic-core, annotated-types and typing-inspection, which only the newest typer pulls in (the lent GPU
    # machines lack them), and torch's CUDA libraries, which nothing here imports.
    "huggingface-hub", "hf-xet", "httpx", "httpcore", "h11", "anyio", "idna", "certifi", "filelock", "fsspec",
    "packaging", "pyyaml", "regex", "tqdm", "typer", "click", "rich", "markdown-it-py", "mdurl", "pygments",
    "shellingham", "annotated-doc", "typing-extensions", "jinja2", "markupsafe", "sympy", "mpmath", "networkx",
    "setuptools", "triton", "psutil", "python-dateutil", "tzdata",
})
"""Distributions the target machine's Python already has (issue 18), by canonical name."""

WHEELHOUSE = {
    "trl": "SFT and reward trainers; the bench's TRL RLOO row",
    "datasets": "TRL's data sets",
    "dill": "required by datasets",
    "multiprocess": "required by datasets",
    "xxhash": "required by datasets",
    "bitsandbytes": "int8 (LLM.int8) and nf4 weights",
    "pydantic": "stage reports (edgerlhf.reports), API schemas",
    "pydantic-core": "required by pydantic",
    "annotated-types": "required by pydantic",
    "typing-inspection": "required by pydantic",
    "pydantic-settings": "service settings (edgerlhf.settings)",
    "python-dotenv": "required by pydantic-settings",
    "fastapi": "the backend (chat endpoint)",
    "fastapi-offline": "the backend's /docs and /redoc files, served offline",
    "starlette": "required by fastapi",
    "opentelemetry-api": "required by fastapi",
    "uvicorn": "serves the backend",
    "sqlalchemy": "the job queue (worker, backend)",
    "pytest": "runs `pytest -m gpu`",
    "pluggy": "required by pytest",
    "iniconfig": "required by pytest",
    "pytest-timeout": "pyproject.toml's pytest `timeout` option",
    "gguf": "the GGUF export (edgerlhf.gguf_export)",
    "requests": "required by gguf",
    "urllib3": "required by requests",
    "charset-normalizer": "required by requests",
    "openai": "the judge reward's client (edgerlhf.rewards)",
    "httpx2": "required by openai",
    "httpcore2": "required by httpx2",
    "truststore": "required by httpx2",
    "jiter": "required by openai",
    "sniffio": "required by openai",
    "math-verify": "reference answers compared by value (edgerlhf.rewards)",
    "latex2sympy2-extended": "required by math-verify",
    "antlr4-python3-runtime": "required by latex2sympy2-extended",
}
"""Distributions the GPU run needs beyond `TARGET_PACKAGES`, and why; versions come from constraints.txt."""

RUNNER_NEEDS = {"pytest": "the test runner (`python -m pytest`)",
                "pytest-timeout": "pyproject.toml's [tool.pytest.ini_options] `timeout`"}
"""Distributions the GPU run needs that no module imports by name."""

NOT_NEEDED = {"psycopg": "tests/support/postgres.py imports it inside the functions that talk to a PostgreSQL server; "
                        "the GPU run's databases are SQLite files"}
"""Modules the scan finds (inside functions) that the GPU run never reaches, and why."""

SHARED_FILES = ("models/gpt2-tokenizer", "data/hh-rlhf")
"""Paths under the shared directory (`edgerlhf.config.SHARED_DIR`) the GPU run reads: the GPT-2 tokenizer of the
random-weight models, and the HH-RLHF files of the `tiny` preset and the bench's prompts."""

SHARED_ARCHIVE = "shared.tar.gz"
WHEELS_DIR = "wheels"
MANIFEST = "MANIFEST.json"
CARRY_LIMIT = 64 * MiB
"""What travels to the GPU machine altogether: the working tree and the carried folders."""
CARRY_MARGIN = 2 * MiB
"""Kept free for files the working tree gains before the kit is carried."""

PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64",
             "manylinux_2_35_x86_64")
"""Wheel platforms a manylinux x86-64 machine installs (pip matches each tag exactly)."""

TARGET_ENVIRONMENT = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                      "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                      "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}
"""Environment markers of the target, to read a requirement's `; python_version < "3.11"` as the target would."""

LOCAL_PACKAGES = ("edgerlhf", "worker", "backend", "db")
"""The repository's packages whose every module the GPU run may execute (stages and commands are imported by
name at run time, so following imports from the tests would miss some)."""
GPU_TESTS = "tests/gpu"


def canonical(name: str) -> str:
    """A distribution's canonical name (PEP 503): `SQLAlchemy` -> `sqlalchemy`, `pydantic_core` -> `pydantic-core`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def constraint_pins(repo: Path = REPO) -> dict[str, str]:
    """The exact versions constraints.txt pins, by canonical name."""
    pins = {}
    for line in (repo / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[canonical(name.split("[")[0])] = version.strip()
    return pins


def shared_dir() -> Path:
    """The shared directory as the project resolves it (`EDGERLHF_SHARED_DIR`, else `../shared`)."""
    return Path(os.path.abspath(os.environ.get("EDGERLHF_SHARED_DIR", REPO.parent / "shared")))
