"""Data formats: any preference, demonstration, prompt or feedback set, from a file or the hub, as pipeline records.

The formats are the ecosystem's (TRL's trainers and the hub's data sets), each *standard* (plain text) or
*conversational* (lists of `{"role", "content"}` messages):

    kind            columns                                   records the pipeline stores
    preference      prompt, chosen, rejected  (explicit)      {"prompt", "chosen", "rejected"}
                    chosen, rejected          (implicit: the shared beginning is the prompt; HH's raw dialogues too)
    demonstration   prompt, completion | messages | text      {"prompt", "completion"}, one per assistant turn
    prompt          prompt (+ any other columns, kept)        {"prompt", ...the other columns}
    unpaired        prompt, completion, label (true/false)    {"prompt", "completion", "label"}

Files are `.jsonl`, `.json`, `.csv` or `.parquet` (`.gz` too), a directory of them, or a hub id (with its subset
`name`, `data_dir` and `split`), all read through `datasets`. A column mapping (`{"question": "prompt"}`) renames
columns first. `detect` names the format it found and why, and refuses data whose columns fit no format, or
more than one, naming the columns it saw.

Records speak the pipeline's one dialogue format (`edgerlhf.dialogue`): a prompt is an HH dialogue ending with
`"\\n\\nAssistant:"` (a plain-text prompt becomes one human turn, messages are rendered by `render_chat`), an
answer is the text of the assistant turn that follows. Every stage then shows it to a model through that
model's `PromptFormat` (its chat template, if it has one). A multi-turn conversation gives one demonstration per
assistant turn, each with the turns before it as its prompt: the SFT loss covers every assistant turn and
nothing else.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgerlhf import locations
from edgerlhf.dialogue import ASSISTANT, HUMAN, DialogueError, normalize_prompt, render_chat, split_dialogue
from edgerlhf.errors import StageError

KINDS = ("preference", "demonstration", "prompt", "unpaired")
"""What a data set holds; `detect` finds it from the columns, a config may name it (`format`)."""
SIGNATURES: dict[str, tuple[frozenset[str], ...]] = {
    "preference": (frozenset({"prompt", "chosen", "rejected"}), frozenset({"chosen", "rejected"})),
    "unpaired": (frozenset({"prompt", "completion", "label"}),),
    "demonstration": (frozenset({"prompt", "completion"}), frozenset({"messages"}), frozenset({"text"})),
    "prompt": (frozenset({"prompt"}),),
}
"""The columns of each kind, most specific first. A data set is of the kind whose signature its columns hold."""
ROLE_COLUMNS = frozenset().union(*(s for sigs in SIGNATURES.values() for s in sigs))
"""Columns that mean something to a format; any other column is kept as an extra (a prompt's reference answer)."""
FILE_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
"""File name endings `datasets` reads, by its builder name (each also compressed with `.gz`)."""
MAX_EXAMPLES = 5


class DataError(StageError, ValueError):
    """The input data cannot be read; the message names the file, the row and the column when it is about one."""


@dataclass(frozen=True)
class Detected:
    """The format of a data set: its kind, whether it is conversational, the columns it reads and why."""

    kind: str
    conversational: bool
    columns: tuple[str, ...]
    reason: str
    extra: tuple[str, ...] = ()
    """The other columns (kept on prompt records)."""


@dataclass
class Records:
    """A data set read as records of one kind, and how the reading went."""

    detected: Detected
    records: list[dict[str, Any]]
    rows: int
    """Rows read (a multi-turn demonstration may give several records)."""
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)


# --- reading ---------------------------------------------------------------------------------------


def data_files(source: str | Path) -> list[Path]:
    """The files `datasets` can read in a source file or directory (recursively, sorted)."""
    path = Path(source).expanduser()
    if path.is_file():
        if _builder(path) is None:
            raise DataError(f"{path}: not a data file; expected one of {_suffix_list()}")
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _builder(p) is not None)
        if not files:
            raise DataError(f"{path}: the directory holds no data files ({_suffix_list()})")
        return files
    raise DataError(f"{source}: no such file or directory")


def _builder(path: Path) -> str | None:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return next((b for suffix, b in FILE_SUFFIXES.items() if name.endswith(suffix)), None)


def _suffix_list() -> str:
    return ", ".join(f"{s}[.gz]" for s in FILE_SUFFIXES)


def read_rows(source: str, *, name: str | None = None, data_dir: str | None = None, split: str = "train",
              setting: str = "the source") -> tuple[list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """Every row of a local file or directory, or of a hub data set, as (where "file:row", row), and what was read.

    Local files go through `datasets`' builder of their type, one file at a time so a bad row is named by its
    file; JSON Lines are read line by line instead, so a malformed line is an error of that line (`datasets`
    would reject the whole file). A hub id is downloaded (never looked up on disk, `edgerlhf.locations`) and
    read with `datasets.load_dataset(snapshot, name, data_dir=..., split=...)`; offline it fails at once, advising
    to point `setting` (the config field) at local files.
    """
    if locations.is_local(source):
        files = data_files(source)
        rows: list[tuple[str, dict[str, Any]]] = []
        for path in files:
            rows += _file_rows(path)
        return rows, {"kind": "local", "files": [str(f) for f in files]}
    try:
        snapshot = locations.hub_snapshot(source, repo_type="dataset",
                                          allow_patterns=[f"{data_dir}/*"] if data_dir else None)
    except locations.LocationError as exc:
        raise DataError(f"cannot load the data set {exc} (data_dir={data_dir!r}). Point {setting} at an absolute "
                        f"local file or directory instead (.jsonl, .json, .csv or .parquet, each also .gz), e.g. "
                        f"--set {setting}=/path/to/pairs.jsonl") from exc
    import datasets

    section = setting.rsplit(".", 1)[0]
    if data_dir and not (snapshot / data_dir).is_dir():
        raise DataError(f"{source} has no subset {data_dir!r} on the hub (no file under {data_dir}/); "
                        f"check {section}.data_dir")
    try:
        table = datasets.load_dataset(str(snapshot), name, data_dir=data_dir, split=split)
    except Exception as exc:  # datasets' own errors, an unknown split's ValueError ...: what the user named is wrong
        raise DataError(f"{source} (name={name!r}, data_dir={data_dir!r}, split={split!r}) cannot be read: {exc}; "
                        f"check {section}.name, .data_dir and .split") from exc
    where = f"{source}:{data_dir or ''}/{split}"
    return ([(f"{where}:{i}", row) for i, row in enumerate(table, start=1)],
            {"kind": "hub", "dataset": source, "name": name, "data_dir": data_dir, "split": split})


def _file_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    builder = _builder(path)
    if builder == "json" and path.name.removesuffix(".gz").endswith(".jsonl"):
        opener = gzip.open if path.name.endswith(".gz") else open
        out = []
        with opener(path, "rt", encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    row = DataError(f"invalid JSON ({exc.msg} at column {exc.colno})")
                if not isinstance(row, (dict, Exception)):
                    row = DataError(f"expected a JSON object, got {type(row).__name__}")
                out.append((f"{path}:{lineno}", row))
        return out
    import datasets

    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:  # datasets raises its own errors, pyarrow's, json's ...: the file is unreadable
        raise DataError(f"{path}: cannot read it as {builder}: {exc}") from exc
    # Row numbers of a CSV count its header as line 1, so row i is line i + 1 (what an editor shows).
    offset = 1 if builder == "csv" else 0
    return [(f"{path}:{i + offset}", row) for i, row in enumerate(table, start=1)]


# --- which format --------------------------------------------------------------------------------


def rename(row: dict[str, Any], columns: dict[str, str] | None) -> dict[str, Any]:
    """`row` with its columns renamed by the mapping `columns` (source name -> format name)."""
    if not columns:
        return row
    return {columns.get(k, k): v for k, v in row.items()}


def detect(column_names, sample: list[dict[str, Any]], kind: str | None = None) -> Detected:
    """The format of rows with `column_names` (after renaming), judged on their first rows `sample`.

    With `kind` (a config's `format`), only that kind's signatures are tried: a preference file can serve as a
    prompt set. Refuses, naming the columns, data that fits no signature or two kinds at once.
    """
    names = set(column_names)
    roles = names & ROLE_COLUMNS
    kinds = [kind] if kind else list(SIGNATURES)
    fits = [(k, sig) for k in kinds for sig in SIGNATURES[k] if sig <= names]
    if not fits:
        wanted = "; ".join(f"{k}: " + " or ".join("/".join(sorted(s)) for s in SIGNATURES[k]) for k in kinds)
        raise DataError(f"columns {sorted(names)} fit no {'format' if kind is None else kind + ' format'} "
                          f"({wanted}); map yours with a column mapping, e.g. {{\"question\": \"prompt\"}}")
    if kind is None:
        # The most specific signature of each kind; a kind whose signature is part of another's is not a rival
        # (prompt/chosen/rejected holds `prompt`: a preference set, not a prompt set with extra columns).
        best = {}
        for k, sig in fits:
            best.setdefault(k, sig)
        rivals = [k for k, sig in best.items() if not any(sig < other for other in best.values())]
        if len(rivals) > 1:
            raise DataError(f"columns {sorted(names)} are ambiguous: they fit "
                              + " and ".join(f"{k} ({'/'.join(sorted(best[k]))})" for k in rivals)
                              + "; name the format (format=...) or map the columns you mean")
        kind = rivals[0]
        leftover = roles - best[kind] - {"prompt"}
        if leftover and kind != "preference":
            raise DataError(f"columns {sorted(names)} are ambiguous: {kind} reads {sorted(best[kind])} but "
                              f"{sorted(leftover)} belong to another format; name the format or drop them")
    signature = next(sig for k, sig in fits if k == kind)
    conversational = any(isinstance(row.get(c), list) for row in sample for c in signature)
    reason = f"columns {'/'.join(sorted(signature))}" + (" with message lists" if conversational else " as text")
    if kind == "preference" and "prompt" not in signature:
        raw = all(isinstance(r.get("chosen"), str) and _is_dialogue(r["chosen"]) for r in sample)
        reason += ", the prompt being their shared beginning" + (" (HH-RLHF dialogues)" if raw else "")
    extra = tuple(sorted(names - signature)) if kind == "prompt" else ()
    return Detected(kind, conversational, tuple(sorted(signature)), reason, extra)


def _is_dialogue(text: str) -> bool:
    return text.lstrip().startswith(HUMAN.strip()) and ASSISTANT in "\n\n" + text.lstrip()


# --- rows -> records ------------------------------------------------------------------------------


def to_records(row: dict[str, Any], detected: Detected) -> list[dict[str, Any]]:
    """One row (renamed) as the pipeline's records of its kind; raises `DataError` naming the column."""
    kind = detected.kind
    if kind == "preference":
        return [_preference(row, detected)]
    if kind == "demonstration":
        return _demonstrations(row, detected)
    if kind == "unpaired":
        return [{"prompt": _prompt(row["prompt"], "prompt"), "completion": _answer(row["completion"], "completion"),
                 "label": _label(row["label"])}]
    return [{**{c: row[c] for c in detected.extra}, "prompt": _prompt(row["prompt"], "prompt")}]


def _prompt(value: Any, column: str) -> str:
    """A prompt column as an HH prompt: an HH dialogue as is, plain text as one human turn, messages rendered."""
    try:
        if isinstance(value, list):
            return render_chat(_messages(value, column))
        if not isinstance(value, str):
            raise DataError(f"column {column!r}: expected text or a list of messages, got {type(value).__name__}")
        if _is_dialogue(value) or value.lstrip().startswith(HUMAN.strip()):
            return normalize_prompt(value)
        if not value.strip():
            raise DataError(f"column {column!r} is empty")
        return render_chat([{"role": "user", "content": value}])
    except DialogueError as exc:
        raise DataError(f"column {column!r}: {exc}") from None


def _answer(value: Any, column: str) -> str:
    """An answer column as text: a string, or the content of its (last) assistant message."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, list):
        messages = _messages(value, column)
        if not messages or messages[-1]["role"] != "assistant":
            raise DataError(f"column {column!r}: the last message must be the assistant's answer")
        return messages[-1]["content"].strip()
    raise DataError(f"column {column!r}: expected text or a list of messages, got {type(value).__name__}")


def _messages(value: list, column: str) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"column {column!r}: message {i} is not a {{\"role\", \"content\"}} object of strings")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _label(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
        return value.strip().lower() in ("true", "1", "yes")
    raise DataError(f"column 'label': expected true or false, got {value!r}")


def _preference(row: dict[str, Any], detected: Detected) -> dict[str, Any]:
    # Explicit or implicit prompt row by row: HH-RLHF's raw and processed lines may be mixed in one source.
    chosen, rejected = row["chosen"], row["rejected"]
    if row.get("prompt") is not None:
        return {"prompt": _prompt(row["prompt"], "prompt"), "chosen": _answer(chosen, "chosen"),
                "rejected": _answer(rejected, "rejected")}
    if isinstance(chosen, list) and isinstance(rejected, list):  # implicit, conversational: all but the last turn
        c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
        pair = {"prompt": _prompt(c[:-1], "chosen") if len(c) > 1 else "", "chosen": _answer(c, "chosen"),
                "rejected": _answer(r, "rejected")}
        if c[:-1] != r[:-1]:
            pair["mismatch"] = True
        if not pair["prompt"]:
            raise DataError("column 'chosen': a conversation needs a user turn before the answer")
        return pair
    if isinstance(chosen, str) and isinstance(rejected, str):
        try:
            prompt, chosen_text = split_dialogue(chosen)
            prompt_r, rejected_text = split_dialogue(rejected)
        except DialogueError as exc:
            raise DataError(f"not an HH dialogue: {exc} (columns chosen/rejected without a prompt column must be "
                            f"HH-RLHF dialogues, '\\n\\nHuman: ... \\n\\nAssistant: ...')") from None
        pair = {"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text}
        if prompt_r != prompt:
            pair["mismatch"] = True
        return pair
    raise DataError("columns chosen/rejected: both must be text or both lists of messages")


def _demonstrations(row: dict[str, Any], detected: Detected) -> list[dict[str, Any]]:
    if "messages" in detected.columns:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise DataError(f"column 'messages': expected a list of messages, got {type(messages).__name__}")
        messages = _messages(messages, "messages")
    elif "text" in detected.columns:
        text = row["text"]
        if not (isinstance(text, str) and _is_dialogue(text)):
            raise DataError("column 'text': a demonstration's text must be a dialogue ('\\n\\nHuman: ... "
                              "\\n\\nAssistant: ...'); plain text has no answer to learn: use prompt/completion")
        return _dialogue_turns(text)
    else:
        return [{"prompt": _prompt(row["prompt"], "prompt"), "completion": _answer(row["completion"], "completion")}]
    records = []
    for k, m in enumerate(messages):
        if m["role"] == "assistant" and any(p["role"] == "user" for p in messages[:k]):
            records.append({"prompt": _prompt(messages[:k], "messages"), "completion": m["content"].strip()})
    if not records:
        raise DataError("column 'messages': no assistant turn after a user turn")
    return records


def _dialogue_turns(text: str) -> list[dict[str, str]]:
    """Every assistant turn of an HH dialogue as a demonstration, with the turns before it as its prompt."""
    body = "\n\n" + text.lstrip()
    records, start = [], 0
    while (cut := body.find(ASSISTANT, start)) >= 0:
        nxt = [i for i in (body.find(HUMAN, cut + 1), body.find(ASSISTANT, cut + 1)) if i >= 0]
        end = min(nxt) if nxt else len(body)
        prompt = body[:cut + len(ASSISTANT)]
        answer = body[cut + len(ASSISTANT):end].strip()
        if HUMAN in prompt and answer:
            records.append({"prompt": normalize_prompt(prompt), "completion": answer})
        start = cut + len(ASSISTANT)
    return records


# --- the whole data set ------------------------------------------------------------------------------


def read(source: str, *, kind: str | None = None, columns: dict[str, str] | None = None, name: str | None = None,
         data_dir: str | None = None, split: str = "train", skip_bad_rows: bool = False, limit: int | None = None,
         setting: str = "the source", advice: str = "") -> Records:
    """A data set as records: read its rows, rename its columns, detect its format (or check `kind`), convert.

    The format is detected on the first readable rows. A row that cannot be converted (a missing column, a value
    of the wrong type) raises `DataError` naming the file, the row and the column, unless `skip_bad_rows`: then
    it is counted and a few are kept as examples (`advice`, e.g. how to skip them, ends the error of a row).
    `limit` reads only that many rows (a preview); `setting` is the config field named in the advice when a hub
    id cannot be reached.
    """
    rows, info = read_rows(source, name=name, data_dir=data_dir, split=split, setting=setting)
    if limit is not None:
        rows = rows[:limit]
    sample = [rename(row, columns) for _, row in rows if not isinstance(row, Exception)][:50]
    if not sample:
        first_bad = next((f"{where}: {row}" for where, row in rows if isinstance(row, Exception)), None)
        raise DataError(f"{source}: no readable rows" + (f" ({first_bad})" if first_bad else ""))
    detected = detect(sample[0], sample, kind)
    records, bad, examples = [], 0, []
    for where, row in rows:
        try:
            if isinstance(row, Exception):
                raise row
            row = rename(row, columns)
            for column in detected.columns:
                if column not in row and not (detected.kind == "preference" and column == "prompt"):
                    raise DataError(f"column {column!r} is missing")
            records += to_records(row, detected)
        except DataError as exc:
            if not skip_bad_rows:
                raise DataError(f"{where}: {exc}" + (f" ({advice})" if advice else "")) from None
            bad += 1
            if len(examples) < MAX_EXAMPLES:
                examples.append(f"{where}: {exc}")
    return Records(detected, records, len(rows), bad, examples, info)


# --- a look at a data set, as a model will see it ---------------------------------------------------


def preview(read: Records, tokenizer=None, rows: int = 5, max_prompt_tokens: int | None = None,
            max_response_tokens: int | None = None) -> dict[str, Any]:
    """What `edgerlhf data` shows of a data set read: its format and counts, the first `rows` records as the
    model of `tokenizer` sees them (its `PromptFormat`: the prompt and the answer apart), and with a tokenizer
    the token lengths of prompts and answers and how many records the given budgets would drop."""
    out: dict[str, Any] = {"format": read.detected.kind, "conversational": read.detected.conversational,
                           "detected": read.detected.reason, "rows": read.rows, "records": len(read.records),
                           "bad_rows": read.bad_rows, "bad_row_examples": read.bad_row_examples}
    answers = [a for a in ("chosen", "rejected", "completion") if read.records and a in read.records[0]]
    fmt = None
    if tokenizer is not None:
        from edgerlhf.dialogue import PromptFormat

        fmt = PromptFormat.of(tokenizer)
    out["examples"] = [{"prompt": fmt.prompt(r["prompt"]) if fmt else r["prompt"],
                        **{a: fmt.answer(r[a]) if fmt else r[a] for a in answers},
                        **{k: v for k, v in r.items() if k not in ("prompt", "mismatch", *answers)}}
                       for r in read.records[:rows]]
    if tokenizer is not None and read.records:
        def lengths(texts: list[str]) -> list[int]:
            return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

        prompt_len = lengths([r["prompt"] for r in read.records])
        answer_len = [max(column) for column in zip(*(lengths([" " + r[a] for r in read.records]) for a in answers))] \
            if answers else [0] * len(prompt_len)
        out["prompt_tokens"], out["answer_tokens"] = _percentiles(prompt_len), _percentiles(answer_len)
        out["dropped_by_budget"] = sum(
            (max_prompt_tokens is not None and p > max_prompt_tokens)
            or (max_response_tokens is not None and a > max_response_tokens) for p, a in zip(prompt_len, answer_len))
    return out


def _percentiles(values: list[int]) -> dict[str, int]:
    ordered = sorted(values)
    return {f"p{q}": ordered[min(len(ordered) - 1, len(ordered) * q // 100)] for q in (50, 90, 99)} | \
        {"max": ordered[-1]}


def main(argv: list[str] | None = None) -> int:
    """`edgerlhf data SOURCE`: read a data set as a job would, and show what was found."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="edgerlhf data", description=main.__doc__.split(": ", 1)[1])
    parser.add_argument("source", help="an absolute path (file or directory) or a hub id")
    parser.add_argument("--format", choices=["auto", *KINDS], default="auto", help="what it holds (default: detect)")
    parser.add_argument("--columns", type=json.loads, help='column mapping as JSON, e.g. \'{"question": "prompt"}\'')
    parser.add_argument("--name", help="hub data set configuration")
    parser.add_argument("--data-dir", help="hub data set subset folder")
    parser.add_argument("--split", default="train", help="hub split (default: train)")
    parser.add_argument("--model", help="render the examples and count tokens with this model's tokenizer "
                                        "(hub id or local directory)")
    parser.add_argument("--rows", type=int, default=3, help="examples to show (default: 3)")
    parser.add_argument("--max-prompt-tokens", type=int, help="count the records a prompt budget would drop")
    parser.add_argument("--max-response-tokens", type=int, help="count the records an answer budget would drop")
    parser.add_argument("--skip-bad-rows", action="store_true", help="count and skip unreadable rows")
    parser.add_argument("--json", action="store_true", help="print the preview as JSON")
    args = parser.parse_args(argv)
    try:
        read_set = read(args.source, kind=None if args.format == "auto" else args.format, columns=args.columns,
                        name=args.name, data_dir=args.data_dir, split=args.split, skip_bad_rows=args.skip_bad_rows,
                        advice="--skip-bad-rows skips bad rows")
        tokenizer = None
        if args.model:
            from edgerlhf.models import load_tokenizer

            tokenizer = load_tokenizer(args.model)
    except StageError as exc:
        print(f"edgerlhf data: {exc}", file=sys.stderr)
        return 2
    shown = preview(read_set, tokenizer, args.rows, args.max_prompt_tokens, args.max_response_tokens)
    if args.json:
        print(json.dumps(shown, indent=2, ensure_ascii=False))
        return 0
    print(f"{args.source}: {shown['format']} data ({shown['detected']}); {shown['rows']} rows -> "
          f"{shown['records']} records, {shown['bad_rows']} bad")
    for example in shown["bad_row_examples"]:
        print(f"  bad row: {example}")
    if "prompt_tokens" in shown:
        print(f"prompt tokens {shown['prompt_tokens']}, answer tokens {shown['answer_tokens']}; "
              f"{shown['dropped_by_budget']} records over the given budgets")
    for i, example in enumerate(shown["examples"], start=1):
        print(f"--- example {i}")
        for key, value in example.items():
            print(f"[{key}]\n{value}")
    return 0
