#!/usr/bin/env python3
"""The GPU kit (issue 18): one call on a bare, offline GPU machine gives the GPU figures and runs the GPU tests.

    scripts/gpu-wheels                                  # where pip reaches the registry: the wheels the target lacks
    scripts/gpu-check --dry-run                         # anywhere (CI): every import the GPU run needs is provided
    scripts/gpu-check --wheels gpu-wheels --out DIR     # on the GPU machine: install, pytest -m gpu, bench, table

The target (`TARGET_PACKAGES`): x86-64 Linux, one NVIDIA GPU, a Python 3.12 with torch (CUDA), transformers,
peft, accelerate, numpy, pandas, pyarrow, safetensors, tokenizers and what they require; no network; the
repository plus at most 64 MiB of carried files; one command of at most 10 minutes. What the GPU run imports
beyond that travels as wheels (`WHEELHOUSE`, pinned by constraints.txt) in a git-ignored folder, with the GPT-2
tokenizer and the HH-RLHF sample from the shared directory (`SHARED_FILES`) packed beside them, since only the
repository and carried paths reach the machine.

`check` (the GPU run) works in phases against one deadline (`--budget-s`, 9 minutes by default) and rewrites
`gpu-check.json` and `gpu-check.txt` in the output folder as each part ends, so a run cut short still returns what
it measured (with `gpu-check.log`, `pytest.log` and `bench.log`: five files in all):
1. setup: install the carried wheels the machine lacks (without network, into the machine's Python, else into a
   folder on PYTHONPATH), unpack the shared files (`EDGERLHF_SHARED_DIR`), import everything the run needs, and
   cap the bench at 8 GiB per process: `PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:F` (no code change;
   every process reads it), or, where torch ignores that key, a `sitecustomize` that calls
   `torch.cuda.set_per_process_memory_fraction` when CUDA starts; either is kept only once an allocation 1 GiB
   over the cap has failed;
2. `pytest -m gpu tests/gpu` (the tests record their figures through `EDGERLHF_GPU_RECORD`), while a process
   kept off the GPU builds the bench's synthetic run directories (the presets' published shapes with random
   weights: for the 1.7B model, the slow part of `edgerlhf bench`);
3. `edgerlhf bench`'s stages on `distilgpt2-8gb` at its full configuration, each in a fresh process as the bench
   runs them (`edgerlhf.bench.run_stage_process`), alone on the GPU;
4. the same for the other presets with a published shape (side by side: their peaks are per process, their
   times upper bounds);
5. one table: peaks against the 1 GB target and the floor, PPO one copy / naive / TRL RLOO, the reward
   precision study, the planner against `torch.cuda.max_memory_allocated`, the cancelled job's GPU memory,
   the chat endpoint.
`--skip-tests` / `--skip-bench` rerun one half.

The module itself uses the standard library only, so it runs on the target before anything is installed.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MiB = 2**20
GiB = 2**30

# --- what the target has, what travels ---------------------------------------------------------------

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
    "starlette": "required by fastapi",
    "opentelemetry-api": "required by fastapi",
    "uvicorn": "serves the backend",
    "sqlalchemy": "the job queue (worker, backend)",
    "pytest": "runs `pytest -m gpu`",
    "pluggy": "required by pytest",
    "iniconfig": "required by pytest",
    "pytest-timeout": "pyproject.toml's pytest `timeout` option",
}
"""Distributions the GPU run needs beyond `TARGET_PACKAGES`, and why; versions come from constraints.txt."""

RUNNER_NEEDS = {"pytest": "the test runner (`python -m pytest`)",
                "pytest-timeout": "pyproject.toml's [tool.pytest.ini_options] `timeout`"}
"""Distributions the GPU run needs that no module imports by name."""

NOT_NEEDED = {"psycopg": "tests/postgres.py imports it inside the functions that talk to a PostgreSQL server; the "
                        "GPU run's databases are SQLite files"}
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


# --- what the GPU run imports -------------------------------------------------------------------------


@dataclass
class Imports:
    """Third-party top-level modules imported by the scanned files: where each is imported unconditionally
    (`required`) and where only inside a `try` that survives its absence (`optional`)."""

    required: dict[str, list[str]] = field(default_factory=dict)
    optional: dict[str, list[str]] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def _catches_import_error(handlers: list[ast.ExceptHandler]) -> bool:
    names = set()
    for handler in handlers:
        if handler.type is None:
            return True
        for node in handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]:
            names.add(node.id if isinstance(node, ast.Name) else getattr(node, "attr", ""))
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_names(node: ast.Import | ast.ImportFrom, file: Path, repo: Path) -> list[str]:
    """Absolute dotted names an import statement loads (a relative import resolved against `file`'s package)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        package = list(file.relative_to(repo).with_suffix("").parts[:-1])
        package = package[:len(package) - (node.level - 1)]
        base = ".".join(package + ([node.module] if node.module else []))
    # `from pkg import mod` may name a submodule: both are candidates for local files.
    return [base] + [f"{base}.{alias.name}" for alias in node.names if alias.name != "*"]


def _local_file(module: str, repo: Path) -> Path | None:
    path = repo.joinpath(*module.split("."))
    for candidate in (path.with_suffix(".py"), path / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def scan_imports(repo: Path = REPO) -> Imports:
    """The third-party modules the GPU run imports: every module of `LOCAL_PACKAGES`, every file under
    `tests/gpu`, and the repository's modules those import (test helpers, the root conftest), followed.

    Static (the AST, nothing imported), so it runs anywhere, before anything is installed. Imports under
    `if TYPE_CHECKING:` are skipped; those inside a `try` whose handler catches ImportError (or Exception)
    are optional.
    """
    stdlib = set(sys.stdlib_module_names)
    local_tops = {p.name for p in repo.iterdir() if p.is_dir() or p.suffix == ".py"} - stdlib
    queue = [p for package in LOCAL_PACKAGES for p in sorted((repo / package).rglob("*.py"))]
    queue += sorted((repo / GPU_TESTS).rglob("*.py"))
    queue.append(repo / "tests" / "conftest.py")
    seen: set[Path] = set()
    found = Imports()

    def visit(node: ast.AST, file: Path, optional: bool) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child, file, optional)
            return
        if isinstance(node, ast.Try):
            guarded = optional or _catches_import_error(node.handlers)
            for child in node.body:
                visit(child, file, guarded)
            for child in [*node.handlers, *node.orelse, *node.finalbody]:
                visit(child, file, optional)
            return
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            where = f"{file.relative_to(repo)}:{node.lineno}"
            third_party = set()
            for module in _module_names(node, file, repo):
                top = module.split(".")[0]
                if not top or top in stdlib:
                    continue
                if top in local_tops:
                    local = _local_file(module, repo)
                    if local is not None and local not in seen:
                        queue.append(local)
                else:
                    third_party.add(top)
            bucket = found.optional if optional else found.required
            for top in third_party:
                bucket.setdefault(top, []).append(where)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, file, optional)

    while queue:
        file = queue.pop(0).resolve()
        if file in seen or not file.is_file():
            continue
        seen.add(file)
        found.files.append(str(file.relative_to(repo)))
        visit(ast.parse(file.read_text(encoding="utf-8"), str(file)), file, False)
    for module in list(found.optional):
        if module in found.required:
            del found.optional[module]
    return found


def needed_distributions(imports: Imports) -> tuple[dict[str, list[str]], list[str]]:
    """The distribution of each required module (read from this Python's installed metadata), with the
    modules it provides; and the modules no installed distribution provides."""
    from importlib.metadata import packages_distributions

    provided = packages_distributions()
    dists: dict[str, list[str]] = {}
    unknown = []
    for module in sorted(imports.required):
        if module in NOT_NEEDED:
            continue
        names = provided.get(module)
        if not names:
            unknown.append(module)
            continue
        for name in sorted(set(names)):
            dists.setdefault(canonical(name), []).append(module)
    for name, why in RUNNER_NEEDS.items():
        dists.setdefault(name, []).append(f"({why})")
    return dists, unknown


def requirements_on_target(requires: list[str] | None) -> list[str]:
    """Canonical names of the requirements (`Requires-Dist` lines) that apply on the target: no extras,
    markers evaluated for Python 3.12 on x86-64 Linux."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip's own copy, wherever pip is
        from pip._vendor.packaging.requirements import Requirement
    names = []
    for line in requires or []:
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(dict(TARGET_ENVIRONMENT)):
            names.append(canonical(requirement.name))
    return names


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(canonical name, version, Requires-Dist lines) read from a wheel's METADATA."""
    with zipfile.ZipFile(path) as wheel:
        meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        text = wheel.read(meta).decode("utf-8")
    fields: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if ": " in line and not line.startswith(" "):
            key, value = line.split(": ", 1)
            fields.setdefault(key, []).append(value)
    return canonical(fields["Name"][0]), fields["Version"][0], fields.get("Requires-Dist", [])


def check_requirements(requires: dict[str, list[str]]) -> list[str]:
    """Problems with the wheelhouse's own requirements: each must be on the target or in the wheelhouse."""
    provided = TARGET_PACKAGES | set(WHEELHOUSE)
    problems = []
    for dist, lines in sorted(requires.items()):
        for name in requirements_on_target(lines):
            if name not in provided:
                problems.append(f"{dist} requires {name}, which is neither on the target (TARGET_PACKAGES) nor "
                                f"carried (WHEELHOUSE)")
    return problems


def travelling_tree_bytes(repo: Path = REPO) -> int | None:
    """Bytes of the working tree that travels to the GPU machine (tracked and untracked files git does not
    ignore), or None without git."""
    try:
        out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    total = 0
    for name in set(out.decode("utf-8", "replace").split("\0")):
        path = repo / name
        if name and path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def carry_budget(repo: Path = REPO) -> tuple[int, int | None]:
    """(bytes the carried kit may take, bytes of the working tree that travels with it)."""
    tree = travelling_tree_bytes(repo)
    return CARRY_LIMIT - (tree if tree is not None else 4 * MiB) - CARRY_MARGIN, tree


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def check_wheelhouse(kit: Path, repo: Path = REPO) -> list[str]:
    """Problems with a built kit folder: exactly the `WHEELHOUSE` wheels at the pinned versions, their
    requirements provided, the shared files, the size within the budget."""
    pins = constraint_pins(repo)
    problems = []
    wheels = sorted((kit / WHEELS_DIR).glob("*.whl"))
    found: dict[str, list[str]] = {}
    requires = {}
    for path in wheels:
        name, version, lines = wheel_metadata(path)
        found.setdefault(name, []).append(version)
        requires[name] = lines
        if pins.get(name) != version:
            problems.append(f"{path.name}: version {version}, constraints.txt pins {pins.get(name)}")
    for name, versions in found.items():
        if len(versions) > 1:
            problems.append(f"{name}: {len(versions)} versions {versions} (one stops the whole install)")
    problems += [f"{name}: no wheel in {kit / WHEELS_DIR}" for name in sorted(set(WHEELHOUSE) - set(found))]
    problems += [f"{name}: a wheel the kit does not list (WHEELHOUSE)" for name in sorted(set(found) - set(WHEELHOUSE))]
    problems += check_requirements(requires)
    if not (kit / SHARED_ARCHIVE).is_file():
        problems.append(f"{kit / SHARED_ARCHIVE} is missing (the tokenizer and data the GPU run reads)")
    budget, _ = carry_budget(repo)
    size = folder_bytes(kit)
    if size > budget:
        problems.append(f"{kit} holds {size / MiB:.1f} MiB, over its budget of {budget / MiB:.1f} MiB "
                        f"({CARRY_LIMIT / MiB:.0f} MiB less the working tree and a margin)")
    return problems


def dry_run(repo: Path = REPO, kit: Path | None = None) -> tuple[list[str], dict[str, Any]]:
    """Every import the GPU tests and the bench need is on the target or in the wheelhouse, and the wheelhouse
    is exactly what they need. Returns (problems, what was found). Reads this Python's installed metadata (the
    project's environment, where every dependency is installed); with `kit`, checks the built folder too."""
    from importlib.metadata import PackageNotFoundError, requires

    imports = scan_imports(repo)
    dists, unknown = needed_distributions(imports)
    problems = [f"module {module!r} (imported at {imports.required[module][0]}) comes from no installed "
                f"distribution: install the project's dependencies, or add it to TARGET_PACKAGES or WHEELHOUSE"
                for module in unknown]
    provided = TARGET_PACKAGES | set(WHEELHOUSE)
    for dist, modules in sorted(dists.items()):
        if dist not in provided:
            problems.append(f"{dist} (module {modules[0]}) is needed by the GPU run but is neither on the target "
                            f"(TARGET_PACKAGES) nor carried (WHEELHOUSE)")
    pins = constraint_pins(repo)
    problems += [f"{dist}: carried but not pinned in constraints.txt" for dist in sorted(WHEELHOUSE)
                 if dist not in pins]
    wheel_requires = {}
    for dist in WHEELHOUSE:
        try:
            wheel_requires[dist] = requires(dist)
        except PackageNotFoundError:
            problems.append(f"{dist}: carried but not installed here, so its requirements cannot be checked")
    problems += check_requirements(wheel_requires)
    # Exactly the wheels the target lacks: each carried one is needed, directly or by another carried one.
    needed = {d for d in dists if d in WHEELHOUSE}
    stack = list(needed)
    while stack:
        for name in requirements_on_target(wheel_requires.get(stack.pop())):
            if name in WHEELHOUSE and name not in needed:
                needed.add(name)
                stack.append(name)
    problems += [f"{dist}: carried but nothing the GPU run imports needs it"
                 for dist in sorted(set(WHEELHOUSE) - needed)]
    problems += [f"{name}: a GPU test module without `pytestmark = pytest.mark.gpu`"
                 for name in unmarked_gpu_tests(repo)]
    if kit is not None:
        problems += check_wheelhouse(kit, repo)
    summary = {"modules": {m: w[0] for m, w in sorted(imports.required.items())},
               "optional_modules": sorted(imports.optional), "distributions": dists,
               "files_scanned": len(imports.files)}
    return problems, summary


def unmarked_gpu_tests(repo: Path = REPO) -> list[str]:
    """Test modules under tests/gpu that do not mark all their tests `gpu` (a CPU CI would run them)."""
    out = []
    for path in sorted((repo / GPU_TESTS).glob("test_*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        marked = any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
                     and "gpu" in ast.unparse(node.value) for node in tree.body)
        if not marked:
            out.append(str(path.relative_to(repo)))
    return out


# --- the wheelhouse builder -------------------------------------------------------------------------------


def build_wheelhouse(kit: Path, repo: Path = REPO, python: str = sys.executable) -> int:
    """Download the `WHEELHOUSE` wheels (Python 3.12, manylinux x86-64, versions of constraints.txt, no
    dependencies: the dry run proves the list complete) into `kit/wheels`, pack the shared files into
    `kit/shared.tar.gz`, write `kit/MANIFEST.json`; exit status 1 if anything is missing or over budget."""
    pins = constraint_pins(repo)
    missing = [name for name in WHEELHOUSE if name not in pins]
    if missing:
        print(f"error: not pinned in constraints.txt: {missing}", file=sys.stderr)
        return 1
    wheels = kit / WHEELS_DIR
    shutil.rmtree(wheels, ignore_errors=True)  # one version of each, never a stale one beside it
    wheels.mkdir(parents=True)
    cmd = [python, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", "--disable-pip-version-check", "-q", "-d", str(wheels)]
    for platform in PLATFORMS:
        cmd += ["--platform", platform]
    cmd += [f"{name}=={pins[name]}" for name in sorted(WHEELHOUSE)]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        print("error: pip download failed", file=sys.stderr)
        return 1
    pack_shared(kit / SHARED_ARCHIVE)
    budget, tree = carry_budget(repo)
    rows = []
    for path in sorted(wheels.glob("*.whl")):
        name, version, _ = wheel_metadata(path)
        rows.append({"file": f"{WHEELS_DIR}/{path.name}", "distribution": name, "version": version,
                     "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    shared = kit / SHARED_ARCHIVE
    manifest = {"wheels": rows, "shared": {"file": SHARED_ARCHIVE, "bytes": shared.stat().st_size,
                                           "contents": list(SHARED_FILES)},
                "python": "3.12", "platforms": list(PLATFORMS), "target_packages": sorted(TARGET_PACKAGES),
                "budget_bytes": budget, "working_tree_bytes": tree, "command": " ".join(cmd)}
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=2))
    size = folder_bytes(kit)
    for row in sorted(rows, key=lambda r: -r["bytes"]):
        print(f"{row['bytes'] / MiB:8.2f} MiB  {row['distribution']}=={row['version']}")
    print(f"{shared.stat().st_size / MiB:8.2f} MiB  {SHARED_ARCHIVE} ({', '.join(SHARED_FILES)})")
    print(f"{size / MiB:8.2f} MiB  in {kit} (budget {budget / MiB:.1f} MiB = {CARRY_LIMIT / MiB:.0f} MiB - working "
          f"tree {(tree or 0) / MiB:.1f} MiB - margin {CARRY_MARGIN / MiB:.0f} MiB)")
    problems = check_wheelhouse(kit, repo)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    return 1 if problems else 0


def shared_dir() -> Path:
    """The shared directory as the project resolves it (`EDGERLHF_SHARED_DIR`, else `../shared`)."""
    return Path(os.path.abspath(os.environ.get("EDGERLHF_SHARED_DIR", REPO.parent / "shared")))


def pack_shared(archive: Path) -> None:
    source = shared_dir()
    with tarfile.open(archive, "w:gz") as tar:
        for rel in SHARED_FILES:
            if not (source / rel).exists():
                raise FileNotFoundError(f"{source / rel} is missing (set EDGERLHF_SHARED_DIR)")
            tar.add(source / rel, arcname=rel)


# --- the run on the GPU machine ------------------------------------------------------------------------

PEAK_TARGET_MIB = 1024
"""Issue 18's per-stage target for `distilgpt2-8gb`: a peak of 1 GB (taken as 1 GiB) of CUDA memory."""
DEFAULT_BUDGET_S = 540
"""9 minutes: one command on the device machine may run 10, and the files must come back."""
CAP_GIB = 8.0
"""The bench runs capped at an 8 GB card's memory (`torch.cuda.set_per_process_memory_fraction`'s cap)."""
RESERVE_S = 15
"""Kept at the end of the budget for the table."""
TESTS_MAX_S = 230
"""The GPU tests' share of the budget (they take about 2-3 minutes)."""
TESTS_MIN_S = 60
"""The least the GPU tests get, however short the budget."""
REFERENCE_MIN_S = 200
"""The reference preset's bench share when time allows (8 stages, each a fresh process)."""
OTHERS_MIN_S = 90
"""The least the other presets' benches get after the reference's."""
REFERENCE_PRESET = "distilgpt2-8gb"
"""The preset measured first, alone on the GPU, every stage, against the 1 GB target."""
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}

SITECUSTOMIZE = '''"""EdgeRLHF GPU kit: caps each process's CUDA caching allocator at EDGERLHF_GPU_KIT_CAP_BYTES.

Written by scripts/gpu_kit.py only where torch ignores PYTORCH_CUDA_ALLOC_CONF's per_process_memory_fraction. Once
torch.cuda is imported it wraps torch.cuda._lazy_init (which both Python and C++ call to start CUDA), so the cap is
set the moment CUDA starts, in every Python process. Then any other sitecustomize on the path runs as usual.
"""
import importlib.abc
import importlib.util
import os
import sys

_CAP = int(os.environ.get("EDGERLHF_GPU_KIT_CAP_BYTES", "0"))


class _CapWhenCudaStarts(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.cuda" or not _CAP:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            start = module._lazy_init

            def _lazy_init():
                first = not module.is_initialized()
                start()
                if first:
                    for i in range(module.device_count()):
                        total = module.get_device_properties(i).total_memory
                        module.set_per_process_memory_fraction(min(1.0, _CAP / total), i)

            module._lazy_init = _lazy_init

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _CapWhenCudaStarts())

_here = os.path.dirname(os.path.abspath(__file__))
for _entry in sys.path:
    _other = os.path.join(_entry or ".", "sitecustomize.py")
    if os.path.abspath(_entry or ".") != _here and os.path.isfile(_other):
        _spec = importlib.util.spec_from_file_location("_sitecustomize_after_edgerlhf", _other)
        _spec.loader.exec_module(importlib.util.module_from_spec(_spec))
        break
'''
"""The fallback cap (see `cap_memory`)."""


class Run:
    """One GPU check: the deadline, the output folder, the environment of every child process, the results."""

    def __init__(self, out: Path, work: Path, budget_s: float, python: str = sys.executable):
        self.started = time.monotonic()
        self.deadline = self.started + budget_s
        self.out = out
        self.work = work
        self.python = python
        self.env = {**os.environ, **OFFLINE_ENV}
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
        self.bench_env: dict[str, str] = {}
        """What the bench's processes get on top of `env`: the memory cap."""
        self.result: dict[str, Any] = {"kit": "scripts/gpu-check (issue 18)", "budget_s": budget_s, "phases": {}}
        self._log = open(out / "gpu-check.log", "a", buffering=1)
        self.lock = threading.Lock()
        """Held to change `result` from the bench threads, and to write it."""

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, message: str) -> None:
        line = f"[gpu-check {time.monotonic() - self.started:6.1f}s] {message}"
        with self.lock:
            print(line, flush=True)
            self._log.write(line + "\n")

    def save(self) -> None:
        """Rewrite gpu-check.json and gpu-check.txt with what is known so far."""
        with self.lock:
            self.result["elapsed_s"] = round(time.monotonic() - self.started, 1)
            (self.out / "gpu-check.json").write_text(json.dumps(self.result, indent=2, default=str))
            try:
                table = summary_table(self.result)
            except Exception as exc:  # the figures are in the JSON either way; a table bug must not end the run
                table = f"the table could not be drawn ({type(exc).__name__}: {exc}); see gpu-check.json"
            (self.out / "gpu-check.txt").write_text(table + "\n")

    def run(self, cmd: list[str], timeout: float, log_name: str, env: dict[str, str] | None = None,
            cwd: Path = REPO) -> tuple[int | None, float]:
        """Run `cmd` in its own process group, its output appended to `out/log_name`; the whole group is killed
        at `timeout`. Returns (exit status or None when killed, seconds)."""
        t0 = time.monotonic()
        with open(self.out / log_name, "a", buffering=1) as log:
            log.write(f"\n$ {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, cwd=cwd, env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                return proc.wait(timeout=max(1.0, timeout)), time.monotonic() - t0
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                log.write(f"\n[gpu-check] killed after {timeout:.0f}s (the phase's share of the budget)\n")
                return None, time.monotonic() - t0

    def python_json(self, code: str, timeout: float = 120, env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run `code` in a fresh Python; it prints one JSON object last. {"error": ...} if it fails."""
        try:
            proc = subprocess.run([self.python, "-c", code], capture_output=True, text=True, timeout=timeout,
                                  env=env or self.env, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f}s"}
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            return {"error": (proc.stderr or proc.stdout).strip()[-1500:] or f"exit status {proc.returncode}"}
        return json.loads(lines[-1])


# --- phase 1: setup ---


def nvidia_smi() -> dict[str, Any]:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,name,memory.total,memory.used,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return {"error": str(exc)}
    gpus = []
    for line in out.stdout.strip().splitlines():
        index, name, total, used, driver = [x.strip() for x in line.split(",")]
        gpus.append({"index": int(index), "name": name, "memory_total_mib": float(total),
                     "memory_used_mib": float(used), "driver": driver})
    return {"gpus": gpus} if gpus else {"error": out.stderr.strip() or "nvidia-smi listed no GPU"}


def wheel_distribution(path: Path) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name (PEP 427)."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def install_wheels(run: Run, kit: Path) -> dict[str, Any]:
    """Install the carried wheels whose distribution this Python lacks (one that has it keeps its own
    version), without network: into this Python, or into `work/site` on PYTHONPATH where it is read-only."""
    from importlib.metadata import PackageNotFoundError, version

    install, kept = [], {}
    for path in sorted((kit / WHEELS_DIR).glob("*.whl")):
        name, carried = wheel_distribution(path)
        try:
            kept[name] = {"machine": version(name), "carried": carried}
        except PackageNotFoundError:
            install.append(path)
    done: dict[str, Any] = {"installed": [wheel_distribution(p)[0] + "==" + wheel_distribution(p)[1] for p in install],
                            "kept_machine_version": kept}
    if not install:
        return done
    base = [run.python, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile",
            "--disable-pip-version-check", "-q"]
    status, seconds = run.run(base + [str(p) for p in install], 180, "gpu-check.log")
    done["into"] = "this Python"
    if status != 0:
        site = run.work / "site"
        status, seconds = run.run(base + ["--target", str(site)] + [str(p) for p in install], 180, "gpu-check.log")
        run.env["PYTHONPATH"] = os.pathsep.join([run.env["PYTHONPATH"], str(site)])
        done["into"] = str(site)
    done.update(status=status, seconds=round(seconds, 1))
    return done


IMPORT_PROBE = """
import importlib, json, sys
errors, versions = {}, {}
for name in sys.argv[1:]:
    try:
        module = importlib.import_module(name)
        versions[name] = str(getattr(module, "__version__", ""))
    except Exception as exc:
        errors[name] = f"{type(exc).__name__}: {exc}"[:300]
import torch
cuda = torch.cuda.is_available()
print(json.dumps({"errors": errors, "versions": versions, "torch": torch.__version__, "cuda": torch.version.cuda,
                  "cuda_available": cuda, "python": sys.version.split()[0],
                  "device": torch.cuda.get_device_name(0) if cuda else None,
                  "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
                  "total_memory": torch.cuda.get_device_properties(0).total_memory if cuda else None}))
"""


def import_everything(run: Run) -> dict[str, Any]:
    """Import, in a fresh process, every third-party module the GPU run needs (`scan_imports`)."""
    modules = sorted(set(scan_imports(REPO).required) - set(NOT_NEEDED))
    try:
        proc = subprocess.run([run.python, "-c", IMPORT_PROBE, *modules], capture_output=True, text=True,
                              timeout=min(180, max(10, run.left())), env=run.env, cwd=REPO)
        lines = proc.stdout.strip().splitlines()
        found = json.loads(lines[-1]) if proc.returncode == 0 and lines else {"error": proc.stderr.strip()[-1500:]}
    except subprocess.TimeoutExpired:
        found = {"error": "timed out"}
    found["modules"] = modules
    return found


CAP_PROBE = """
import json, os, torch
cap = int(os.environ["EDGERLHF_GPU_KIT_CAP_BYTES"])
torch.zeros(1, device="cuda")
fraction = torch.cuda.get_per_process_memory_fraction(0)
total = torch.cuda.get_device_properties(0).total_memory
below = torch.empty(cap - 2**30, dtype=torch.uint8, device="cuda")
try:
    above = torch.empty(2**31, dtype=torch.uint8, device="cuda")  # together 1 GiB over the cap
    refused = False
    del above
except torch.cuda.OutOfMemoryError:
    refused = True
print(json.dumps({"fraction": fraction, "cap_bytes": fraction * total, "refused_over_cap": refused}))
"""


def cap_memory(run: Run, total_bytes: int | None, cap_gib: float) -> dict[str, Any]:
    """Cap each bench process's CUDA caching allocator at `cap_gib` (an 8 GB card), checked by allocating
    1 GiB below the cap (must succeed) and 1 GiB over it (must fail).

    First through `PYTORCH_CUDA_ALLOC_CONF=per_process_memory_fraction:F` (PyTorch reads it in every process;
    no code runs for it); where torch ignores that key, through a `sitecustomize` that calls
    `torch.cuda.set_per_process_memory_fraction` when CUDA starts. The cap bounds what the allocator reserves
    (the CUDA context is outside it, as on a real card), so a stage that would not fit 8 GB fails there.
    """
    if not total_bytes:
        return {"applied": False, "why": "no CUDA device total"}
    cap = int(cap_gib * GiB)
    fraction = min(1.0, cap / total_bytes)
    conf = ",".join(p for p in (os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
                                f"per_process_memory_fraction:{fraction:.6f}") if p)
    for how in ("PYTORCH_CUDA_ALLOC_CONF", "sitecustomize"):
        extra = {"EDGERLHF_GPU_KIT_CAP_BYTES": str(cap)}
        if how == "PYTORCH_CUDA_ALLOC_CONF":
            extra["PYTORCH_CUDA_ALLOC_CONF"] = conf
        else:
            site = run.work / "sitecustomize"
            site.mkdir(exist_ok=True)
            (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
            extra["PYTHONPATH"] = os.pathsep.join([str(site), run.env["PYTHONPATH"]])
        probe = run.python_json(CAP_PROBE, timeout=min(120, max(10, run.left())), env={**run.env, **extra})
        run.log(f"memory cap through {how}: {probe}")
        if probe.get("refused_over_cap") and abs(probe.get("cap_bytes", 0) - cap) < 64 * MiB:
            run.bench_env = extra
            return {"applied": True, "how": how, "cap_gib": cap_gib, "fraction": fraction, **probe}
    return {"applied": False, "cap_gib": cap_gib, "fraction": fraction, "probe": probe,
            "why": "neither way of capping was honoured: the bench ran on the whole GPU"}


def setup(run: Run, kit: Path | None, cap_gib: float) -> None:
    phase: dict[str, Any] = {}
    run.result["phases"]["setup"] = phase
    run.result["machine"] = nvidia_smi()
    run.log(f"machine: {run.result['machine']}")
    if kit is not None:
        phase["wheels"] = install_wheels(run, kit)
        wheels = phase["wheels"]
        run.log(f"wheels: installed {wheels['installed'] or 'none'} into {wheels.get('into', '-')}; the machine's own "
                f"version kept for {sorted(wheels['kept_machine_version']) or 'none'}")
        shared = run.work / "shared"
        if (kit / SHARED_ARCHIVE).is_file():
            with tarfile.open(kit / SHARED_ARCHIVE) as tar:
                tar.extractall(shared, filter="data")
            run.env["EDGERLHF_SHARED_DIR"] = str(shared)
    phase["shared_dir"] = run.env.get("EDGERLHF_SHARED_DIR", str(shared_dir()))
    phase["imports"] = found = import_everything(run)
    run.log(f"imports: errors {found.get('errors') or found.get('error') or 'none'}; torch {found.get('torch')}, "
            f"CUDA {found.get('cuda')}, device {found.get('device')}")
    run.result["torch"] = {k: found.get(k) for k in ("torch", "cuda", "cuda_available", "python", "device", "bf16",
                                                     "total_memory")}
    run.result["cap"] = cap_memory(run, found.get("total_memory"), cap_gib)
    run.save()


# --- phase 2: the GPU tests, with the bench's run directories built beside them ---


def reference_and_preset_targets() -> list[dict[str, Any]]:
    """The bench runs: `distilgpt2-8gb` at its full configuration, every stage (2 timed steps after 1 warm-up),
    then each other preset whose model has a published shape, at its own configuration,
    the stages it uses (1 timed step)."""
    from edgerlhf.architectures import PUBLISHED_SHAPES
    from edgerlhf.bench import STAGES
    from edgerlhf.config import PRESETS

    targets = [{"preset": REFERENCE_PRESET, "stages": list(STAGES), "steps": 2, "warmup": 1}]
    for preset, spec in PRESETS.items():
        model = spec.get("model", {}).get("name_or_path")
        if preset == REFERENCE_PRESET or model not in PUBLISHED_SHAPES:
            continue
        precisions = spec.get("reward", {}).get("precisions", ["bf16"])
        targets.append({"preset": preset, "stages": ["generation", "sft", *[f"reward_{p}" for p in precisions], "ppo"],
                        "steps": 1, "warmup": 1})
    return targets


def prepare(work: Path, presets: list[str]) -> int:
    """Build each preset's synthetic bench run directory in `work/<preset>` (`edgerlhf.bench.prepare_run_dir`:
    its published shape with random weights, random reward adapters, prompts), as `edgerlhf bench` does before
    measuring; run with the GPU hidden, beside the GPU tests. Writes `prepared.json` (or `failed.txt`) in each."""
    sys.path.insert(0, str(REPO))
    from edgerlhf.bench import bench_config, prepare_run_dir

    status = 0
    for preset in presets:
        run_dir = work / preset
        run_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        try:
            config = bench_config(preset, None, {"device": "cuda"})
            prepare_run_dir(config, run_dir)
            (run_dir / "bench_config.json").write_text(config.to_json())
            (run_dir / "prepared.json").write_text(json.dumps({"seconds": round(time.monotonic() - t0, 1)}))
        except Exception as exc:  # recorded; the other presets still get theirs
            (run_dir / "failed.txt").write_text(f"{type(exc).__name__}: {exc}")
            status = 1
        print(f"[prepare] {preset}: {time.monotonic() - t0:.1f}s", flush=True)
    return status


def read_records(path: Path) -> dict[str, Any]:
    """The GPU tests' outcomes and figures (JSON lines written by tests/gpu/conftest.py)."""
    outcomes, figures = {}, {}
    if path.is_file():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if "figures" in row:
                figures.setdefault(row["test"], {}).update(row["figures"])
            else:
                previous = outcomes.get(row["test"])
                if previous is None or previous["outcome"] == "passed":  # a failing teardown overrides a pass
                    outcomes[row["test"]] = row
    counts: dict[str, int] = {}
    for row in outcomes.values():
        counts[row["outcome"]] = counts.get(row["outcome"], 0) + 1
    return {"counts": counts, "outcomes": outcomes, "figures": figures}


def start_preparing(run: Run) -> subprocess.Popen | None:
    """Start building the bench's run directories in a process kept off the GPU (`prepare`)."""
    targets = reference_and_preset_targets()
    run.result["bench_targets"] = targets
    if not run.result["torch"].get("cuda_available"):
        return None
    env = {**run.env, "CUDA_VISIBLE_DEVICES": ""}  # building weights on the CPU must not disturb the GPU tests
    log = open(run.out / "bench.log", "a", buffering=1)
    return subprocess.Popen([run.python, str(Path(__file__).resolve()), "prepare", "--work", str(run.work / "bench"),
                             "--presets", ",".join(t["preset"] for t in targets)],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def prepare_benches(run: Run) -> None:
    """Without the GPU tests: build the bench's run directories now, as their first step."""
    preparing = start_preparing(run)
    if preparing is not None:
        try:
            preparing.wait(timeout=max(1.0, run.left() - RESERVE_S - OTHERS_MIN_S))
        except subprocess.TimeoutExpired:
            pass  # each target waits for its own directory, or reports it missing


def gpu_tests(run: Run, bench: bool = True) -> subprocess.Popen | None:
    """Start the bench's run directories (off the GPU), then run `pytest -m gpu tests/gpu` in its share of the time."""
    preparing = start_preparing(run) if bench else None
    targets = run.result.get("bench_targets") or []
    records = run.work / "gpu-tests.jsonl"
    records.unlink(missing_ok=True)
    env = {**run.env, "EDGERLHF_GPU_RECORD": str(records)}
    later = (120 + OTHERS_MIN_S * (len(targets) > 1)) if preparing else 0  # the least the benches need after
    box = min(TESTS_MAX_S, max(TESTS_MIN_S, run.left() - RESERVE_S - later))
    run.log(f"pytest -m gpu tests/gpu (at most {box:.0f}s)")
    status, seconds = run.run([run.python, "-m", "pytest", "-m", "gpu", GPU_TESTS, "-p", "no:cacheprovider", "-ra",
                               "-q"], box, "pytest.log", env=env)
    phase = {"exit_status": status, "seconds": round(seconds, 1), "killed": status is None, **read_records(records)}
    run.result["phases"]["tests"] = phase
    run.log(f"pytest: exit {status} in {seconds:.0f}s: {phase['counts']}")
    run.save()
    return preparing


# --- phases 3 and 4: the bench ---


def bench_target(run: Run, target: dict[str, Any], until: float, note: str = "") -> dict[str, Any]:
    """Measure one preset's bench stages, each in a fresh process (`edgerlhf.bench.run_stage_process`) with the
    memory cap, in the time left before `until`; the report has `edgerlhf bench`'s layout and is saved as each
    stage ends."""
    from edgerlhf import bench

    preset = target["preset"]
    run_dir = run.work / "bench" / preset
    cap = run.result.get("cap") or {}
    report: dict[str, Any] = {"preset": preset, "device": "cuda", "steps": target["steps"],
                              "warmup": target["warmup"], "stages": {}, "comparisons": {}, "note": note,
                              "memory_measure": "CUDA peak allocated (torch.cuda.max_memory_allocated), each stage "
                                                "in its own process",
                              "cap_gib": cap.get("cap_gib") if cap.get("applied") else None,
                              "command": f"edgerlhf bench --device cuda --preset {preset} --stages "
                                         f"{','.join(target['stages'])} --steps {target['steps']} "
                                         f"--warmup {target['warmup']}"}
    with run.lock:
        run.result.setdefault("bench", {})[preset] = report
    while not (run_dir / "prepared.json").exists():  # the run directory is built beside the GPU tests
        if (run_dir / "failed.txt").exists() or time.monotonic() > until:
            with run.lock:
                report["error"] = ((run_dir / "failed.txt").read_text() if (run_dir / "failed.txt").exists()
                                   else "its run directory was not ready in time")
            run.save()
            return report
        time.sleep(1)
    config = json.loads((run_dir / "bench_config.json").read_text())
    model = config["model"]
    with run.lock:
        report["model"] = (f"{model['name_or_path']} shape, random weights ({model['architecture']}, "
                           f"n_layer={model['n_layer']} n_head={model['n_head']} n_embd={model['n_embd']})")
        report["config"] = config
    for stage in target["stages"]:
        left = until - time.monotonic()
        if left < 20:
            with run.lock:
                report["stages"][stage] = {"error": "not run: out of time"}
            continue
        run.log(f"bench {preset} {stage} (at most {left:.0f}s)")
        result = bench.run_stage_process(stage, run_dir / "bench_config.json", run_dir, target["steps"],
                                         target["warmup"], timeout=left)
        with run.lock:
            report["stages"][stage] = result
            report["comparisons"] = bench.compare(report["stages"])
        run.log(f"bench {preset} {stage}: " + (f"error {str(result['error']).splitlines()[-1][:200]}"
                                                if "error" in result else
                                                f"peak {result['peak_mb']:.0f} MiB, {result['step_s']:.3f} s/step"))
        run.save()
    return report


def benches(run: Run, preparing: subprocess.Popen | None) -> None:
    targets = run.result.get("bench_targets") or []
    if not targets or not run.result["torch"].get("cuda_available"):
        run.result["phases"]["bench"] = {"skipped": "no CUDA device"}
        return
    reference, others = targets[0], targets[1:]
    # The reference gets what it needs first (about 3 minutes), the other presets at least OTHERS_MIN_S.
    left = run.left() - RESERVE_S
    share = left if not others else min(left - OTHERS_MIN_S, max(0.6 * left, REFERENCE_MIN_S))
    saved = dict(os.environ)
    os.environ.update({**run.env, **run.bench_env})  # what `run_stage_process`'s children inherit: offline, capped
    try:
        bench_target(run, reference, time.monotonic() + share)
        if others:
            note = "ran side by side with the other presets' benches: peaks are per process, step times upper bounds"
            threads = [threading.Thread(target=bench_target, args=(run, t, run.deadline - RESERVE_S, note))
                       for t in others]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if preparing is not None and preparing.poll() is None:
        os.killpg(preparing.pid, signal.SIGKILL)
        preparing.wait()
    run.save()


# --- phase 5: the table ---


def _mib(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def bench_rows(report: dict[str, Any], target_mib: float | None) -> list[str]:
    header = f"  {'stage':<12} {'peak MiB':>9} {'floor MiB':>10} {'peak/floor':>10}"
    header += f" {'vs 1 GB':>8}" if target_mib else ""
    lines = [header + f" {'s/step':>8} {'tokens/s':>9}  note"]
    for stage, r in report.get("stages", {}).items():
        if "error" in r:
            lines.append(f"  {stage:<12} error: {str(r['error']).strip().splitlines()[-1][:90] if r['error'] else ''}")
            continue
        floor = (r.get("floor") or {}).get("total")
        floor_mib = floor / MiB if floor else None
        line = f"  {stage:<12} {r['peak_mb']:>9,.0f} {_mib(floor_mib):>10} " \
               f"{(r['peak_mb'] / floor_mib if floor_mib else float('nan')):>10.2f}"
        if target_mib:
            line += f" {'under' if r['peak_mb'] <= target_mib else 'OVER':>8}"
        note = r.get("design", r.get("trainer", r.get("precision", "")))
        if "network_copies" in r:
            note += f" ({r['network_copies']} network copies)"
        lines.append(line + f" {r['step_s']:>8.3f} {r['tokens_per_s']:>9,.0f}  {note}")
    return lines


def summary_table(result: dict[str, Any]) -> str:
    """The human-readable summary of `result` (also written as gpu-check.txt)."""
    lines = ["EdgeRLHF GPU check (scripts/gpu-check, issue 18)"]
    gpus = result.get("machine", {}).get("gpus") or []
    torch_info = result.get("torch") or {}
    if gpus:
        g = gpus[0]
        lines.append(f"GPU: {g['name']}, {g['memory_total_mib']:,.0f} MiB, driver {g['driver']}; torch "
                     f"{torch_info.get('torch')} (CUDA {torch_info.get('cuda')}), Python {torch_info.get('python')}")
    cap = result.get("cap") or {}
    if cap.get("applied"):
        lines.append(f"bench capped at {cap['cap_gib']:g} GiB per process ({cap['how']}, fraction "
                     f"{cap['fraction']:.4f}; a 1 GiB allocation over the cap was refused)")
    elif cap:
        lines.append(f"bench NOT capped: {cap.get('why')}")
    setup = result.get("phases", {}).get("setup", {})
    errors = (setup.get("imports") or {}).get("errors")
    if errors:
        lines.append(f"imports that failed: {errors}")
    lines.append(f"elapsed {result.get('elapsed_s', 0):.0f}s of {result.get('budget_s', 0):.0f}s")

    tests = result.get("phases", {}).get("tests")
    if tests:
        counts = ", ".join(f"{n} {k}" for k, n in sorted(tests["counts"].items())) or "no test ran"
        lines += ["", f"pytest -m gpu: {counts}" + (" (killed at its time limit)" if tests.get("killed") else "")]
        for name, row in tests["outcomes"].items():
            if row["outcome"] != "passed":
                lines.append(f"  {row['outcome'].upper()} {name} ({row['when']}): {row.get('message', '')[:300]}")
        figures = tests.get("figures", {})
        lines += recorded_figure_lines(figures)

    for preset, report in (result.get("bench") or {}).items():
        reference = preset == REFERENCE_PRESET
        cfg = report.get("config") or {}
        ppo = cfg.get("ppo", {})
        lines += ["", f"bench {preset}" + (f": {report.get('model')}" if report.get("model") else "")]
        if ppo:
            lines.append(f"  configuration: PPO batch {ppo.get('batch_size')}, minibatch {ppo.get('mini_batch_size')}, "
                         f"response {ppo.get('response_length')}, {ppo.get('ppo_epochs')} epochs; SFT "
                         f"{cfg['sft']['batch_size']} x {cfg['sft']['max_length']} ({cfg['sft']['precision']}); reward "
                         f"{cfg['reward']['batch_size']} pairs x {cfg['reward']['max_length']}; {report['steps']} "
                         f"timed step(s) after {report['warmup']} warm-up; CUDA peak allocated")
        if report.get("note"):
            lines.append(f"  note: {report['note']}")
        if report.get("error"):
            lines.append(f"  error: {report['error'][:300]}")
        lines += bench_rows(report, PEAK_TARGET_MIB if reference else None)
        c, s = report.get("comparisons") or {}, report.get("stages", {})
        ours, naive, rloo = s.get("ppo", {}), s.get("ppo_naive", {}), s.get("trl_rloo", {})
        if "peak_mb" in ours and ("peak_mb" in naive or "peak_mb" in rloo):
            text = f"  PPO on the GPU: one copy {ours['peak_mb']:,.0f} MiB"
            if "peak_mb" in naive:
                text += (f"; naive {naive['peak_mb']:,.0f} MiB = {c.get('naive_vs_ours_peak_ratio', 0):.2f}x the "
                         f"memory, {c.get('naive_vs_ours_step_time_ratio', 0):.2f}x the step time")
            if "peak_mb" in rloo:
                text += (f"; TRL RLOO {rloo['peak_mb']:,.0f} MiB, our PPO/TRL RLOO step time "
                         f"{c.get('ppo_vs_trl_rloo_step_time_ratio', 0):.2f}")
            lines.append(text)
        for algorithm in ("grpo", "rloo", "dpo"):  # ours against TRL's trainer (bench.compare): below 1, ours wins
            key = f"{algorithm}_ours_vs_trl"
            if f"{key}_peak_ratio" in c:
                lines.append(f"  {algorithm.upper()} ours/TRL: {c[f'{key}_peak_ratio']:.2f}x the memory, "
                             f"{c[f'{key}_step_time_ratio']:.2f}x the step time")
        if reference:
            over = [st for st, r in s.items() if "peak_mb" in r and r["peak_mb"] > PEAK_TARGET_MIB]
            lines.append(f"  1 GB target ({PEAK_TARGET_MIB} MiB per stage): " +
                         (f"over in {', '.join(over)}" if over else "every measured stage under it"))
    return "\n".join(lines)


def recorded_figure_lines(figures: dict[str, dict[str, Any]]) -> list[str]:
    """The figures the GPU tests recorded, one block per kind (keys written by tests/gpu)."""
    lines = []
    for f in figures.values():
        if "precision_study" in f:
            lines += ["", f"reward precision study on the GPU ({f.get('what', '')}):",
                      f"  {'precision':<9} {'accuracy':>8} {'spearman vs bf16':>16} {'pairs/s':>8} {'weights MB':>10} "
                      f"{'peak train MiB':>14}"]
            for p, row in f["precision_study"].items():
                sp = row.get("spearman_vs_bf16")
                lines.append(f"  {p:<9} {row['accuracy']:>8.3f} {('-' if sp is None else f'{sp:.4f}'):>16} "
                             f"{row['throughput_pairs_per_s']:>8,.0f} {row['memory_footprint_mb']:>10.2f} "
                             f"{row['peak_train_mb']:>14,.0f}")
        if "quantization_only_spearman" in f:
            lines.append("  the bf16-trained reward loaded in int8 / int4 (quantization alone): Spearman vs bf16 " +
                         " / ".join(f"{v:.4f}" for v in f["quantization_only_spearman"].values()))
        if "planner" in f:
            lines += ["", "planner against torch.cuda.max_memory_allocated:"]
            for row in f["planner"]:
                lines.append(f"  {row['config']:<18} {row['stage']:<12} planned {row['planned_bytes'] / MiB:8.1f} MiB "
                             f"measured {row['measured_bytes'] / MiB:8.1f} MiB  ratio {row['ratio']:.2f}")
        if "ppo_network_bytes" in f:
            lines += ["", f"PPO step on the GPU: one network {f['ppo_network_bytes'] / MiB:.1f} MiB; building PPO's "
                          f"models allocated {f['ppo_built_bytes'] / MiB:.1f} MiB "
                          f"({f['ppo_built_bytes'] / f['ppo_network_bytes']:.2f} copies); the step's peak "
                          f"{f['ppo_step_peak_bytes'] / MiB:.1f} MiB above that"]
        if "gpu_used_mib" in f:
            m = f["gpu_used_mib"]
            lines.append(f"cancelled job ({f.get('how')}): GPU memory used (nvidia-smi) {m['before']:,.0f} MiB before, "
                         f"{m['during']:,.0f} while it trained, {m['after']:,.0f} after")
        if "chat_tokens_per_s" in f:
            lines.append(f"chat endpoint on the GPU: {f['chat_completion_tokens']} tokens at "
                         f"{f['chat_tokens_per_s']:.0f} tokens/s, first streamed token after "
                         f"{f['chat_first_token_ms']:.0f} ms")
    return lines


# --- command lines -----------------------------------------------------------------------------------


def check(out: Path, kit: Path | None, budget_s: float, cap_gib: float, work: Path | None = None,
          tests: bool = True, bench: bool = True) -> int:
    """The whole GPU run (module docstring); exit status 0 when every GPU test passed and every
    `distilgpt2-8gb` stage was measured (of the phases that ran)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))  # the bench's own functions run the stages; the project is not installed there
    out.mkdir(parents=True, exist_ok=True)
    work = work or Path(tempfile.mkdtemp(prefix="edgerlhf-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    run = Run(out, work, budget_s)
    run.result["command"] = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    run.result["commit"] = head.stdout.strip() or None  # the copy on a device machine may have no .git
    run.log(f"repository {REPO}, kit {kit}, output {out}, work {work}, budget {budget_s:.0f}s")
    preparing = None
    try:
        setup(run, kit, cap_gib)
        if not run.result["torch"].get("cuda_available"):
            run.log("no CUDA device: the GPU tests run (and fail), the bench does not")
        if tests:
            preparing = gpu_tests(run, bench)
        if bench:
            if preparing is None:  # no tests to hide the building behind
                prepare_benches(run)
            benches(run, preparing)
    finally:
        if preparing is not None and preparing.poll() is None:
            os.killpg(preparing.pid, signal.SIGKILL)
        run.save()
    print("\n" + (run.out / "gpu-check.txt").read_text(), flush=True)
    passed = not tests or run.result["phases"].get("tests", {}).get("exit_status") == 0
    reference = (run.result.get("bench") or {}).get(REFERENCE_PRESET, {})
    measured = not bench or (reference.get("stages") and not any("error" in r for r in reference["stages"].values()))
    return 0 if passed and measured else 1


# --- rehearsal: the GPU run's Python on a CPU machine ---

TARGET_VERSIONS = {"torch": "2.11.0", "transformers": "5.17.0", "huggingface-hub": "1.33.0", "accelerate": "1.15.0",
                   "tokenizers": "0.23.2", "safetensors": "0.8.0", "numpy": "2.5.2"}
"""The lent GPU machine's versions, as sessions read them there (`pip list`, 2026-11; the device tool's KINDS.md);
the rest of `TARGET_PACKAGES` comes at whatever pip resolves beside them."""

REHEARSAL_TEST_ONLY = ("tensorboard", "openai")
"""What the CPU tests import beyond the GPU run (the GPU image has tensorboard; `openai` is the chat tests' client)."""

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
    subprocess.run([str(bin_python), str(Path(__file__).resolve()), "check", "--wheels", str(kit), "--out",
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


def main_check(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-check", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Turn a GPU machine into the GPU figures in one call (issue 18): install the carried wheels, "
                    "run `pytest -m gpu`, run `edgerlhf bench --device cuda` on distilgpt2-8gb at its full "
                    "configuration and on the other presets' architectures capped at 8 GiB, write gpu-check.json "
                    "and gpu-check.txt to --out. --dry-run instead checks, on any machine, that every import the "
                    "GPU run needs is on the target or in the wheelhouse.",
        epilog="Run on the device machine with carry=[\"gpu-wheels\"]:\n"
               "  scripts/gpu-check --wheels gpu-wheels --out \"$OUT\"")
    parser.add_argument("--dry-run", action="store_true", help="check the kit's lists against the code; no GPU")
    parser.add_argument("--wheels", type=Path, help="the folder scripts/gpu-wheels built (wheels + shared files)")
    parser.add_argument("--out", type=Path, help="where gpu-check.json, gpu-check.txt and the logs go")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help=f"seconds for the whole run, setup to table (default {DEFAULT_BUDGET_S})")
    parser.add_argument("--cap-gib", type=float, default=CAP_GIB,
                        help=f"GPU memory each bench process may allocate (default {CAP_GIB:g}: an 8 GB card)")
    parser.add_argument("--work", type=Path, help="scratch folder (default: a new temp dir)")
    parser.add_argument("--json", action="store_true", help="with --dry-run: print what was found as JSON")
    parser.add_argument("--skip-tests", action="store_true", help="no `pytest -m gpu` (e.g. to rerun only the bench)")
    parser.add_argument("--skip-bench", action="store_true", help="no bench (e.g. to rerun only the GPU tests)")
    args = parser.parse_args(argv)
    if args.dry_run:
        import importlib.util

        venv = REPO / ".venv" / "bin" / "python"
        if importlib.util.find_spec("trl") is None and venv.exists() and Path(sys.executable) != venv:
            # The dry run reads the installed metadata of every dependency: the project's environment has it.
            os.execv(str(venv), [str(venv), str(Path(__file__).resolve()), "check", *(argv or sys.argv[1:])])
        problems, found = dry_run(REPO, args.wheels)
        if args.json:
            print(json.dumps({"problems": problems, **found}, indent=2))
        else:
            carried = sorted(d for d in found["distributions"] if d in WHEELHOUSE)
            print(f"scanned {found['files_scanned']} files: {len(found['modules'])} third-party modules from "
                  f"{len(found['distributions'])} distributions; carried: {', '.join(carried)}")
            for problem in problems:
                print(f"problem: {problem}")
            print("dry run: " + ("OK" if not problems else f"{len(problems)} problem(s)"))
        return 1 if problems else 0
    if args.out is None:
        parser.error("--out is required (or --dry-run)")
    return check(args.out, args.wheels, args.budget_s, args.cap_gib, args.work, tests=not args.skip_tests,
                 bench=not args.skip_bench)


def main_wheels(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-wheels",
        description="Download, where pip reaches the registry, exactly the wheels the GPU target lacks (Python 3.12, "
                    "manylinux x86-64, versions of constraints.txt) and the shared files the GPU run reads, into a "
                    "git-ignored folder to carry to the GPU machine; fails if they exceed the size budget.")
    parser.add_argument("--out", type=Path, default=REPO / "gpu-wheels", help="the kit folder (default gpu-wheels/)")
    args = parser.parse_args(argv)
    return build_wheelhouse(args.out)


def main_rehearse(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/gpu-rehearse",
        description="Before a GPU session: on this CPU machine, build a Python like the GPU machine's (Python 3.12, "
                    "torch 2.11, transformers 5.17, huggingface-hub 1.33...), install the wheelhouse into it as "
                    "gpu-check does, import everything the GPU run needs, and run the CPU tests of its code paths "
                    "there (about 20 minutes on 2 cores, 3.5 GB of downloads the first time).")
    parser.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "edgerlhf-gpu-target",
                        help="the target-like environment (kept between rehearsals; default %(default)s)")
    parser.add_argument("--wheels", type=Path, default=REPO / "gpu-wheels", help="the kit scripts/gpu-wheels built")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "edgerlhf-gpu-rehearsal",
                        help="where the setup's gpu-check.json goes (default %(default)s)")
    parser.add_argument("--python", help="a Python 3.12 (default: python3.12 on PATH, else pyenv's)")
    args = parser.parse_args(argv)
    if not (args.wheels / WHEELS_DIR).is_dir():
        parser.error(f"no wheelhouse at {args.wheels}: run scripts/gpu-wheels first")
    return rehearse(args.venv, args.wheels, args.out, args.python)


def main(argv: list[str] | None = None) -> int:
    """`python scripts/gpu_kit.py check|dry-run|wheels|rehearse|prepare ...` (the scripts call the first four)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv else ""
    if command == "check":
        return main_check(argv)
    if command == "dry-run":
        return main_check(["--dry-run", *argv])
    if command == "wheels":
        return main_wheels(argv)
    if command == "rehearse":
        return main_rehearse(argv)
    if command == "prepare":
        parser = argparse.ArgumentParser(prog="gpu_kit.py prepare")
        parser.add_argument("--work", type=Path, required=True)
        parser.add_argument("--presets", required=True)
        args = parser.parse_args(argv)
        return prepare(args.work, args.presets.split(","))
    print("usage: gpu_kit.py check|dry-run|wheels|rehearse [...]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
