"""The kit's command lines: `scripts/gpu-check` (`main_check`), `scripts/gpu-wheels` (`main_wheels`),
`scripts/gpu-rehearse` (`main_rehearse`), and `python scripts/gpu_kit <command>` (`main`, `__main__.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from .check import CAP_GIB, DEFAULT_BUDGET_S, check, prepare
from .rehearse import rehearse
from .scan import dry_run
from .target import KIT, REPO, WHEELHOUSE, WHEELS_DIR
from .wheels import build_wheelhouse


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
            os.execv(str(venv), [str(venv), str(KIT), "check", *(argv or sys.argv[1:])])
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
    """`python scripts/gpu_kit check|dry-run|wheels|rehearse|prepare ...` (the scripts call the first four)."""
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
        parser = argparse.ArgumentParser(prog="gpu_kit prepare")
        parser.add_argument("--work", type=Path, required=True)
        parser.add_argument("--presets", required=True)
        args = parser.parse_args(argv)
        return prepare(args.work, args.presets.split(","))
    print("usage: gpu_kit check|dry-run|wheels|rehearse [...]", file=sys.stderr)
    return 2
