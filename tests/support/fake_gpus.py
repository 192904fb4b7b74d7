"""A stand-in for `nvidia-smi` put first on PATH, so GPU discovery runs the same on a machine with or without
GPUs: it answers `--query-gpu=<fields> --format=csv,noheader,nounits [-i N]` for the GPUs it is given, and
"No devices were found" (exit code 6, as nvidia-smi does) for an index it does not have."""

from __future__ import annotations

import os
import sys
from pathlib import Path

SCRIPT = """#!{python}
import sys
GPUS = {gpus!r}
args = sys.argv[1:]
fields = next(a.split("=", 1)[1] for a in args if a.startswith("--query-gpu=")).split(",")
chosen = range(len(GPUS))
if "-i" in args:
    wanted = args[args.index("-i") + 1].split(",")
    chosen = [int(w) for w in wanted if w.isdigit() and int(w) < len(GPUS)]
    if not chosen:
        print("No devices were found")
        sys.exit(6)
for i in chosen:
    name, total = GPUS[i]
    row = {{"index": i, "name": name, "memory.total": total, "memory.used": 0, "uuid": f"GPU-fake-{{i}}"}}
    print(", ".join(str(row[f.strip()]) for f in fields))
"""

FAKE_GPUS = [("Fake GPU Zero", 8192), ("Fake GPU One", 24576)]
"""(name, memory.total in MB) per index."""


def fake_nvidia_smi_path(bin_dir: Path, gpus: list[tuple[str, int]] = FAKE_GPUS) -> str:
    """Write the fake `nvidia-smi` into `bin_dir`; returns a PATH that finds it first."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "nvidia-smi"
    exe.write_text(SCRIPT.format(python=sys.executable, gpus=gpus))
    exe.chmod(0o755)
    return os.pathsep.join([str(bin_dir), os.environ.get("PATH", "")])
