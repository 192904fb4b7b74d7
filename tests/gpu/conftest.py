"""The GPU tests (`pytestmark = pytest.mark.gpu`): the CUDA paths no CPU run reaches.

Without CUDA they are skipped, except when the run asked for them: `pytest -m gpu` (or `EDGERLHF_REQUIRE_GPU=1`)
makes a missing GPU a failure, so a GPU run that lost its GPU cannot pass by skipping everything.

With `EDGERLHF_GPU_RECORD=FILE`, each test's outcome and the figures it measured (the `record` fixture) are
appended to FILE as JSON lines; `scripts/gpu-check` reads them into its report and table.
"""

from __future__ import annotations

import json
import os
import re

import pytest

RECORD_ENV = "EDGERLHF_GPU_RECORD"
REQUIRE_ENV = "EDGERLHF_REQUIRE_GPU"


def gpu_requested(config: pytest.Config) -> bool:
    """Whether this run asked for the GPU tests: `-m` selects `gpu` (not `not gpu`), or EDGERLHF_REQUIRE_GPU=1."""
    if os.environ.get(REQUIRE_ENV) == "1":
        return True
    expression = config.getoption("markexpr") or ""
    return "gpu" in re.findall(r"\w+", expression) and not re.search(r"\bnot\s+gpu\b", expression)


def _cuda_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda})"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu") is None:
        return
    missing = _cuda_missing()
    if missing is None:
        return
    if gpu_requested(item.config):
        pytest.fail(f"{missing}: `pytest -m gpu` asks for the GPU tests, which fail rather than skip without one",
                    pytrace=False)
    pytest.skip(missing)


def _append(row: dict) -> None:
    path = os.environ.get(RECORD_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, default=float) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "call" or report.outcome != "passed":
        message = ""
        if report.outcome != "passed":
            message = str(report.longrepr.reprcrash.message if hasattr(report.longrepr, "reprcrash")
                          and report.longrepr.reprcrash else report.longrepr)[-1000:]
        _append({"test": report.nodeid, "when": report.when, "outcome": report.outcome,
                 "seconds": round(report.duration, 2), "message": message})


@pytest.fixture
def record(request):
    """`record(key=value, ...)`: figures this test measured, for `scripts/gpu-check`'s report (JSON values)."""
    def write(**figures) -> None:
        _append({"test": request.node.nodeid, "figures": figures})
    return write
