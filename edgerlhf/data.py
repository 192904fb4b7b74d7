"""Stage 1, data: HH-RLHF preference pairs -> cleaned, deduplicated, split prompt/chosen/rejected files.

Sources (`data.source`):
  (a) a hub id, `Anthropic/hh-rlhf` with `data.data_dir` (harmless-base, helpful-base, ...) and
      `data.split`, downloaded (never looked up on disk, see `edgerlhf.locations`) and read through
      `datasets.load_dataset` (Bai et al. 2022). Offline, this fails at once and says how to point
      `data.source` at local files instead;
  (b) an absolute path to a local `.jsonl` / `.jsonl.gz` file, or a directory of them (read recursively, in name order), in
      Anthropic's raw format: each line `{"chosen": full dialogue, "rejected": full dialogue}`;
  (c) the same, in processed form: `{"prompt", "chosen", "rejected"}` (prompts are normalised to the
      canonical `"\\n\\nHuman: ...\\n\\nAssistant:"`). Raw and processed lines may be mixed.

Cleaning, in this order, each drop counted by reason in the report: empty response, identical
responses, prompt/response split mismatch (raw pairs whose dialogues differ before the last reply),
duplicate pair (same prompt and the same two responses, in either order), prompt longer than
`max_prompt_tokens`, a response longer than `max_response_tokens`, and with `labels = "gold"` a gold tie.
With `labels = "gold"` each pair is relabelled by the gold scorer (`edgerlhf.gold`): chosen is the
response the gold prefers; for a gold about content the labelled pairs are then balanced by length
(`balance_by_length`, the excess counted as `length_balance`). The kept pairs are shuffled with `seed`,
capped at `max_pairs`, and split by prompt: the prompts that come first take about `test_fraction` of
the pairs to the test split, and every pair of a prompt goes to the same side, so the split depends only
on the data and the seed and no prompt is on both sides. Only then, on the training side, gold data
gets for a `gold_empty_fraction` share of its pairs an extra pair (the worse response vs the empty one),
so the reward model also learns the gold's verdict on empty answers. The report gives every gold's
correlation with the responses' length.

A malformed line (not JSON, not an object, missing fields, no dialogue) raises `DataError` naming the
file and line, unless `skip_bad_lines` is set: then it is skipped and counted.

With `data.votes_file`, arena votes join last, after the split (`edgerlhf.votes.mix`; never relabelled).

Writes `data/train_prefs.jsonl`, `data/test_prefs.jsonl` and returns the report (`data/report.json`).
"""

from __future__ import annotations

import bisect
import gzip
import json
import random
import statistics
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgerlhf import gold, locations, votes
from edgerlhf.config import DataConfig, PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import TEST_PREFS, TRAIN_PREFS
from edgerlhf.dialogue import DialogueError, normalize_prompt, split_dialogue
from edgerlhf.errors import StageError, require
from edgerlhf.models import load_tokenizer
from edgerlhf.reports import DataReport, DataSource

HUB_DATASET = "Anthropic/hh-rlhf"
MAX_BAD_LINE_EXAMPLES = 5


class DataError(StageError, ValueError):
    """The input data cannot be read; the message names the file and line when it is about one line."""


# --- reading ---------------------------------------------------------------------------------------

def local_files(source: str | Path) -> list[Path]:
    """The `.jsonl` / `.jsonl.gz` files of a source file or directory (recursively, sorted)."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith((".jsonl", ".jsonl.gz")))
        if not files:
            raise DataError(f"{path}: the directory holds no .jsonl or .jsonl.gz files")
        return files
    raise DataError(f"{source}: no such file or directory")


def _open(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return path.open("r", encoding="utf-8")


def parse_record(record: Any) -> dict[str, str]:
    """One input record (raw or processed) -> {"prompt", "chosen", "rejected"}; raises DataError if malformed.

    A raw pair whose two dialogues do not share a prompt gets `"mismatch": True` (a drop, not an error).
    """
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    for key in ("chosen", "rejected"):
        if not isinstance(record.get(key), str):
            raise DataError(f"field {key!r} is missing or not a string")
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise DataError("field 'prompt' is not a string")
        try:
            prompt = normalize_prompt(record["prompt"])
        except DialogueError as exc:
            raise DataError(f"bad prompt: {exc}") from exc
        return {"prompt": prompt, "chosen": record["chosen"].strip(), "rejected": record["rejected"].strip()}
    try:
        prompt, chosen = split_dialogue(record["chosen"])
        prompt_r, rejected = split_dialogue(record["rejected"])
    except DialogueError as exc:
        raise DataError(f"not an HH dialogue: {exc}") from exc
    pair = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if prompt_r != prompt:
        pair["mismatch"] = True
    return pair


def _records_from_files(files: list[Path]) -> Iterator[tuple[str, Any]]:
    """(location "file:line", record or the exception that made the line unreadable)."""
    for path in files:
        with _open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{lineno}", json.loads(line)
                except json.JSONDecodeError as exc:
                    yield f"{path}:{lineno}", DataError(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _records_from_hub(cfg: DataConfig) -> Iterator[tuple[str, Any]]:
    """Rows of a hub data set, read from its snapshot (the hub id is never looked up on disk)."""
    try:
        snapshot = locations.hub_snapshot(cfg.source, repo_type="dataset",
                                          allow_patterns=[f"{cfg.data_dir}/*"] if cfg.data_dir else None)
    except locations.LocationError as exc:
        raise DataError(
            f"cannot load the data set {exc} (data_dir={cfg.data_dir!r}). Point data.source at an absolute local "
            f"file or directory instead, e.g. --set data.source=/path/to/hh-rlhf/harmless-base/train.jsonl.gz "
            f"(raw HH-RLHF) or a .jsonl of prompt/chosen/rejected rows.") from exc
    import datasets

    rows = datasets.load_dataset(str(snapshot), data_dir=cfg.data_dir, split=cfg.split)
    where = f"{cfg.source}:{cfg.data_dir or ''}/{cfg.split}"
    for i, row in enumerate(rows, start=1):
        yield f"{where}:{i}", row


def read_pairs(cfg: DataConfig) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """All well-formed pairs of the source, and reading statistics (files, lines, bad lines)."""
    if locations.is_local(cfg.source):
        files = local_files(cfg.source)
        records = _records_from_files(files)
        info: dict[str, Any] = {"kind": "local", "files": [str(f) for f in files]}
    else:
        records = _records_from_hub(cfg)
        info = {"kind": "hub", "dataset": cfg.source, "data_dir": cfg.data_dir, "split": cfg.split}
    pairs, bad, examples = [], 0, []
    for where, record in records:
        try:
            if isinstance(record, Exception):
                raise record
            pairs.append(parse_record(record))
        except DataError as exc:
            if not cfg.skip_bad_lines:
                raise DataError(f"{where}: {exc} (set data.skip_bad_lines=true to skip bad lines)") from None
            bad += 1
            if len(examples) < MAX_BAD_LINE_EXAMPLES:
                examples.append(f"{where}: {exc}")
    info.update(records=len(pairs) + bad, bad_lines=bad, bad_line_examples=examples)
    return pairs, info


# --- cleaning --------------------------------------------------------------------------------------

def clean_pairs(pairs: list[dict[str, str]], cfg: DataConfig, tokenizer) -> tuple[list[dict[str, str]], Counter, dict]:
    """Drop unusable pairs (counted by reason), relabel by the gold scorer if asked; keeps input order."""
    dropped: Counter = Counter()
    kept, seen = [], set()
    for pair in pairs:
        if pair.get("mismatch"):
            dropped["prompt_mismatch"] += 1
        elif not pair["chosen"] or not pair["rejected"]:
            dropped["empty_response"] += 1
        elif pair["chosen"] == pair["rejected"]:
            dropped["identical_responses"] += 1
        else:
            key = (pair["prompt"], frozenset((pair["chosen"], pair["rejected"])))
            if key in seen:
                dropped["duplicate"] += 1
            else:
                seen.add(key)
                kept.append(pair)

    # Token budgets; responses are counted as they follow the prompt (" " + response).
    def n_tokens(texts: list[str]) -> list[int]:
        if not texts:
            return []
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]

    prompt_len = n_tokens([p["prompt"] for p in kept])
    chosen_len = n_tokens([" " + p["chosen"] for p in kept])
    rejected_len = n_tokens([" " + p["rejected"] for p in kept])
    budgeted = []
    for pair, lp, lc, lr in zip(kept, prompt_len, chosen_len, rejected_len):
        if lp > cfg.max_prompt_tokens:
            dropped["prompt_too_long"] += 1
        elif max(lc, lr) > cfg.max_response_tokens:
            dropped["response_too_long"] += 1
        else:
            budgeted.append(pair)

    gold_info: dict[str, Any] = {}
    if cfg.labels == "gold":
        relabelled, agree = [], 0
        for pair in budgeted:
            verdict = gold.prefers(pair["prompt"], pair["chosen"], pair["rejected"], cfg.gold_scorer)
            if verdict is None:
                dropped["gold_tie"] += 1
                continue
            agree += verdict
            chosen, rejected = (pair["chosen"], pair["rejected"]) if verdict else (pair["rejected"], pair["chosen"])
            relabelled.append({"prompt": pair["prompt"], "chosen": chosen, "rejected": rejected})
        if gold.get_scorer(cfg.gold_scorer).balance_length:
            balanced = balance_by_length(relabelled)
            dropped["length_balance"] += len(relabelled) - len(balanced)
            relabelled = balanced
        gold_info = {"gold_scorer": cfg.gold_scorer,
                     "gold_agrees_with_human": agree / len(relabelled) if relabelled else None}
        budgeted = relabelled
    out = [{"prompt": p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in budgeted]
    return out, dropped, gold_info


LENGTH_GAPS = (3, 6, 11, 21)
"""Bounds of the strata of |words(chosen) - words(rejected)| that `balance_by_length` balances separately."""


def balance_by_length(pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    """`pairs` without the excess of one side: in each stratum of length gap (`LENGTH_GAPS`), as many pairs
    whose chosen response is the longer as pairs whose chosen is the shorter (the first ones in input
    order are kept; equal lengths always). So a preference for length, in either direction, explains
    none of the labels of a gold about content."""
    sides: dict[tuple[int, bool], list[int]] = {}
    for i, p in enumerate(pairs):
        gap = gold.words(p["chosen"]) - gold.words(p["rejected"])
        if gap:
            sides.setdefault((bisect.bisect_right(LENGTH_GAPS, abs(gap)), gap > 0), []).append(i)
    keep = set(range(len(pairs))) - {i for rows in sides.values() for i in rows}
    for (stratum, longer), rows in sides.items():
        keep.update(rows[:len(sides.get((stratum, not longer), []))])
    return [p for i, p in enumerate(pairs) if i in keep]


def split_pairs(pairs: list[dict[str, str]], test_fraction: float, seed: int,
                max_pairs: int | None = None) -> tuple[list[dict], list[dict]]:
    """Deterministic shuffle by `seed`, cap at `max_pairs`, then about `test_fraction` of the pairs -> test,
    split by prompt: every pair of a prompt goes to the same side, so no held-out prompt (and no response
    to it) is ever trained on, and PPO never trains on an evaluation prompt."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    if max_pairs is not None:
        order = order[:max_pairs]
    pairs_of_prompt = Counter(pairs[i]["prompt"] for i in order)
    n_test_target = max(1, round(len(order) * test_fraction))
    test_prompts, n_test = set(), 0
    for prompt in dict.fromkeys(pairs[i]["prompt"] for i in order):  # prompts in shuffled order
        if n_test >= n_test_target:
            break
        test_prompts.add(prompt)
        n_test += pairs_of_prompt[prompt]
    train = [pairs[i] for i in order if pairs[i]["prompt"] not in test_prompts]
    test = [pairs[i] for i in order if pairs[i]["prompt"] in test_prompts]
    if not train:
        raise DataError(f"only {len(pairs_of_prompt)} distinct prompt(s) left after cleaning: too few for a "
                        "train/test split")
    return train, test


def add_empty_answer_pairs(pairs: list[dict[str, str]], cfg: DataConfig, seed: int) -> list[dict[str, str]]:
    """Gold labels only: `pairs` plus, for about `gold_empty_fraction` of them, (a response vs "").

    The gold rates an empty answer low, but cleaning removed every empty response: show the reward model
    some, as the rejected side of extra pairs. Their chosen side is the pair's *worse* response (for
    `concise` the longer one), the comparison that teaches the reward model how bad empty is (the better
    one would only say "worse than good"); a pair the gold would not label that way is not added. These
    pairs end in "" and the sft stage leaves them out. Applied to the training side only, after the split,
    so no augmented pair shares a prompt with a held-out one.
    """
    rng = random.Random(seed)
    extra = [{"prompt": p["prompt"], "chosen": p["rejected"], "rejected": ""}
             for p in pairs if rng.random() < cfg.gold_empty_fraction
             and gold.prefers(p["prompt"], p["rejected"], "", cfg.gold_scorer)]
    return pairs + extra


def gold_length_correlation(pairs: list[dict[str, str]]) -> dict[str, float | None]:
    """For every gold (`gold.SCORERS`), the Pearson correlation of its score with the length in words over
    the distinct non-empty responses of `pairs`: how much of a gold a length preference alone could buy
    (None when either side is constant)."""
    texts = sorted({(p["prompt"], p[side]) for p in pairs for side in ("chosen", "rejected") if p[side]})
    lengths = [gold.words(r) for _, r in texts]
    out: dict[str, float | None] = {}
    for name in gold.SCORERS:
        scores = gold.score_batch([p for p, _ in texts], [r for _, r in texts], name)
        try:
            out[name] = round(statistics.correlation(scores, lengths), 4)
        except statistics.StatisticsError:  # fewer than two responses, or a constant side
            out[name] = None
    return out


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)
    return {"mean": round(statistics.fmean(values), 2), "p50": ordered[len(ordered) // 2],
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))], "max": ordered[-1]}


def length_stats(pairs: list[dict[str, str]], tokenizer) -> dict[str, Any] | None:
    """Token-length statistics of prompts and responses, and how often chosen is the shorter response."""
    if not pairs:
        return None
    def n_tokens(texts):
        return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]
    lp = n_tokens([p["prompt"] for p in pairs])
    lc = n_tokens([" " + p["chosen"] for p in pairs])
    lr = n_tokens([" " + p["rejected"] for p in pairs])
    return {"prompt_tokens": _stats(lp), "chosen_tokens": _stats(lc), "rejected_tokens": _stats(lr),
            # Among pairs of two non-empty responses (gold data adds pairs against the empty one).
            "chosen_shorter_fraction": round(_mean([c < r for c, r, p in zip(lc, lr, pairs) if p["rejected"]]), 4)}


def _mean(values: list) -> float:
    return sum(values) / len(values) if values else 0.0


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_prefs(path: str | Path) -> list[dict[str, str]]:
    """Rows of a `train_prefs.jsonl` / `test_prefs.jsonl` written by this stage (`MissingPrerequisite` if absent)."""
    with require(path, "data").open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --- the stage ----------------------------------------------------------------------------------

def run(config: PipelineConfig, ctx: RunContext) -> DataReport:
    cfg = config.data
    ctx.stage_dir("data")  # TRAIN_PREFS and TEST_PREFS live in it
    ctx.log(f"reading {cfg.source}" + (f" ({cfg.data_dir}/{cfg.split})" if not locations.is_local(cfg.source) else ""))
    pairs, source_info = read_pairs(cfg)
    ctx.progress(1, 3)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)  # for the token budgets
    if source_info["bad_lines"]:
        ctx.log(f"skipped {source_info['bad_lines']} malformed line(s), e.g. {source_info['bad_line_examples'][0]}",
                level="warning")
    kept, dropped, gold_info = clean_pairs(pairs, cfg, tokenizer)
    ctx.progress(2, 3)
    train, test = split_pairs(kept, cfg.test_fraction, config.seed, cfg.max_pairs)
    if cfg.labels == "gold":
        n_real = len(train)
        train = add_empty_answer_pairs(train, cfg, config.seed)
        gold_info["gold_empty_pairs_added"] = len(train) - n_real
        gold_info["gold_length_correlation"] = gold_length_correlation(train + test)
    train, test, votes_info = votes.mix(config, ctx, train, test, tokenizer)  # arena votes (data.votes_file)

    write_jsonl(ctx.run_dir / TRAIN_PREFS, train)
    write_jsonl(ctx.run_dir / TEST_PREFS, test)
    ctx.artifact("data", ctx.run_dir / TRAIN_PREFS)
    ctx.artifact("data", ctx.run_dir / TEST_PREFS)
    report = DataReport(
        source=DataSource(**source_info), labels=cfg.labels, **gold_info, seed=config.seed,
        pairs_read=len(pairs), bad_lines=source_info["bad_lines"],
        dropped=dict(sorted(dropped.items())), kept=len(kept),
        capped_by_max_pairs=max(0, len(kept) - (cfg.max_pairs or len(kept))),
        train=len(train), test=len(test),
        lengths={"train": length_stats(train, tokenizer), "test": length_stats(test, tokenizer)},
        votes=votes_info,
    )
    ctx.log_metrics({"data/pairs_read": len(pairs), "data/kept": len(kept), "data/train": len(train),
                     "data/test": len(test), "data/bad_lines": source_info["bad_lines"]}, step=0)
    ctx.log(f"{len(pairs)} pairs read, {len(kept)} kept ({dict(dropped)} dropped): "
            f"{len(train)} train / {len(test)} test")
    ctx.progress(3, 3)
    return report
