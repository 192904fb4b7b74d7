"""The dry run: what the GPU run imports, read from the code (the AST, nothing imported), against what the target
has and what the kit carries; and the built wheelhouse checked against the same lists (`check_wheelhouse`).

`scripts/gpu-check --dry-run` runs `dry_run` on any machine (CI included), so the kit's lists cannot drift from
the code between the rare GPU runs. Standard library only (plus the installed metadata it reads).
"""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .target import (CARRY_LIMIT, CARRY_MARGIN, GPU_TESTS, LOCAL_PACKAGES, NOT_NEEDED, REPO, RUNNER_NEEDS,
                     SHARED_ARCHIVE, TARGET_ENVIRONMENT, TARGET_PACKAGES, WHEELHOUSE, WHEELS_DIR, MiB, canonical,
                     constraint_pins)


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
