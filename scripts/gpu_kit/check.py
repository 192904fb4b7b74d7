"""The run on the GPU machine (`scripts/gpu-check --wheels gpu-wheels --out DIR`): setup, the GPU tests, the
bench, against one deadline, with `gpu-check.json` and `gpu-check.txt` rewritten as each part ends (the phases:
the package's docstring). Standard library only: it runs on the target before anything is installed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from .scan import scan_imports
from .table import REFERENCE_PRESET, summary_table
from .target import GPU_TESTS, KIT, NOT_NEEDED, REPO, SHARED_ARCHIVE, WHEELS_DIR, GiB, MiB, canonical, shared_dir

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
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
               "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"}

SITECUSTOMIZE = '''"""EdgeRLHF GPU kit: caps each process's CUDA caching allocator at EDGERLHF_GPU_KIT_CAP_BYTES.

Written by scripts/gpu_kit/check.py only where torch ignores PYTORCH_CUDA_ALLOC_CONF's per_process_memory_fraction.
Once torch.cuda is imported it wraps torch.cuda._lazy_init (which both Python and C++ call to start CUDA), so the cap
is set the moment CUDA starts, in every Python process. Then any other sitecustomize on the path runs as usual.
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
    from edgerlhf.lab.bench import STAGES
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
    """Build each preset's synthetic bench run directory in `work/<preset>` (`edgerlhf.lab.bench.prepare_run_dir`:
    its published shape with random weights, random reward adapters, prompts), as `edgerlhf bench` does before
    measuring; run with the GPU hidden, beside the GPU tests. Writes `prepared.json` (or `failed.txt`) in each."""
    sys.path.insert(0, str(REPO))
    from edgerlhf.lab.bench import bench_config, prepare_run_dir

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
    return subprocess.Popen([run.python, str(KIT), "prepare", "--work", str(run.work / "bench"),
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
    """Measure one preset's bench stages, each in a fresh process (`edgerlhf.lab.bench.run_stage_process`) with the
    memory cap, in the time left before `until`; the report has `edgerlhf bench`'s layout and is saved as each
    stage ends."""
    from edgerlhf.lab import bench

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


def check(out: Path, kit: Path | None, budget_s: float, cap_gib: float, work: Path | None = None,
          tests: bool = True, bench: bool = True) -> int:
    """The whole GPU run (the package's docstring); exit status 0 when every GPU test passed and every
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
