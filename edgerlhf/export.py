"""Export: a finished job's aligned policy as one Hugging Face model directory that loads anywhere.

The PPO policy is `sft/merged` plus the LoRA adapter in `ppo/adapter`; exporting merges the adapter into
the weights (in the dtype `sft/merged` was saved in) and writes them with the tokenizer, whose chat template
travels with it, to `export/model/`. `AutoModelForCausalLM.from_pretrained(that_dir)` then gives the
policy the job served, with no EdgeRLHF and no peft. Served by `edgerlhf export`, `POST /api/jobs/{id}/export`
and the job page's Export button; `tar_stream` streams the directory as one .tar download.
"""

from __future__ import annotations

import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from edgerlhf.contract import EXPORTED_MODEL, PPO_ADAPTER, SFT_MERGED
from edgerlhf.errors import require

CHUNK = 1024 * 1024


def export_policy(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Merge `ppo/adapter` into `sft/merged` and save model + tokenizer to `out_dir` (default `export/model`).

    Runs on the CPU (a GPU may be busy training). Written to a temporary directory first, so a crash never
    leaves a half-written export where a finished one is expected.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir else run_dir / EXPORTED_MODEL
    merged_dir, adapter_dir = require(run_dir / SFT_MERGED, "sft"), require(run_dir / PPO_ADAPTER, "ppo")
    model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto")
    model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(out_dir, ignore_errors=True)
    partial.rename(out_dir)
    return out_dir


def exported_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in Path(out_dir).rglob("*") if p.is_file())


def tar_stream(directory: str | Path, name: str) -> Iterator[bytes]:
    """The files of `directory` as an uncompressed tar archive (top folder `name`), produced as it is sent:
    weights are already compressed-hard data, and a multi-GB model never sits in memory or on disk twice."""
    directory = Path(directory)
    for path in exported_files(directory):
        info = tarfile.TarInfo(f"{name}/{path.relative_to(directory).as_posix()}")
        info.size, info.mtime, info.mode = path.stat().st_size, int(time.time()), 0o644
        yield info.tobuf(format=tarfile.PAX_FORMAT)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        if info.size % tarfile.BLOCKSIZE:
            yield b"\0" * (tarfile.BLOCKSIZE - info.size % tarfile.BLOCKSIZE)
    yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end of archive


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
