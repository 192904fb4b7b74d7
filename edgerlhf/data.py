"""Stage 1, data: the job's data sets -> cleaned, deduplicated, split files for every later stage.

What each stage reads, in `data/` (`edgerlhf.contract`):

    train_prefs.jsonl, test_prefs.jsonl       preference pairs {prompt, chosen, rejected}: the reward model, DPO
    train_unpaired.jsonl, test_unpaired.jsonl answers labelled desirable or not {prompt, completion, label}: KTO
    sft_train.jsonl, sft_test.jsonl           demonstrations {prompt, completion}: SFT
    prompts_train.jsonl, prompts_test.jsonl   prompts {prompt, ...extra columns}: PPO, GRPO, RLOO, the evaluation

`data.source` may hold any format of `edgerlhf.formats` (preference pairs, demonstrations, prompts, unpaired
feedback; text or conversational; a file, a directory or a hub id; columns mapped by `data.columns`). The other
two files are derived from it unless a stage has its own data set, as in the InstructGPT recipe (demonstrations
for SFT, comparisons for the reward model, prompts for RL): `sft_data.source` (demonstrations) and
`prompt_data.source` (prompts). Derived, SFT learns the preferred answer of each training pair (once per prompt
and answer) and the prompts are the pairs' prompts. KTO's unpaired examples are `data.source`'s own when it holds
unpaired feedback (a snapshot of chat thumbs), else each pair's chosen answer labelled desirable and its rejected
one undesirable (`unpaired_of_pairs`).

Hub ids (`Anthropic/hh-rlhf` with `data.data_dir` harmless-base, helpful-base, ... and `data.split`) are
downloaded, never looked up on disk (`edgerlhf.locations`), and read through `datasets`; offline this fails at
once and says how to point the source at local files instead. HH-RLHF's raw dialogues (`{"chosen", "rejected"}`,
the prompt being their shared beginning) and its processed form (`{"prompt", "chosen", "rejected"}`) are
preference formats like any other.

Cleaning of the preference pairs, in this order, each drop counted by reason in the report: empty response,
identical responses, prompt/response split mismatch (pairs whose dialogues differ before the last reply),
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
correlation with the responses' length. Demonstrations and prompts are cleaned alike (empty, duplicate, over
the token budgets) and split by prompt with the same fraction and seed.

A malformed row (not JSON, not an object, a missing or ill-typed column, no dialogue) raises `DataError`
naming the file, row and column, unless `skip_bad_lines` is set: then it is skipped and counted.

With `data.votes_file`, arena votes join last, after the split (`edgerlhf.votes.mix`; never relabelled).

Returns the report (`data/report.json`): for every data set, where it came from, the format found and why, the
rows read, kept and dropped by reason.
"""

from __future__ import annotations

import bisect
import json
import random
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from edgerlhf import formats, gold, votes
from edgerlhf.config import DataConfig, PipelineConfig
from edgerlhf.context import RunContext
from edgerlhf.contract import (PROMPTS_TEST, PROMPTS_TRAIN, SFT_TEST, SFT_TRAIN, TEST_PREFS, TEST_UNPAIRED, TRAIN_PREFS,
                               TRAIN_UNPAIRED)
from edgerlhf.errors import require
from edgerlhf.formats import DataError
from edgerlhf.models import load_tokenizer
from edgerlhf.reports import DataReport, DataSource, StageData

HUB_DATASET = "Anthropic/hh-rlhf"


# --- reading ---------------------------------------------------------------------------------------


def read_source(section, setting: str, kind: str | None, skip_bad_lines: bool) -> formats.Records:
    """The records of a config section's data source (`data`, `sft_data`, `prompt_data`), of `kind` if given."""
    return formats.read(section.source, kind=section.format if section.format != "auto" else kind,
                        columns=section.columns, name=section.name, data_dir=section.data_dir, split=section.split,
                        skip_bad_rows=skip_bad_lines, setting=setting,
                        advice="set data.skip_bad_lines=true to skip bad lines")


def parse_record(record: Any) -> dict[str, str]:
    """One preference row (HH's raw dialogues or prompt/chosen/rejected, text or messages) -> {"prompt", "chosen",
    "rejected"}; raises DataError if malformed. A pair whose two dialogues do not share a prompt gets
    `"mismatch": True` (a drop, not an error)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    detected = formats.detect(record, [record], "preference")
    return formats.to_records(record, detected)[0]


def read_pairs(cfg: DataConfig) -> tuple[list[dict[str, str]], dict[str, Any]]:
    """All well-formed preference pairs of `data.source`, and reading statistics (files, rows, bad rows)."""
    read = read_source(cfg, "data.source", "preference", cfg.skip_bad_lines)
    return read.records, source_info(read)


def source_info(read: formats.Records) -> dict[str, Any]:
    """What `DataSource` reports of a data set read."""
    return {**read.source, "records": read.rows, "bad_lines": read.bad_rows, "bad_line_examples": read.bad_row_examples,
            "format": read.detected.kind, "conversational": read.detected.conversational,
            "detected": read.detected.reason}


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
    prompt_len = n_tokens(tokenizer, [p["prompt"] for p in kept])
    chosen_len = n_tokens(tokenizer, [" " + p["chosen"] for p in kept])
    rejected_len = n_tokens(tokenizer, [" " + p["rejected"] for p in kept])
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
    lp = n_tokens(tokenizer, [p["prompt"] for p in pairs])
    lc = n_tokens(tokenizer, [" " + p["chosen"] for p in pairs])
    lr = n_tokens(tokenizer, [" " + p["rejected"] for p in pairs])
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


def _derived(run_dir: Path, own: str, prefs: str, derive) -> list[dict[str, Any]]:
    """The rows of a stage's own file, or, in a run directory written before this stage wrote one, those derived
    from the preference pairs."""
    path = Path(run_dir) / own
    if path.exists() or not (Path(run_dir) / prefs).exists():
        return read_prefs(path)
    return derive(read_prefs(Path(run_dir) / prefs))


def demonstrations(run_dir: str | Path, split: str = "train") -> list[dict[str, str]]:
    """SFT's demonstrations {prompt, completion} of a run (`split` train or test)."""
    own, prefs = (SFT_TRAIN, TRAIN_PREFS) if split == "train" else (SFT_TEST, TEST_PREFS)
    return _derived(Path(run_dir), own, prefs, demonstrations_of_pairs)


def prompts(run_dir: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """The prompts {prompt, ...} of a run that the sampling algorithms (train) and the evaluation (test) read."""
    own, prefs = (PROMPTS_TRAIN, TRAIN_PREFS) if split == "train" else (PROMPTS_TEST, TEST_PREFS)
    return _derived(Path(run_dir), own, prefs, prompts_of_pairs)


def demonstrations_of_pairs(pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    """The preferred answer of each pair, once per (prompt, answer), sorted. Pairs against an empty response are
    left out: the data stage adds them for the reward model (`data.gold_empty_fraction`), with the worse response
    of a pair as their chosen side."""
    return [{"prompt": p, "completion": c} for p, c in sorted({(r["prompt"], r["chosen"]) for r in pairs
                                                                 if r["rejected"]})]


def prompts_of_pairs(pairs: list[dict[str, str]]) -> list[dict[str, str]]:
    """The prompt of every pair, in order (a prompt with several pairs comes as often)."""
    return [{"prompt": r["prompt"]} for r in pairs]


def unpaired(run_dir: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """KTO's unpaired examples {prompt, completion, label} of a run (`split` train or test): the data stage's file,
    or, in a run directory written before the data stage wrote one, those of its preference pairs
    (`unpaired_of_pairs`). A malformed row raises `DataError` naming the file, the line and the column."""
    own, prefs = (TRAIN_UNPAIRED, TRAIN_PREFS) if split == "train" else (TEST_UNPAIRED, TEST_PREFS)
    path = Path(run_dir) / own
    if not path.exists() and (Path(run_dir) / prefs).exists():
        return unpaired_of_pairs(read_prefs(Path(run_dir) / prefs))
    return read_unpaired(path)


def read_unpaired(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an unpaired file (`train_unpaired.jsonl`), read as an `unpaired` data set (`formats.read`): a
    prompt, a completion and a true/false label each, or `DataError` naming the line and the column. An empty file
    has no rows (the data set held demonstrations or prompts)."""
    path = require(path, "data")
    if not path.read_text(encoding="utf-8").strip():
        return []
    return formats.read(str(Path(path).absolute()), kind="unpaired").records


def unpaired_of_pairs(pairs: list[dict[str, str]]) -> list[dict[str, Any]]:
    """Each pair as two unpaired examples: its chosen answer labelled desirable (True), its rejected one undesirable
    (False), in order, each (prompt, answer, label) once. A pair against an empty answer (the data stage adds them
    for the reward model, `data.gold_empty_fraction`, with a pair's *worse* answer as their chosen side) gives only
    its empty answer, undesirable."""
    out, seen = [], set()
    for r in pairs:
        for completion, label in ((r["chosen"], True), (r["rejected"], False)):
            if label and not r["rejected"]:
                continue
            if (r["prompt"], completion, label) not in seen:
                seen.add((r["prompt"], completion, label))
                out.append({"prompt": r["prompt"], "completion": completion, "label": label})
    return out


def clean_records(records: list[dict[str, Any]], cfg: DataConfig, tokenizer) -> tuple[list[dict[str, Any]], Counter]:
    """Demonstrations, prompts or unpaired feedback without the unusable ones (counted by reason): an empty
    answer, a duplicate, a prompt over `max_prompt_tokens`, an answer over `max_response_tokens`."""
    dropped: Counter = Counter()
    kept, seen = [], set()
    for r in records:
        key = (r["prompt"], r.get("completion"))
        if "completion" in r and not r["completion"]:
            dropped["empty_response"] += 1
        elif key in seen:
            dropped["duplicate"] += 1
        else:
            seen.add(key)
            kept.append(r)
    prompt_len = n_tokens(tokenizer, [r["prompt"] for r in kept])
    answer_len = n_tokens(tokenizer, [" " + r.get("completion", "") for r in kept])
    budgeted = []
    for r, lp, la in zip(kept, prompt_len, answer_len):
        if lp > cfg.max_prompt_tokens:
            dropped["prompt_too_long"] += 1
        elif "completion" in r and la > cfg.max_response_tokens:
            dropped["response_too_long"] += 1
        else:
            budgeted.append(r)
    return budgeted, dropped


def n_tokens(tokenizer, texts: list[str]) -> list[int]:
    """Each text's length in tokens, as the budgets count it (no special tokens)."""
    if not texts:
        return []
    return [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]]


def stage_records(config: PipelineConfig, section, setting: str, kind: str, tokenizer,
                  ) -> tuple[list[dict], list[dict], StageData]:
    """A stage's own data set (`sft_data`: `kind` demonstration; `prompt_data`: prompt), cleaned and split by prompt.

    Any format serves that has what the stage reads: SFT learns demonstrations, the preferred answers of
    preference pairs or the answers of unpaired feedback labelled good; the prompts are every record's prompt."""
    read = read_source(section, setting, None, config.data.skip_bad_lines)
    found, records = read.detected.kind, read.records
    if kind == "demonstration":
        if found == "prompt":
            raise DataError(f"{setting}: {section.source} holds prompts only ({read.detected.reason}): no answers for "
                            "SFT to learn; give demonstrations (prompt/completion, messages or text)")
        if found == "preference":
            records = demonstrations_of_pairs([r for r in records if not r.get("mismatch")])
        elif found == "unpaired":
            records = [{"prompt": r["prompt"], "completion": r["completion"]} for r in records if r["label"]]
    else:
        records = [{k: v for k, v in r.items() if k not in ("completion", "chosen", "rejected", "label", "mismatch")}
                   for r in records]
    kept, dropped = clean_records(records, config.data, tokenizer)
    train, test = split_pairs(kept, config.data.test_fraction, config.seed, section.max_rows)
    return train, test, StageData(source=DataSource(**source_info(read)), read=len(records),
                                  dropped=dict(sorted(dropped.items())), kept=len(kept), train=len(train),
                                  test=len(test))


# --- the stage ----------------------------------------------------------------------------------


def run(config: PipelineConfig, ctx: RunContext) -> DataReport:
    cfg = config.data
    ctx.stage_dir("data")  # every file of `contract`'s data/ lives in it
    ctx.log(f"reading {cfg.source}" + (f" ({cfg.data_dir}/{cfg.split})" if not formats.locations.is_local(cfg.source)
                                       else ""))
    main = read_source(cfg, "data.source", None, cfg.skip_bad_lines)
    source = source_info(main)
    kind = main.detected.kind
    ctx.log(f"data.source: {kind} data ({main.detected.reason})")
    ctx.progress(1, 3)
    tokenizer = load_tokenizer(config.model.tokenizer or config.model.name_or_path)  # for the token budgets
    if source["bad_lines"]:
        ctx.log(f"skipped {source['bad_lines']} malformed line(s), e.g. {source['bad_line_examples'][0]}",
                level="warning")
    if cfg.labels == "gold" and kind != "preference":
        raise DataError(f"data.labels=gold relabels preference pairs, but {cfg.source} holds {kind} data")

    gold_info: dict[str, Any] = {}
    pairs = main.records if kind == "preference" else []
    if kind == "preference":
        kept, dropped, gold_info = clean_pairs(pairs, cfg, tokenizer)
        train, test = split_pairs(kept, cfg.test_fraction, config.seed, cfg.max_pairs)
        if cfg.labels == "gold":
            n_real = len(train)
            train = add_empty_answer_pairs(train, cfg, config.seed)
            gold_info["gold_empty_pairs_added"] = len(train) - n_real
            gold_info["gold_length_correlation"] = gold_length_correlation(train + test)
    else:  # demonstrations, prompts or unpaired feedback: no pairs, but SFT's data and the prompts
        kept, dropped = clean_records(main.records, cfg, tokenizer)
        own = split_pairs(kept, cfg.test_fraction, config.seed, cfg.max_pairs)
        train, test = [], []
    ctx.progress(2, 3)
    train, test, votes_info = votes.mix(config, ctx, train, test, tokenizer)  # arena votes (data.votes_file)

    # SFT's demonstrations and the prompts, derived from data.source unless the stage has its own data set.
    if kind == "preference":
        demos = [demonstrations_of_pairs(train), demonstrations_of_pairs(test)]
        prompt_rows = [prompts_of_pairs(train), prompts_of_pairs(test)]
        thumbs = [unpaired_of_pairs(train), unpaired_of_pairs(test)]
    else:
        demos = [[{"prompt": r["prompt"], "completion": r["completion"]} for r in part
                  if kind == "demonstration" or kind == "unpaired" and r["label"]] for part in own]
        prompt_rows = [[{k: v for k, v in r.items() if k not in ("completion", "label")} for r in part]
                       for part in own]
        thumbs = [list(part) if kind == "unpaired" else [] for part in own]
    parts: dict[str, StageData] = {}
    if config.sft_data.source:
        *demos, parts["demonstrations"] = stage_records(config, config.sft_data, "sft_data.source",
                                                        "demonstration", tokenizer)
    if config.prompt_data.source:
        *prompt_rows, parts["prompts"] = stage_records(config, config.prompt_data, "prompt_data.source", "prompt",
                                                       tokenizer)

    files = {TRAIN_PREFS: train, TEST_PREFS: test, SFT_TRAIN: demos[0], SFT_TEST: demos[1],
             PROMPTS_TRAIN: prompt_rows[0], PROMPTS_TEST: prompt_rows[1], TRAIN_UNPAIRED: thumbs[0],
             TEST_UNPAIRED: thumbs[1]}
    for name, rows in files.items():
        write_jsonl(ctx.run_dir / name, rows)
        ctx.artifact("data", ctx.run_dir / name)
    report = DataReport(
        source=DataSource(**source), format=kind, labels=cfg.labels, **gold_info, seed=config.seed,
        pairs_read=len(pairs), bad_lines=source["bad_lines"],
        dropped=dict(sorted(dropped.items())), kept=len(kept),
        capped_by_max_pairs=max(0, len(kept) - (cfg.max_pairs or len(kept))),
        train=len(train), test=len(test),
        lengths={"train": length_stats(train, tokenizer), "test": length_stats(test, tokenizer)},
        votes=votes_info, demonstrations=parts.get("demonstrations"), prompts=parts.get("prompts"),
        sft_examples={"train": len(demos[0]), "test": len(demos[1])},
        prompt_rows={"train": len(prompt_rows[0]), "test": len(prompt_rows[1])},
        unpaired_examples={"train": len(thumbs[0]), "test": len(thumbs[1])},
    )
    ctx.log_metrics({"data/pairs_read": len(pairs), "data/kept": len(kept), "data/train": len(train),
                     "data/test": len(test), "data/bad_lines": source["bad_lines"]}, step=0)
    ctx.log(f"{main.rows} {kind} rows read, {len(kept)} kept ({dict(dropped)} dropped): {len(train)} train / "
            f"{len(test)} test pairs; SFT {len(demos[0])} / {len(demos[1])} demonstrations; prompts "
            f"{len(prompt_rows[0])} / {len(prompt_rows[1])}; KTO {len(thumbs[0])} / {len(thumbs[1])} labelled answers")
    ctx.progress(3, 3)
    return report
