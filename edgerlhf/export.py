"""Export: a finished job's aligned policy as one Hugging Face model directory that loads anywhere.

The PPO policy is `sft/merged` plus the LoRA adapter in `ppo/adapter`; exporting merges the adapter into
the weights (in the dtype `sft/merged` was saved in) and writes them with the tokenizer, whose chat template
travels with it, to `export/model/`. `AutoModelForCausalLM.from_pretrained(that_dir)` then gives the
policy the job served, with no EdgeRLHF and no peft. Served by `edgerlhf export`, `POST /api/jobs/{id}/export`
and the job page's Export button; `open_export` + `tar_stream` stream the directory as one .tar download.

An export directory is never changed once it is in place: a new export is written to a directory of its own and
swapped in by renames, and a download opens every file of the directory it starts from before it sends a byte, so
a re-export (or a delete) during a download neither mixes two exports nor cuts the archive short: the files it
opened stay readable until it closes them. Only regular files are exported or sent: a symlink (to a file or a
directory), wherever it sits, is left out, never followed.
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from edgerlhf.contract import EXPORTED_MODEL, PPO_ADAPTER, SFT_MERGED
from edgerlhf.errors import require

CHUNK = 1024 * 1024


def export_policy(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Merge `ppo/adapter` into `sft/merged` and save model + tokenizer to `out_dir` (default `export/model`).

    Runs on the CPU (a GPU may be busy training), building the model under `edgerlhf.models.CONSTRUCTION_LOCK` (the
    backend builds chat models in other threads). Written to a new directory beside `out_dir` and swapped in by
    renames, so a crash never leaves a half-written export where a finished one is expected, and the directory a
    download started from is never written to.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgerlhf.models import CONSTRUCTION_LOCK

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / EXPORTED_MODEL
    merged_dir, adapter_dir = require(run_dir / SFT_MERGED, "sft"), require(run_dir / PPO_ADAPTER, "ppo")
    with CONSTRUCTION_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto")
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    try:
        model.save_pretrained(new)
        tokenizer.save_pretrained(new)
        os.chmod(new, 0o755)  # mkdtemp's 0700 would hide the export from the person's other tools
        _swap_in(new, out_dir)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    return out_dir


def _swap_in(new: Path, out_dir: Path) -> None:
    """Put the directory `new` at `out_dir` by renames; the previous one is removed (its files stay readable to
    whoever opened them)."""
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.rename(out_dir, old / "model")
    os.rename(new, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def exported_files(out_dir: Path) -> list[Path]:
    """The regular files of an export directory, sorted; symlinks (to files or directories) are not followed."""
    out_dir = Path(out_dir)
    if out_dir.is_symlink() or not out_dir.is_dir():
        return []
    files = []
    for root, dirs, names in os.walk(out_dir, followlinks=False):
        dirs[:] = [d for d in dirs if not Path(root, d).is_symlink()]
        files += [Path(root, n) for n in names if stat.S_ISREG(os.lstat(Path(root, n)).st_mode)]
    return sorted(files)


@dataclass
class OpenedFile:
    name: str
    """Its path in the archive."""
    file: BinaryIO
    size: int


def open_export(directory: str | Path, name: str) -> list[OpenedFile]:
    """Every regular file of `directory`, opened now (never through a symlink: `O_NOFOLLOW`), as members of a tar
    whose top folder is `name`. What a download sends is what these handles read: the directory may be replaced or
    deleted afterwards. The caller closes them (`tar_stream` does)."""
    directory = Path(directory)
    opened: list[OpenedFile] = []
    try:
        for path in exported_files(directory):
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            f = os.fdopen(fd, "rb")
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):  # replaced by something else since it was listed
                f.close()
                continue
            opened.append(OpenedFile(f"{name}/{path.relative_to(directory).as_posix()}", f, info.st_size))
    except BaseException:
        close_all(opened)
        raise
    return opened


def close_all(files: list[OpenedFile]) -> None:
    for opened in files:
        opened.file.close()


def tar_stream(files: list[OpenedFile]) -> Iterator[bytes]:
    """The opened files (`open_export`) as an uncompressed tar archive, produced as it is sent: weights are already
    compressed-hard data, and a multi-GB model never sits in memory or on disk twice. Closes the files."""
    try:
        for opened in files:
            info = tarfile.TarInfo(opened.name)
            info.size, info.mtime, info.mode = opened.size, int(time.time()), 0o644
            yield info.tobuf(format=tarfile.PAX_FORMAT)
            left = opened.size
            while left > 0:  # exactly the size announced in the header, whatever happens to the file
                chunk = opened.file.read(min(CHUNK, left)) or b"\0" * min(CHUNK, left)
                left -= len(chunk)
                yield chunk
            if opened.size % tarfile.BLOCKSIZE:
                yield b"\0" * (tarfile.BLOCKSIZE - opened.size % tarfile.BLOCKSIZE)
        yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end of archive
    finally:
        close_all(files)


def main(argv: list[str] | None = None) -> int:
    """`edgerlhf export RUN_DIR [--out DIR]`: print the exported directory."""
    import argparse
    import sys

    from edgerlhf.errors import StageError

    parser = argparse.ArgumentParser(prog="edgerlhf export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory whose ppo stage completed (e.g. <data dir>/runs/job-12)")
    parser.add_argument("--out", help=f"where to write the model (default: RUN_DIR/{EXPORTED_MODEL})")
    args = parser.parse_args(argv)
    try:
        out = export_policy(args.run_dir, args.out)
    except StageError as exc:
        print(f"edgerlhf export: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0
