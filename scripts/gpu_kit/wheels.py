"""The wheelhouse builder (`scripts/gpu-wheels`): where pip reaches the registry, download exactly the wheels the
target lacks (`WHEELHOUSE`, Python 3.12, manylinux x86-64, versions of constraints.txt) and pack the shared files
beside them, into one git-ignored folder to carry to the GPU machine; checked by `scan.check_wheelhouse`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from .scan import carry_budget, check_wheelhouse, folder_bytes, wheel_metadata
from .target import (CARRY_LIMIT, CARRY_MARGIN, MANIFEST, PLATFORMS, REPO, SHARED_ARCHIVE, SHARED_FILES,
                     TARGET_PACKAGES, WHEELHOUSE, WHEELS_DIR, MiB, constraint_pins, shared_dir)


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


def pack_shared(archive: Path) -> None:
    source = shared_dir()
    with tarfile.open(archive, "w:gz") as tar:
        for rel in SHARED_FILES:
            if not (source / rel).exists():
                raise FileNotFoundError(f"{source / rel} is missing (set EDGERLHF_SHARED_DIR)")
            tar.add(source / rel, arcname=rel)
