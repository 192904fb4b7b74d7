"""The service's data sets (issue 29): uploads stored once per content, hub ids registered, previews through a
model's tokenizer, and the config fields through which a job reads a data set named by its id.

**Storage.** An upload lives at `<data dir>/datasets/<sha256>/<file name>`: the directory is named by the content's
hash, so the same file uploaded twice is one data set; the file name is the uploaded one, sanitised (letters,
digits, `.`, `_`, `-`), keeping its type (`.jsonl`, `.csv.gz` ...), which is how `edgerlhf.formats` reads it.
Nothing is half-stored: the bytes stream into a directory of their own under `datasets/.incoming/` (the same file
system, so the last step is a rename), hashed and counted on the way (past `EDGERLHF_MAX_UPLOAD_BYTES`: 413); the
file is read whole through `edgerlhf.formats`, which detects its format or refuses it naming the file, the line and
the column (422); only then, under the store's lock, is the directory renamed into place and the row inserted. On
any error the incoming directory goes. The lock (a file lock in `datasets/`, so several backend processes on one
data directory agree) also covers a delete, refused while a queued or running job reads the data set, and the
insertion of a job that names data sets by id: no job is queued on a data set being deleted.

A hub data set is read once when it is registered (to detect its format), and kept as its coordinates (id, `name`,
`data_dir`, `split`): a job downloads it. A hub id that cannot be had (offline, gated, missing), for a data set or a
preview's tokenizer, is a 422 naming the field with `edgerlhf.locations`' reason: a 4xx like every refusal, since
the service promises no 5xx to any request (tests/backend/test_schemathesis.py).

**Jobs.** `POST /api/jobs` takes `datasets: {"data": id, "sft_data": id, "prompt_data": id}`. Each id becomes that
config section's `source` (the stored file's absolute path, or the hub id with its `name`, `data_dir` and `split`),
`format` and `columns` before the config is validated (`job_overrides`), so the service's path rule
(`edgerlhf.config.service_problems`) judges the path like any other (it lies under the data directory, which is
allowed), and the job's config alone reproduces the run. The job's own overrides of a section's other fields win;
a `source` of its own for a section it also names a data set for is a 422.

**Preview.** The first rows as a model sees them (its tokenizer's `PromptFormat`: its chat template when it has
one, prompt and answers apart), histograms of the token lengths the data stage's budgets compare (the stored prompt,
and each answer after a space: `edgerlhf.data`), what given `max_prompt_tokens`/`max_response_tokens` would drop
(the data stage's own `clean_pairs`/`clean_records`), and the bad rows by file and line. A data set is measured on
its first `MAX_MEASURED` records; the answer says how many that was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from db import datasets as store
from db.models import Dataset
from edgerlhf import formats, locations
from edgerlhf.settings import Settings

logger = logging.getLogger("edgerlhf.backend")

INCOMING = ".incoming"
"""Under `datasets/`: one directory per upload being received and checked."""
STALE_INCOMING_S = 6 * 3600
"""An incoming directory this old was left by a process that died mid-upload: the next upload removes it."""
LOCK_TIMEOUT_S = 60.0
CHUNK_BYTES = 1 << 20
MAX_FILE_NAME = 120
"""Characters kept of an uploaded file's name (its end: the type stays)."""
MAX_COLUMNS = 64
"""Entries of a column mapping."""
MAX_MEASURED = 20_000
"""Records a preview reads, tokenizes and counts (the first ones), so one preview of a large set stays seconds."""
MAX_PREVIEW_ROWS = 100
HISTOGRAM_BINS = 20
CACHED_READS = 4
"""Data sets whose first `MAX_MEASURED` records a preview keeps in memory (the next preview of one is instant)."""
CACHED_TOKENIZERS = 4

SECTIONS: dict[str, tuple[str, ...]] = {
    "data": formats.KINDS,
    "sft_data": ("demonstration", "preference", "unpaired"),
    "prompt_data": formats.KINDS,
}
"""The config sections a job may fill from a data set, and the kinds each reads (`edgerlhf.data`): the data stage
reads any kind; SFT learns demonstrations, the preferred answers of pairs or the answers of feedback labelled good;
every kind has prompts."""
SECTION_FORMATS = {"data": formats.KINDS, "sft_data": ("demonstration",), "prompt_data": ("prompt",)}
"""The `format` each section accepts besides `auto` (`edgerlhf.config`): a data set of another kind is read with
`auto`, detected as it was when stored."""
ANSWERS = {"preference": ("chosen", "rejected"), "demonstration": ("completion",), "unpaired": ("completion",),
           "prompt": ()}
"""The answer fields of each kind's records (`edgerlhf.formats`), shown beside the prompt."""


class DatasetRefused(Exception):
    """A data set request refused with HTTP `status`; `loc` names the request field (a 422's location) it is about."""

    def __init__(self, status: int, message: str, loc: list[str | int] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.loc = loc


# --- names and mappings ------------------------------------------------------------------------------------


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_SUFFIXES = tuple(sorted((s + gz for s in formats.FILE_SUFFIXES for gz in (".gz", "")), key=len, reverse=True))


def file_name(uploaded: str | None) -> str:
    """The name an uploaded file is stored under: its last path part, with every run of other characters than
    letters, digits, `.`, `_`, `-` made one `_`, its type in lower case; 422 unless it is a data file's type."""
    base = re.split(r"[\\/]", uploaded or "")[-1]
    suffix = next((s for s in _SUFFIXES if base.lower().endswith(s)), None)
    stem = _UNSAFE.sub("_", base[:len(base) - len(suffix)] if suffix else base).lstrip("._-")
    if suffix is None or not stem:
        types = ", ".join(f"{s}[.gz]" for s in formats.FILE_SUFFIXES)
        raise DatasetRefused(422, f"{clean_text(base)[:200]!r} is not a data file: its name must end in one of "
                                  f"{types} (and have a name before that)", ["body", "file"])
    return stem[-(MAX_FILE_NAME - len(suffix)):] + suffix


def clean_text(text: str) -> str:
    """`text` with NUL written as `\\x00` (PostgreSQL stores no NUL in text)."""
    return text.replace("\x00", "\\x00")


def parse_columns(value: str | dict | None, loc: list[str | int]) -> dict[str, str] | None:
    """A column mapping (your column -> the format's), given as a JSON object or its text; None when empty."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise DatasetRefused(422, f"not JSON: {exc}", loc) from None
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise DatasetRefused(422, 'a column mapping is a JSON object of names, e.g. {"question": "prompt"}', loc)
    if len(value) > MAX_COLUMNS:
        raise DatasetRefused(422, f"at most {MAX_COLUMNS} columns may be mapped", loc)
    for old, new in value.items():
        for name in (old, new):
            if not name or len(name) > 200 or "\x00" in name or not _utf8(name):
                raise DatasetRefused(422, "every column name must be 1 to 200 characters of valid Unicode, "
                                          "without NUL", loc)
    return dict(value) or None


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, which JSON can spell
        return False
    return True


def _relative(text: str, directory: Path) -> str:
    """A message about a file of `directory` naming the file alone (`pairs.jsonl:12: column 'chosen' ...`)."""
    return clean_text(text.replace(str(directory) + os.sep, ""))


# --- the store -----------------------------------------------------------------------------------------------


@contextlib.contextmanager
def store_lock(settings: Settings) -> Iterator[None]:
    """The data set store's lock (one per data directory, across processes): inserts, deletes, and jobs named on
    data sets are made under it."""
    from filelock import FileLock, Timeout

    settings.datasets_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(settings.datasets_dir / ".lock"))
    try:
        lock.acquire(timeout=LOCK_TIMEOUT_S)
    except Timeout:
        raise DatasetRefused(503, "the data set store is busy (another upload or delete holds it); try again") \
            from None
    try:
        yield
    finally:
        lock.release()


def source_of(dataset: Dataset, data_dir: Path) -> str:
    """What a job's config names to read the data set: the stored file's absolute path, or the hub id."""
    return str(data_dir / dataset.path) if dataset.path else dataset.hub_id


@dataclass
class Incoming:
    """An upload received into its own directory under `datasets/.incoming/`, not yet checked."""

    directory: Path
    path: Path
    sha256: str
    size: int

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def too_large(settings: Settings) -> str:
    return (f"the file is larger than the upload limit of {settings.max_upload_bytes:,} bytes "
            f"({settings.max_upload_bytes / 2**20:g} MiB, EDGERLHF_MAX_UPLOAD_BYTES)")


def receive(source: BinaryIO, name: str, settings: Settings) -> Incoming:
    """Copy an upload into a fresh incoming directory, hashing and counting it: 413 (and nothing kept) past the
    upload limit, 422 when it is empty."""
    root = settings.datasets_dir / INCOMING
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale(root)
    directory = root / secrets.token_hex(8)
    directory.mkdir()
    incoming = Incoming(directory, directory / name, "", 0)
    digest = hashlib.sha256()
    try:
        with open(incoming.path, "wb") as out:
            while chunk := source.read(CHUNK_BYTES):
                incoming.size += len(chunk)
                if incoming.size > settings.max_upload_bytes:
                    raise DatasetRefused(413, too_large(settings), ["body", "file"])
                digest.update(chunk)
                out.write(chunk)
        if incoming.size == 0:
            raise DatasetRefused(422, f"{name}: the file is empty", ["body", "file"])
    except BaseException:
        incoming.discard()
        raise
    incoming.sha256 = digest.hexdigest()
    return incoming


def _remove_stale(root: Path) -> None:
    now = time.time()
    for entry in root.iterdir():
        try:
            if now - entry.stat().st_mtime > STALE_INCOMING_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            pass


def _same_reading(dataset: Dataset, fmt: str, columns: dict[str, str] | None) -> bool:
    return dataset.format == fmt and (dataset.columns or None) == (columns or None)


def _duplicate(dataset: Dataset, what: str) -> DatasetRefused:
    return DatasetRefused(409, f"{what} is data set #{dataset.id} ({dataset.name!r}) already, read with format "
                               f"{dataset.format!r} and columns {json.dumps(dataset.columns)}: one data set per "
                               "content. A job may read it with another format or columns (its overrides of the "
                               "section's `format` and `columns`), or delete it and add it again")


def stored_duplicate(session, incoming: Incoming, fmt: str, columns: dict[str, str] | None) -> Dataset | None:
    """The data set already stored with this content (the upload is then discarded), or None; 409 when it was
    stored to be read another way (another format or column mapping)."""
    existing = store.dataset_by_sha256(session, incoming.sha256)
    if existing is not None and not _same_reading(existing, fmt, columns):
        raise _duplicate(existing, "this file")
    return existing


def read_upload(incoming: Incoming, fmt: str, columns: dict[str, str] | None, skip_bad_rows: bool) -> formats.Records:
    """The upload read whole through `edgerlhf.formats` (its format detected); 422 naming the file, line and
    column of the first bad row (unless `skip_bad_rows`: then they are counted), or why it cannot be read."""
    try:
        return formats.read(str(incoming.path), kind=None if fmt == "auto" else fmt, columns=columns,
                            skip_bad_rows=skip_bad_rows, setting="the upload",
                            advice="upload it with skip_bad_rows to keep it without its bad rows")
    except formats.DataError as exc:
        raise DatasetRefused(422, _relative(str(exc), incoming.directory), ["body", "file"]) from None
    except Exception as exc:  # `datasets`, pyarrow ... on a file they cannot make sense of: the file's fault
        logger.warning(f"upload {incoming.path.name} unreadable: {type(exc).__name__}: {exc}")
        raise DatasetRefused(422, _relative(f"{incoming.path.name}: cannot be read: {type(exc).__name__}: {exc}",
                                            incoming.directory), ["body", "file"]) from None


def described(read: formats.Records, directory: Path | None = None) -> dict[str, Any]:
    """The columns of a `Dataset` row that say what `read` found."""
    examples = [_relative(e, directory) if directory else clean_text(e) for e in read.bad_row_examples]
    return {"kind": read.detected.kind, "conversational": read.detected.conversational,
            "reason": clean_text(read.detected.reason), "rows": read.rows, "records": len(read.records),
            "bad_rows": read.bad_rows, "bad_row_examples": examples or None}


def upload(session, settings: Settings, source: BinaryIO, uploaded_name: str | None, *, name: str | None, fmt: str,
           columns: dict[str, str] | None, skip_bad_rows: bool) -> tuple[Dataset, bool]:
    """Store an uploaded file as a data set (see the module docstring): (the data set, whether the same content was
    stored already: then that one, and nothing new is kept)."""
    stored_name = file_name(uploaded_name)
    incoming = receive(source, stored_name, settings)
    try:
        existing = stored_duplicate(session, incoming, fmt, columns)
        if existing is not None:
            return existing, True
        read = read_upload(incoming, fmt, columns, skip_bad_rows)
        return store_upload(session, settings, incoming, read, name=name or stored_name, fmt=fmt, columns=columns)
    finally:
        incoming.discard()  # a no-op once renamed into place


def store_upload(session, settings: Settings, incoming: Incoming, read: formats.Records, *, name: str, fmt: str,
                 columns: dict[str, str] | None) -> tuple[Dataset, bool]:
    """Move a checked upload into place and insert its row, under the store's lock: (the data set, whether the same
    content was stored already, by an upload that finished first). The incoming directory is gone after."""
    try:
        with store_lock(settings):
            existing = store.dataset_by_sha256(session, incoming.sha256)
            if existing is not None:
                if not _same_reading(existing, fmt, columns):
                    raise _duplicate(existing, "this file")
                return existing, True
            final = settings.datasets_dir / incoming.sha256
            if final.exists():  # without a row: left by a process that died between the rename and the insert
                shutil.rmtree(final)
            os.rename(incoming.directory, final)
            try:
                dataset = store.add_dataset(
                    session, name=name, format=fmt, columns=columns, sha256=incoming.sha256, size=incoming.size,
                    path=str((final / incoming.path.name).relative_to(settings.data_dir)),
                    **described(read, incoming.directory))
            except BaseException:
                session.rollback()
                shutil.rmtree(final, ignore_errors=True)
                raise
            return dataset, False
    finally:
        incoming.discard()  # a no-op once renamed


def register_hub(session, settings: Settings, *, hub_id: str, hub_name: str | None, data_dir: str | None,
                 split: str, fmt: str, columns: dict[str, str] | None, name: str | None,
                 skip_bad_rows: bool) -> tuple[Dataset, bool]:
    """Register a hub data set after reading it once (its format detected): (the data set, whether it was
    registered already). 422 naming `hub_id` when the hub cannot give it (offline, gated, not found) or its rows
    cannot be read as a data set."""
    existing = store.hub_dataset(session, hub_id, hub_name, data_dir, split)
    if existing is not None:
        if not _same_reading(existing, fmt, columns):
            raise _duplicate(existing, f"{hub_id} ({data_dir or ''}/{split})")
        return existing, True
    try:
        read = formats.read(hub_id, kind=None if fmt == "auto" else fmt, columns=columns, name=hub_name,
                            data_dir=data_dir, split=split, skip_bad_rows=skip_bad_rows, setting="hub_id",
                            advice="register it with skip_bad_rows to keep it without its bad rows")
    except formats.DataError as exc:
        if isinstance(exc.__cause__, locations.LocationError):
            raise DatasetRefused(422, f"cannot load the data set {exc.__cause__}. Download it where the hub is "
                                      "reachable and upload its files instead (POST /api/datasets)",
                                 ["body", "hub_id"]) from None
        raise DatasetRefused(422, clean_text(str(exc)), ["body", "hub_id"]) from None
    except Exception as exc:  # `datasets` on a split, subset or file it cannot read
        raise DatasetRefused(422, clean_text(f"{hub_id}: cannot be read: {type(exc).__name__}: {exc}"),
                             ["body", "hub_id"]) from None
    with store_lock(settings):
        existing = store.hub_dataset(session, hub_id, hub_name, data_dir, split)
        if existing is not None:
            return existing, True
        return store.add_dataset(session, name=name or hub_id, format=fmt, columns=columns, hub_id=hub_id,
                                 hub_name=hub_name, data_dir=data_dir, split=split, **described(read)), False


# --- who reads it, delete ----------------------------------------------------------------------------------


def reads(section: dict[str, Any], dataset: Dataset, data_dir: Path) -> bool:
    """Whether a job config's data section (`data`, `sft_data`, `prompt_data`) reads the data set: its file, a
    directory holding it, or the same hub coordinates."""
    source = section.get("source")
    if not isinstance(source, str) or not source:
        return False
    if dataset.hub_id is not None:
        return (source, section.get("name"), section.get("data_dir"), section.get("split", "train")) == \
            (dataset.hub_id, dataset.hub_name, dataset.data_dir, dataset.split)
    if not locations.is_local(source):
        return False
    try:
        named = Path(source).expanduser().resolve()
        stored = (data_dir / dataset.path).resolve()
    except (OSError, RuntimeError, ValueError):
        return False
    return stored == named or stored.is_relative_to(named)


def readers(dataset: Dataset, jobs: list[tuple[int, dict[str, Any]]], data_dir: Path) -> list[int]:
    """The ids of `jobs` ((id, config) each) a data section of which reads the data set."""
    return [job_id for job_id, config in jobs
            if any(reads(config.get(section) or {}, dataset, data_dir) for section in SECTIONS)]


def delete(session, settings: Settings, dataset: Dataset) -> None:
    """Delete the data set and its stored file; 409 while a queued or running job reads it."""
    with store_lock(settings):
        using = readers(dataset, store.active_job_configs(session), settings.data_dir)
        if using:
            raise DatasetRefused(409, f"data set #{dataset.id} is read by queued or running job(s) "
                                      f"{', '.join(f'#{i}' for i in using)}: delete it once they have finished")
        store.delete_dataset(session, dataset.id)
        if dataset.path:
            directory = (settings.data_dir / dataset.path).parent
            if directory.parent.resolve() == settings.datasets_dir.resolve():  # never anything but its own folder
                shutil.rmtree(directory, ignore_errors=True)
    _forget(dataset.id)


# --- jobs --------------------------------------------------------------------------------------------------------


def section_overrides(dataset: Dataset, section: str, data_dir: Path) -> dict[str, Any]:
    """The fields of config section `section` that make it read the data set."""
    fmt = dataset.format if dataset.format in SECTION_FORMATS[section] else "auto"
    fields = {"source": source_of(dataset, data_dir), "format": fmt, "columns": dataset.columns, "name": None,
              "data_dir": None, "split": "train"}
    if dataset.hub_id is not None:
        fields.update(name=dataset.hub_name, data_dir=dataset.data_dir, split=dataset.split or "train")
    return fields


def job_overrides(session, settings: Settings, refs: dict[str, int], overrides: dict[str, Any]) -> dict[str, Any]:
    """A job's overrides with the data sets `refs` (section -> id) as its sections' sources, the job's own fields
    of those sections on top. Raises `JobInvalid` naming `datasets.<section>` for a missing data set, one of a kind
    the section cannot read, or a section whose `source` the overrides set too."""
    from backend.api.validation import JobInvalid
    from edgerlhf.contract import merge_overrides

    base: dict[str, Any] = {}
    errors = []
    for section, dataset_id in refs.items():
        loc = ["body", "datasets", section]
        dataset = store.get_dataset(session, dataset_id)
        own = overrides.get(section) if isinstance(overrides.get(section), dict) else {}
        if dataset is None:
            errors.append({"loc": loc, "type": "dataset", "msg": f"no data set {dataset_id}"})
        elif dataset.kind not in SECTIONS[section]:
            errors.append({"loc": loc, "type": "dataset",
                           "msg": f"data set #{dataset.id} holds {dataset.kind} data; {section} reads "
                                  f"{', '.join(SECTIONS[section])}"})
        elif "source" in own:
            errors.append({"loc": loc, "type": "dataset",
                           "msg": f"{section}.source is set in the overrides too: name the data by one or the other"})
        elif section == "data" and dataset.kind != "preference" and own.get("labels") == "gold":
            errors.append({"loc": loc, "type": "dataset",
                           "msg": f"data.labels=gold relabels preference pairs; data set #{dataset.id} holds "
                                  f"{dataset.kind} data"})
        else:
            base[section] = section_overrides(dataset, section, settings.data_dir)
            if section == "data" and dataset.kind != "preference":
                base["data"]["labels"] = "human"  # a gold relabels pairs; a preset's gold labels do not apply
            if dataset.bad_rows and "skip_bad_lines" not in (overrides.get("data") or {}):
                base.setdefault("data", {})["skip_bad_lines"] = True  # it was stored without its bad rows
    if errors:
        raise JobInvalid(errors)
    return merge_overrides(base, overrides)


@contextlib.contextmanager
def reading(session, settings: Settings, refs: dict[str, int]) -> Iterator[None]:
    """Hold the store's lock while a job that reads the data sets `refs` is inserted, after checking they are still
    there (a delete between the job's checks and its insertion): `JobInvalid` if one is gone."""
    if not refs:
        yield
        return
    from backend.api.validation import JobInvalid

    with store_lock(settings):
        gone = [s for s, i in refs.items() if store.get_dataset(session, i) is None]
        if gone:
            raise JobInvalid([{"loc": ["body", "datasets", s], "type": "dataset", "msg": f"no data set {refs[s]}"}
                              for s in gone])
        yield


# --- preview -----------------------------------------------------------------------------------------------------


@dataclass
class Measured:
    """The first records of a data set as a preview reads them, and how its whole reading went."""

    records: list[dict[str, Any]]
    """The first `MAX_MEASURED` records."""
    total_records: int
    rows: int
    bad_rows: int
    bad_row_examples: list[str]


_reads: OrderedDict[tuple, Measured] = OrderedDict()
_tokenizers: OrderedDict[str, Any] = OrderedDict()
_cache_lock = threading.Lock()
_read_lock = threading.Lock()  # one data set read at a time: two previews of one large file read it once
_measure_lock = threading.Lock()  # a fast tokenizer is not to be called from two threads at once ("Already borrowed")


def _forget(dataset_id: int) -> None:
    with _cache_lock:
        for key in [k for k in _reads if k[0] == dataset_id]:
            del _reads[key]


def measured(dataset: Dataset, data_dir: Path) -> Measured:
    """The data set read again (its bad rows skipped and counted), cut to its first `MAX_MEASURED` records; kept
    for the next previews of it."""
    key = (dataset.id, dataset.sha256 or dataset.hub_id, dataset.format, json.dumps(dataset.columns, sort_keys=True))
    with _read_lock:
        with _cache_lock:
            if key in _reads:
                _reads.move_to_end(key)
                return _reads[key]
        source = source_of(dataset, data_dir)
        directory = Path(source).parent if dataset.path else None

        def shown(message: str) -> str:
            return _relative(message, directory) if directory else clean_text(message)

        try:
            read = formats.read(source, kind=None if dataset.format == "auto" else dataset.format,
                                columns=dataset.columns, name=dataset.hub_name, data_dir=dataset.data_dir,
                                split=dataset.split or "train", skip_bad_rows=True, setting="hub_id")
        except formats.DataError as exc:
            raise DatasetRefused(422, shown(str(exc))) from None
        except Exception as exc:  # a stored file changed under the service, a hub data set changed on the hub
            raise DatasetRefused(422, shown(f"{source}: cannot be read: {type(exc).__name__}: {exc}")) from None
        result = Measured(read.records[:MAX_MEASURED], len(read.records), read.rows, read.bad_rows,
                          [shown(e) for e in read.bad_row_examples])
        with _cache_lock:
            _reads[key] = result
            while len(_reads) > CACHED_READS:
                _reads.popitem(last=False)
        return result


def prompt_format(model: str, roots: list[Path]):
    """The `PromptFormat` of `model`'s tokenizer (a hub id or a local directory under `roots`); 422 for a path
    outside them, no tokenizer there, or a hub id the hub cannot give (offline, gated, missing)."""
    from edgerlhf.dialogue import PromptFormat
    from edgerlhf.errors import ModelLoadError

    problem = locations.check_location(model, roots)
    if problem:
        raise DatasetRefused(422, f"model: {problem}", ["query", "model"])
    with _cache_lock:
        if model in _tokenizers:
            _tokenizers.move_to_end(model)
            return _tokenizers[model]
    from edgerlhf.models import load_tokenizer

    try:
        fmt = PromptFormat.of(load_tokenizer(model))
    except ModelLoadError as exc:
        raise DatasetRefused(422, clean_text(str(exc)), ["query", "model"]) from None
    except Exception as exc:  # a directory whose files no tokenizer class reads
        raise DatasetRefused(422, clean_text(f"cannot load a tokenizer from {model!r}: {type(exc).__name__}: {exc}"),
                             ["query", "model"]) from None
    with _cache_lock:
        _tokenizers[model] = fmt
        while len(_tokenizers) > CACHED_TOKENIZERS:
            _tokenizers.popitem(last=False)
    return fmt


def histogram(values: list[int], bins: int = HISTOGRAM_BINS) -> dict[str, Any]:
    """Counts of `values` in `bins` equal integer-width bins from 0 (`edges` has one more entry than `counts`), and
    their mean, median, 95th percentile and maximum."""
    if not values:
        return {"edges": [0, 1], "counts": [0], "mean": None, "p50": None, "p95": None, "max": None}
    top = max(values)
    width = max(1, -(-(top + 1) // bins))
    counts = [0] * (top // width + 1)
    for v in values:
        counts[v // width] += 1
    ordered = sorted(values)
    return {"edges": [i * width for i in range(len(counts) + 1)], "counts": counts,
            "mean": sum(values) / len(values), "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": top}


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)


def preview(dataset: Dataset, settings: Settings, model: str, limit: int, max_prompt_tokens: int,
            max_response_tokens: int) -> dict[str, Any]:
    """What `DatasetPreview` serves (see the module docstring)."""
    from edgerlhf import data
    from edgerlhf.config import DataConfig
    from edgerlhf.dialogue import DialogueError

    fmt = prompt_format(model, [*settings.allowed_roots, settings.data_dir])
    read = measured(dataset, settings.data_dir)
    tokenizer, records = fmt.tokenizer, read.records
    roles = ANSWERS[dataset.kind]
    budgets = DataConfig(source="preview", max_prompt_tokens=max_prompt_tokens, max_response_tokens=max_response_tokens)
    with _measure_lock:
        prompt_len = data.n_tokens(tokenizer, [r["prompt"] for r in records])
        answer_len = {role: data.n_tokens(tokenizer, [" " + r[role] for r in records]) for role in roles}
        if dataset.kind == "preference":
            kept, dropped, _ = data.clean_pairs(records, budgets, tokenizer)
        else:
            kept, dropped = data.clean_records(records, budgets, tokenizer)

    def shown(render, text: str) -> str:
        try:
            return render(text)
        except DialogueError:  # what the template cannot render is shown as stored
            return text

    rows = []
    for i, r in enumerate(records[:limit]):  # rendering only (templates, no tokenizing)
        extra = {k: _jsonable(v) for k, v in r.items() if k not in ("prompt", "label", "mismatch", *roles)}
        rows.append({"prompt": shown(fmt.prompt, r["prompt"]), "prompt_tokens": prompt_len[i],
                     "answers": [{"role": role, "text": shown(fmt.answer, r[role]), "tokens": answer_len[role][i]}
                                 for role in roles],
                     "label": r.get("label"), "extra": extra})
    problems = list(read.bad_row_examples)
    if read.bad_rows > len(problems):
        problems.append(f"... and {read.bad_rows - len(problems)} more bad row(s)")
    return {"dataset_id": dataset.id, "model": model, "chat_template": fmt.chat_template, "kind": dataset.kind,
            "conversational": dataset.conversational, "reason": dataset.reason, "rows": read.rows,
            "records": read.total_records, "bad_rows": read.bad_rows, "measured": len(records),
            "max_prompt_tokens": max_prompt_tokens, "max_response_tokens": max_response_tokens,
            "prompt_tokens": histogram(prompt_len),
            "answer_tokens": histogram([n for lengths in answer_len.values() for n in lengths]) if roles else None,
            "dropped": {k: v for k, v in sorted(dropped.items()) if v}, "kept": len(kept), "rows_shown": rows,
            "problems": problems}
