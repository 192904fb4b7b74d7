"""Export: a finished job's aligned policy as one Hugging Face model directory that loads anywhere, or as one GGUF
file that llama.cpp, Ollama and LM Studio run.

The PPO policy is `sft/merged` plus the LoRA adapter in `ppo/adapter`; exporting merges the adapter into
the weights (in the dtype `sft/merged` was saved in) and writes them with the tokenizer, whose chat template
travels with it, to `export/model/`. `AutoModelForCausalLM.from_pretrained(that_dir)` then gives the
policy the job served, with no EdgeRLHF and no peft. `--format gguf` writes the same merged policy to
`export/gguf-<quant>/` instead: the GGUF file (`edgerlhf.gguf_export`), an Ollama `Modelfile` with the job's
sampling settings and a README of the commands that run it (`edgerlhf.modelfile`). Served by `edgerlhf export`,
`POST /api/jobs/{id}/export` and the job page's Export button; `open_export` + `tar_stream` stream the directory as
one .tar download; `estimate_export` says beforehand how much disk and memory an export takes. The next round of RLHF
starts from the same merge: its SFT stage writes its parent's policy with `export_policy`
(`edgerlhf.sft.write_parent_policy`).

An export directory is never changed once it is in place: a new export is written to a directory of its own and
swapped in by renames, and a download opens every file of the directory it starts from before it sends a byte, so
a re-export (or a delete) during a download neither mixes two exports nor cuts the archive short: the files it
opened stay readable until it closes them. Only regular files are exported or sent: a symlink (to a file or a
directory), wherever it sits, is left out, never followed.
"""

from __future__ import annotations

import json
import math
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

from edgerlhf.contract import (CONFIG_FILE, EXPORT_FORMATS, EXPORTED_MODEL, GGUF_QUANTS, PPO_ADAPTER, SFT_MERGED,
                               exported_gguf, gguf_file_name)
from edgerlhf.errors import StageError, require

CHUNK = 1024 * 1024


def merged_policy(run_dir: Path):
    """(model, tokenizer) of the job's aligned policy: `ppo/adapter` merged into `sft/merged`, on the CPU (a GPU may be
    busy training), built under `edgerlhf.models.CONSTRUCTION_LOCK` (the backend builds chat models in other
    threads)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgerlhf.models import CONSTRUCTION_LOCK

    merged_dir, adapter_dir = require(run_dir / SFT_MERGED, "sft"), require(run_dir / PPO_ADAPTER, "ppo")
    with CONSTRUCTION_LOCK:
        model = AutoModelForCausalLM.from_pretrained(str(merged_dir), dtype="auto")
        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    return model.eval(), tokenizer


def export_policy(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Merge `ppo/adapter` into `sft/merged` and save model + tokenizer to `out_dir` (default `export/model`).

    Written to a new directory beside `out_dir` and swapped in by renames, so a crash never leaves a half-written
    export where a finished one is expected, and the directory a download started from is never written to.
    """
    run_dir = Path(run_dir)
    model, tokenizer = merged_policy(run_dir)

    def write(new: Path) -> None:
        model.save_pretrained(new)
        tokenizer.save_pretrained(new)

    return _write_atomically(Path(out_dir) if out_dir else run_dir / EXPORTED_MODEL, write)


def export_gguf(run_dir: str | Path, quant: str = "q8_0", out_dir: str | Path | None = None) -> tuple[Path, list[str]]:
    """Merge the policy as `export_policy` does and write it to `out_dir` (default `export/gguf-<quant>`) as one GGUF
    file (`contract.gguf_file_name`) with an Ollama `Modelfile` and a `README.md` of the commands that run it.

    Returns (the directory, notes): what transformers' GGUF reader would rebuild differently from the model (the
    file still runs in llama.cpp, but loading it back could not check it). Raises `GGUFExportError` (a `StageError`)
    for a family, config or tokenizer the GGUF export cannot write faithfully. Swapped in by renames, as
    `export_policy`.
    """
    from edgerlhf import modelfile
    from edgerlhf.dialogue import HH_CHAT_TEMPLATE, PromptFormat
    from edgerlhf.gguf_export import adds_bos, family_of, readback_differences, write_gguf

    run_dir = Path(run_dir)
    if quant not in GGUF_QUANTS:
        raise StageError(f"unknown GGUF quant {quant!r}; choose from {list(GGUF_QUANTS)}")
    model, tokenizer = merged_policy(run_dir)
    family_of(model.config)  # refuse before writing anything
    ppo = json.loads((run_dir / CONFIG_FILE).read_text()).get("ppo", {}) if (run_dir / CONFIG_FILE).is_file() else {}
    sampling = {key: ppo.get(key, default) for key, default in (("temperature", 1.0), ("top_k", 50), ("top_p", 0.95))}
    fmt = PromptFormat.of(tokenizer)
    chat_template = tokenizer.chat_template or HH_CHAT_TEMPLATE
    name, file_name = f"edgerlhf-{run_dir.name}", gguf_file_name(quant)

    def render(messages, add_generation_prompt):
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    turns = modelfile.turn_template(render, tokenizer.bos_token if adds_bos(tokenizer) else "")
    stops = [*fmt.stop_strings, *(tokenizer.convert_ids_to_tokens(i) for i in fmt.stop_token_ids)]
    context = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    notes: list[str] = []

    def write(new: Path) -> None:
        path = new / file_name
        write_gguf(model, tokenizer, path, quant, name=name, chat_template=chat_template,
                   stop_token_ids=fmt.stop_token_ids, sampling=sampling)
        differences = readback_differences(path, model.config)
        if differences:
            notes.append("transformers' GGUF reader (`from_pretrained(..., gguf_file=...)`) rebuilds this model with "
                         f"{', '.join(differences)}: llama.cpp reads what it leaves out, but loading the file back "
                         "into transformers does not give this model.")
        if turns is None:
            notes.append("The Modelfile has no TEMPLATE: the chat template cannot be written as an Ollama template, "
                         "so Ollama picks one from the chat template inside the GGUF file.")
        (new / "Modelfile").write_text(modelfile.modelfile(file_name, turns, stops, sampling, context))
        (new / "README.md").write_text(modelfile.run_readme(name, file_name, quant, sampling, notes))

    out = _write_atomically(Path(out_dir) if out_dir else run_dir / exported_gguf(quant), write)
    return out, notes


def _write_atomically(out_dir: Path, write) -> Path:
    """Run `write(new)` on a new directory beside `out_dir`, then swap it in (`_swap_in`); on any failure the new
    directory is removed and `out_dir` is left as it was."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.new-", dir=out_dir.parent))
    try:
        write(new)
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


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2, "I8": 1, "U8": 1,
                     "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
"""Bytes per element of each safetensors dtype."""
GGUF_BYTES_PER_WEIGHT = {"f16": 2.0, "q8_0": 34 / 32}
"""Bytes per weight of a GGUF export's matrices (q8_0: 32 int8 weights and one f16 scale per block)."""
RUNTIME_BYTES = 512 * 2**20
"""Python, torch and transformers themselves, before any weight."""


@dataclass(frozen=True)
class ExportEstimate:
    """Roughly what an export needs, from the weights' count and sizes (no model is loaded): an estimate."""

    parameters: int
    """Weights of the policy (`sft/merged`'s; merging the adapter adds none)."""
    disk_bytes: int
    """About what the export writes: weights x bytes per weight of the format."""
    ram_bytes: int
    """About the conversion's peak memory: the merged model in its saved dtype, plus (GGUF) the converted copy the
    writer holds and float32 copies of the largest tensor, plus the runtime."""


def _safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file: each tensor's dtype and shape (no weights are read)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= 100 * 2**20:
                raise ValueError(f"a header of {size} bytes")
            return json.loads(f.read(size))
    except (OSError, ValueError) as exc:
        raise StageError(f"{path} is not a readable safetensors file ({exc})") from None


def estimate_export(run_dir: str | Path, fmt: str = "hf", quant: str = "q8_0") -> ExportEstimate:
    """How much disk and memory exporting the job's policy as `fmt` (and `quant`) takes, from `sft/merged`'s
    safetensors headers: parameter count x bytes per weight. An estimate, not a measurement."""
    if fmt not in EXPORT_FORMATS:
        raise StageError(f"unknown export format {fmt!r}; choose from {list(EXPORT_FORMATS)}")
    files = sorted(require(Path(run_dir) / SFT_MERGED, "sft").glob("*.safetensors"))
    if not files:
        raise StageError(f"{Path(run_dir) / SFT_MERGED} holds no safetensors weights to estimate from")
    parameters = source_bytes = largest = 0
    for path in files:
        for name, info in _safetensors_header(path).items():
            if name == "__metadata__":
                continue
            count = math.prod(info["shape"])
            parameters += count
            source_bytes += count * SAFETENSORS_BYTES.get(info["dtype"], 4)
            largest = max(largest, count)
    if fmt == "hf":
        disk = source_bytes
        ram = source_bytes + 4 * largest
    else:
        tokenizer = Path(run_dir) / SFT_MERGED / "tokenizer.json"  # its tokens and merges become the file's metadata
        disk = int(parameters * GGUF_BYTES_PER_WEIGHT[quant]) + (tokenizer.stat().st_size if tokenizer.is_file() else 0)
        ram = source_bytes + disk + 3 * 4 * largest
    return ExportEstimate(parameters, disk, ram + RUNTIME_BYTES)


def human_size(n: int) -> str:
    """`n` bytes as a person reads them: 812 B, 3.4 KB, 5.0 MB, 1.2 GB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def main(argv: list[str] | None = None) -> int:
    """`edgerlhf export RUN_DIR [--format hf|gguf] [--quant f16|q8_0] [--out DIR]`: print the exported directory and
    the size of each file written."""
    import argparse
    import sys

    from edgerlhf.gguf_export import GGUF_FAMILIES, REFUSED_FAMILIES

    parser = argparse.ArgumentParser(
        prog="edgerlhf export", description=__doc__.split("\n\n")[0],
        epilog="gguf: one GGUF file (the merged policy, its tokenizer, chat template and stop tokens) with an Ollama "
               "Modelfile (template, stops, the job's temperature/top_k/top_p) and a README of the commands: "
               "`ollama create NAME -f Modelfile`, `llama-cli -m FILE --jinja`. Families: "
               f"{', '.join(GGUF_FAMILIES)}; refused: {', '.join(REFUSED_FAMILIES)}. Before writing, it prints "
               "roughly how much disk and memory the export needs (weights x bytes per weight: an estimate).")
    parser.add_argument("run_dir", help="a run directory whose ppo stage completed (e.g. <data dir>/runs/job-12)")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="hf",
                        help="hf: a Hugging Face model directory (default); gguf: a GGUF file for llama.cpp, Ollama "
                             "and LM Studio")
    parser.add_argument("--quant", choices=GGUF_QUANTS, default="q8_0",
                        help="with --format gguf: the matrices' type, f16 or q8_0 (default; about half f16's size)")
    parser.add_argument("--out", help=f"where to write the export (default: RUN_DIR/{EXPORTED_MODEL}, or "
                                      f"RUN_DIR/{exported_gguf('q8_0').replace('q8_0', '<quant>')} for gguf)")
    args = parser.parse_args(argv)
    try:
        need = estimate_export(args.run_dir, args.format, args.quant)
        print(f"edgerlhf export: {need.parameters:,} weights; needs about {human_size(need.disk_bytes)} of disk and "
              f"{human_size(need.ram_bytes)} of memory (an estimate)", file=sys.stderr)
        notes: list[str] = []
        if args.format == "gguf":
            out, notes = export_gguf(args.run_dir, args.quant, args.out)
        else:
            out = export_policy(args.run_dir, args.out)
    except StageError as exc:
        print(f"edgerlhf export: {exc}", file=sys.stderr)
        return 1
    print(out)
    files = exported_files(out)
    for path in files:
        print(f"  {path.relative_to(out).as_posix()}  {human_size(path.stat().st_size)}")
    print(f"  total  {human_size(sum(p.stat().st_size for p in files))}")
    for note in notes:
        print(f"edgerlhf export: note: {note}", file=sys.stderr)
    return 0
