"""The GPU kit (`scripts/gpu-check`, `scripts/gpu-wheels`, `scripts/gpu_kit/`) checked on the CPU, so it cannot
rot between the rare runs on a GPU: every import the GPU tests and the bench need is on the target or carried,
the import scanner and the wheelhouse check catch what they must, `pytest -m gpu` fails (never skips) without
CUDA, the fallback memory cap hooks CUDA's start, and the table flags what it must."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.support.procs import REPO_ROOT

KIT_PARENT = str(REPO_ROOT / "scripts")


@pytest.fixture(scope="module")
def kit():
    """The kit's package (scripts/gpu_kit/) with its job modules, imported as the scripts import it. A list is
    patched in the module that reads it (`kit.scan.WHEELHOUSE` for the dry run and the wheelhouse check)."""
    sys.path.insert(0, KIT_PARENT)
    try:
        for name in ("scan", "check", "table", "rehearse"):
            importlib.import_module(f"gpu_kit.{name}")
    finally:
        sys.path.remove(KIT_PARENT)
    return sys.modules["gpu_kit"]


def test_dry_run_every_import_of_the_gpu_run_is_on_the_target_or_carried():
    """The CI check: the script's dry mode over the real code, as CI would run it."""
    proc = subprocess.run([sys.executable, "scripts/gpu-check", "--dry-run", "--json"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    found = json.loads(proc.stdout)
    assert proc.returncode == 0 and found["problems"] == [], found["problems"]
    # What the GPU run cannot do without: the trainers, the quantized kernels, the queue, the chat endpoint.
    for module in ("trl", "bitsandbytes", "datasets", "sqlalchemy", "fastapi", "torch", "pytest"):
        assert module in found["modules"], module


def test_dry_run_reports_a_missing_wheel_and_a_wheel_nothing_needs(kit, monkeypatch):
    monkeypatch.setattr(kit.scan, "WHEELHOUSE", {k: v for k, v in kit.scan.WHEELHOUSE.items() if k != "bitsandbytes"}
                        | {"psycopg": "nothing"})
    problems, _ = kit.scan.dry_run(REPO_ROOT)
    assert any(p.startswith("bitsandbytes") and "neither on the target" in p for p in problems), problems
    assert any(p.startswith("psycopg: carried but nothing") for p in problems), problems


def test_dry_run_reports_a_wheel_whose_requirement_is_neither_on_the_target_nor_carried(kit, monkeypatch):
    monkeypatch.setattr(kit.scan, "WHEELHOUSE", {k: v for k, v in kit.scan.WHEELHOUSE.items() if k != "multiprocess"})
    problems, _ = kit.scan.dry_run(REPO_ROOT)
    assert any("datasets requires multiprocess" in p for p in problems), problems


def test_the_import_scan_follows_local_imports_and_tells_required_from_guarded(kit, tmp_path, monkeypatch):
    (tmp_path / "edgerlhf").mkdir()
    (tmp_path / "edgerlhf" / "__init__.py").write_text("")
    (tmp_path / "edgerlhf" / "stage.py").write_text(textwrap.dedent("""
        from __future__ import annotations
        import json
        from typing import TYPE_CHECKING
        import torch.nn
        from .helpers import helper
        if TYPE_CHECKING:
            import pandas
        def later():
            from trl import SFTConfig
        try:
            import tensorboard
        except ImportError:
            tensorboard = None
    """))
    (tmp_path / "edgerlhf" / "helpers.py").write_text("import fastapi\nhelper = 1\n")
    (tmp_path / "tests" / "gpu").mkdir(parents=True)
    (tmp_path / "tests" / "conftest.py").write_text("import pytest\n")
    (tmp_path / "tests" / "gpu" / "test_x.py").write_text("from tests.support import thing\n")
    (tmp_path / "tests" / "support.py").write_text("import httpx\nthing = 1\n")
    monkeypatch.setattr(kit.scan, "LOCAL_PACKAGES", ("edgerlhf",))
    found = kit.scan.scan_imports(tmp_path)
    assert set(found.required) == {"torch", "trl", "fastapi", "pytest", "httpx"}
    assert set(found.optional) == {"tensorboard"}
    assert found.required["trl"] == ["edgerlhf/stage.py:10"]
    assert "tests/support.py" in found.files


def _fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(folder / f"{dist}-py3-none-any.whl", "w") as wheel:
        meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
        meta += [f"Requires-Dist: {r}" for r in requires]
        wheel.writestr(f"{dist}.dist-info/METADATA", "\n".join(meta) + "\n\nlong description\n")


def test_the_wheelhouse_check_wants_exactly_the_pinned_wheels_within_budget(kit, tmp_path, monkeypatch):
    pins = kit.scan.constraint_pins(REPO_ROOT)
    wheels = tmp_path / "kit" / kit.scan.WHEELS_DIR
    wheels.mkdir(parents=True)
    for name in kit.scan.WHEELHOUSE:
        _fake_wheel(wheels, name, pins[name], ["numpy>=1.17", 'tomli; python_version < "3.11"', "rich; extra == 'x'"])
    with tarfile.open(tmp_path / "kit" / kit.scan.SHARED_ARCHIVE, "w:gz"):
        pass
    assert kit.scan.check_wheelhouse(tmp_path / "kit", REPO_ROOT) == []

    _fake_wheel(wheels, "trl", "0.0.1", [])  # a second version
    (wheels / f"sqlalchemy-{pins['sqlalchemy']}-py3-none-any.whl").unlink()
    _fake_wheel(wheels, "psycopg", pins["psycopg"], ["psycopg-pool"])  # not on the list, nor is what it requires
    problems = kit.scan.check_wheelhouse(tmp_path / "kit", REPO_ROOT)
    assert any(p.startswith("trl: 2 versions") for p in problems), problems
    assert any(p.startswith("sqlalchemy: no wheel") for p in problems), problems
    assert any(p.startswith("psycopg: a wheel the kit does not list") for p in problems), problems
    assert any(p.startswith("psycopg requires psycopg-pool") for p in problems), problems

    # Over the budget: 64 MiB less the working tree and the margin, here made smaller than the kit.
    (tmp_path / "kit" / "padding").write_bytes(bytes(kit.scan.MiB))
    tree = kit.scan.travelling_tree_bytes(REPO_ROOT)
    monkeypatch.setattr(kit.scan, "CARRY_LIMIT", tree + kit.scan.CARRY_MARGIN + kit.scan.MiB // 2)
    assert any("over its budget" in p for p in kit.scan.check_wheelhouse(tmp_path / "kit", REPO_ROOT))


def test_pytest_m_gpu_fails_instead_of_skipping_without_cuda():
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the GPU test would run")
    test = "tests/gpu/test_device.py"
    asked = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", test, "-p", "no:cacheprovider", "-q"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert asked.returncode == 1, asked.stdout
    assert "1 error" in asked.stdout and "skipped" not in asked.stdout, asked.stdout
    assert "fail rather than skip" in asked.stdout
    plain = subprocess.run([sys.executable, "-m", "pytest", test, "-p", "no:cacheprovider", "-q"],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert plain.returncode == 0 and "1 skipped" in plain.stdout, plain.stdout


def test_the_fallback_cap_wraps_cudas_start_in_every_process(kit, tmp_path):
    (tmp_path / "sitecustomize.py").write_text(kit.check.SITECUSTOMIZE)
    env = {"PYTHONPATH": str(tmp_path), "EDGERLHF_GPU_KIT_CAP_BYTES": str(8 * 2**30), "PATH": "/usr/bin:/bin"}
    code = "import torch; print(torch.cuda._lazy_init.__qualname__); print(float((torch.ones(2) * 3).sum()))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    wrapper, total = out.stdout.split()
    assert wrapper.startswith("_CapWhenCudaStarts.") and total == "6.0"


def test_the_bench_targets_are_the_reference_at_full_configuration_and_the_published_presets(kit):
    from edgerlhf.architectures import PUBLISHED_SHAPES
    from edgerlhf.lab.bench import STAGES
    from edgerlhf.config import PRESETS

    targets = kit.check.reference_and_preset_targets()
    assert targets[0]["preset"] == "distilgpt2-8gb" and targets[0]["stages"] == list(STAGES)
    assert len(targets) > 1
    for target in targets[1:]:
        assert PRESETS[target["preset"]]["model"]["name_or_path"] in PUBLISHED_SHAPES
        assert set(target["stages"]) <= set(STAGES) and "ppo" in target["stages"]


def test_the_table_flags_stages_over_the_target_and_failing_tests(kit):
    def stage(peak, **extra):
        return {"peak_mb": peak, "step_s": 1.0, "tokens_per_s": 10.0, "floor": {"total": 200 * kit.table.MiB}, **extra}

    stages = {"sft": stage(1500.0), "ppo": stage(800.0, network_copies=1.0), "ppo_naive": stage(1600.0),
              "trl_rloo": {"error": "Traceback ...\nOutOfMemoryError: CUDA out of memory"},
              "grpo": stage(700.0), "trl_grpo": stage(1000.0)}
    from edgerlhf.lab.bench import compare

    result = {"budget_s": 540, "elapsed_s": 500,
              "phases": {"tests": {"counts": {"passed": 1, "failed": 1}, "figures": {},
                                   "outcomes": {"t::a": {"outcome": "passed", "when": "call"},
                                                "t::b": {"outcome": "failed", "when": "call", "message": "boom"}}}},
              "bench": {"distilgpt2-8gb": {"steps": 2, "warmup": 1, "stages": stages, "comparisons": compare(stages)}}}
    table = kit.table.summary_table(result)
    lines = {line.split()[0]: line for line in table.splitlines() if line.startswith("  ") and line.split()}
    assert "OVER" in lines["sft"] and "under" in lines["ppo"]
    assert "OutOfMemoryError" in lines["trl_rloo"]
    assert "GRPO ours/TRL: 0.70x the memory, 1.00x the step time" in table and "RLOO ours/TRL" not in table
    assert "FAILED t::b (call): boom" in table and "t::a" not in table
    assert "naive 1,600 MiB = 2.00x the memory" in table
    assert "over in sft, ppo_naive" in table


def test_the_table_shows_what_the_gpu_tests_recorded(kit):
    row = {"accuracy": 0.95, "throughput_pairs_per_s": 400.0, "memory_footprint_mb": 12.5, "peak_train_mb": 300.0}
    figures = {
        "t::study": {"what": "tiny", "precision_study": {"bf16": {**row, "spearman_vs_bf16": 1.0},
                                                         "int4": {**row, "accuracy": 0.9, "spearman_vs_bf16": 0.97}}},
        "t::quant": {"quantization_only_spearman": {"int8": 0.999, "int4": 0.998}},
        "t::plan": {"planner": [{"config": "gpt2-small", "stage": "sft", "planned_bytes": 2 * kit.table.MiB,
                                 "measured_bytes": kit.table.MiB, "ratio": 2.0}]},
        "t::ppo": {"ppo_network_bytes": 10 * kit.table.MiB, "ppo_built_bytes": 11 * kit.table.MiB,
                   "ppo_step_peak_bytes": kit.table.MiB},
        "t::cancel": {"how": "hung", "gpu_used_mib": {"before": 500.0, "during": 1500.0, "after": 501.0}},
        "t::chat": {"chat_completion_tokens": 48, "chat_tokens_per_s": 120.0, "chat_first_token_ms": 30.0},
    }
    text = "\n".join(kit.table.recorded_figure_lines(figures))
    assert "int4         0.900           0.9700" in text
    assert "0.9990 / 0.9980" in text
    assert "ratio 2.00" in text and "(1.10 copies)" in text
    assert "cancelled job (hung): GPU memory used (nvidia-smi) 500 MiB before, 1,500 while it trained, 501 after" \
        in text
    assert "48 tokens at 120 tokens/s" in text


def test_the_rehearsal_pins_the_targets_own_packages_and_runs_tests_that_exist(kit):
    """`scripts/gpu-rehearse` builds the target's Python from `TARGET_VERSIONS` and runs `REHEARSAL_TESTS`: a pin
    outside the target's list, or a test path that moved, would rehearse something else."""
    assert set(kit.rehearse.TARGET_VERSIONS) <= kit.rehearse.TARGET_PACKAGES
    assert not set(kit.rehearse.REHEARSAL_TEST_ONLY) & (kit.rehearse.TARGET_PACKAGES | set(kit.rehearse.WHEELHOUSE))
    args = kit.rehearse.REHEARSAL_TESTS
    paths = [arg for i, arg in enumerate(args) if not arg.startswith("-") and (i == 0 or args[i - 1] != "-k")]
    assert paths and all((REPO_ROOT / path).exists() for path in paths), paths
    assert (REPO_ROOT / "scripts" / "gpu-rehearse").stat().st_mode & 0o111
