"""The library's layout holds: no import circle inside `edgerlhf/`, no import of the service's processes from it, and
the alignment package's floors (each module imports only those below it). Read from the source with `ast`, every
import counted, those inside functions too."""

from __future__ import annotations

import ast
from pathlib import Path

import edgerlhf
from edgerlhf import align
from edgerlhf.contract import ALGORITHM_TABLE

LIBRARY = Path(edgerlhf.__file__).parent
SERVICE = ("worker", "backend", "db", "frontend")

ALIGN_FLOORS = [("losses", "policy"), ("rollout", "offline"), ("ppo", "grpo", "rloo", "dpo", "kto"), ("loop",),
                ("__init__",)]
"""The alignment package bottom to top (`edgerlhf/align/__init__.py`'s docstring)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBRARY.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, anywhere in the file (`from edgerlhf import x` counts as `edgerlhf.x` when x is a
    module)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def library_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in LIBRARY.rglob("*.py")}
    return {name: {m for m in imports(path) if m in modules and m != name} for name, path in modules.items()}


def test_the_library_imports_no_service_process():
    offending = {module_name(p): sorted(m for m in imports(p) if m.split(".")[0] in SERVICE)
                 for p in LIBRARY.rglob("*.py")}
    assert not {k: v for k, v in offending.items() if v}


def test_the_library_has_no_import_circle():
    graph = library_graph()
    # A package imports what its __init__ imports; a module importing its own package's face is not a circle
    # through the package's modules unless the face imports it back, which the search below finds.
    state: dict[str, int] = {}
    circles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles


def test_the_alignment_package_reads_in_floors():
    floor = {name: i for i, names in enumerate(ALIGN_FLOORS) for name in names}
    assert set(floor) == {p.stem for p in Path(align.__file__).parent.glob("*.py")}
    graph = library_graph()
    for name, level in floor.items():
        module = "edgerlhf.align" if name == "__init__" else f"edgerlhf.align.{name}"
        below = {f"edgerlhf.align.{n}" for n, lv in floor.items() if lv < level and n != "__init__"}
        used = {m for m in graph[module] if m.startswith("edgerlhf.align")}
        assert used <= below, (module, used - below)


def test_every_algorithm_of_the_table_has_a_step_or_a_trainer():
    sampling = {a.name for a in ALGORITHM_TABLE.values() if a.samples}
    assert set(align.STEPS) == sampling
    assert set(align.TRAINERS) == set(ALGORITHM_TABLE) - sampling
