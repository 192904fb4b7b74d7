"""A verifiable known-answer task: stated rewards (`ppo.rewards`), no reward model, a right answer per prompt.

    python -m edgerlhf.lab.verifiable --seeds 0 1 2 --algorithms grpo ppo rloo --out verifiable.json
    edgerlhf verifiable --seeds 0 --algorithms grpo

The task, **category**: the prompt names a word, the answer names its category (animal, food, color or place) in
a fixed format:

    Human: What kind of thing is tiger?
    Assistant: Answer: animal

`CATEGORIES` holds ten words per category (one GPT-2 token each), `TEMPLATES` eight ways to ask. The SFT
demonstrations are every template of the first half of each category's words, and *one* template (drawn by the
seed) of each other word: SFT learns the format and the first words well, the others barely. The prompts of the
alignment and of the evaluation are the other seven templates of those barely taught words, split into training
and held-out prompts by `data.test_fraction`: a held-out prompt asks about a word the alignment saw, in a way it
did not. The reward is `reference_answer` (the
text after `Answer:` equals the category, case and spaces normalised) plus 0.2 x a format rule (`^Answer:`); an
answer cut at the cap pays `ppo.missing_eos_penalty`. The task is *learned* at a seed when the exact-match rate of
the aligned policy minus SFT's on held-out prompts has a bootstrap interval above 0
(`evaluate.reward_parts_diff["correct"]`).

Each seed is one `tiny` pipeline (data -> warm-up + SFT -> alignment -> evaluate; no reward stage) in
`<run-root>/seed<seed>/`; every further algorithm reuses its data and SFT policy, in `seed<seed>-<algorithm>/`.
Like `edgerlhf known-answer`, a benchmark, not a test: it reports, it does not tune. (A first task, naming the
second of three words, was dropped at its pilot seed, 100, before any reported run: SFT on 64 or 512
demonstrations answered a word not in the prompt, exact match 0.01-0.02, and GRPO did not move it. So was a first
version of this one whose asked words SFT had never seen: SFT guessed (0.28), and GRPO stayed at chance over 100
steps (0.26 -> 0.22 per 10 steps) while it learned an unconditional rule, "say animal", in 5 steps: the tiny
model's policy adapter does not learn a new word -> category mapping from rewards alone.)
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from edgerlhf.config import load_config
from edgerlhf.contract import merge_overrides
from edgerlhf.lab.known_answer import add_run_arguments, interval_text, run_seed, start_runs

CATEGORIES = {
    "animal": ("horse", "tiger", "sheep", "mouse", "eagle", "snake", "whale", "camel", "rabbit", "wolf"),
    "food": ("bread", "apple", "rice", "cheese", "pizza", "sugar", "soup", "cake", "meat", "salad"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white"),
    "place": ("city", "school", "church", "hospital", "forest", "beach", "market", "village", "island", "park"),
}
"""Ten words per category, one GPT-2 token each with their leading space (checked when the task is written)."""
TEMPLATES = ("What kind of thing is {w}?", "Is {w} an animal, a food, a color or a place?",
             "Which category does the word {w} belong to?", "Name the category of: {w}.",
             "{w}: which kind of thing is it?", "Tell me what sort of thing {w} is.", "Classify the word {w}.",
             "In one word, what is {w}?")
SHARED_STAGES = ("data", "sft")
COMPONENTS = [
    {"kind": "reference_answer", "column": "answer", "extract": "after:Answer:", "compare": "text", "name": "correct"},
    {"kind": "regex", "pattern": "^Answer:", "weight": 0.2, "name": "format"},
]
TASK = {
    "stages": ["data", "sft", "ppo", "evaluate"],
    "data": {"labels": "human", "max_response_tokens": 8},
    "ppo": {"rewards": COMPONENTS, "response_length": 8},
    "evaluate": {"response_length": 8},
}
"""The `tiny` preset's changes for this task: answers of a few tokens, the stated rewards, no reward model."""


def write_task(root: Path, seed: int, tokenizer_dir: str | None = None) -> tuple[Path, Path]:
    """The demonstrations (`prompt`/`completion`: the first half of each category's words) and the prompts with
    their `answer` (the other words), as JSONL, each shuffled by `seed`."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        split = [w for words in CATEGORIES.values() for w in words if len(tok(" " + w)["input_ids"]) != 1]
        if split:
            raise ValueError(f"words that are not one token: {split}")
    taught = [(w, c) for c, words in CATEGORIES.items() for w in words[: len(words) // 2]]
    asked = [(w, c) for c, words in CATEGORIES.items() for w in words[len(words) // 2:]]
    rng = random.Random(seed)
    once = {w: rng.randrange(len(TEMPLATES)) for w, _ in asked}  # the one template an asked word is taught in
    demos = [{"prompt": t.format(w=w), "completion": f"Answer: {c}"} for w, c in taught for t in TEMPLATES]
    demos += [{"prompt": TEMPLATES[once[w]].format(w=w), "completion": f"Answer: {c}"} for w, c in asked]
    prompts = [{"prompt": t.format(w=w), "answer": c} for w, c in asked for i, t in enumerate(TEMPLATES)
               if i != once[w]]
    rng.shuffle(demos)
    rng.shuffle(prompts)
    root.mkdir(parents=True, exist_ok=True)
    demo_path, prompt_path = root / "demos.jsonl", root / "prompts.jsonl"
    demo_path.write_text("".join(json.dumps(d) + "\n" for d in demos))
    prompt_path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return demo_path, prompt_path


def run_one(seed: int, run_dir: Path, overrides: dict[str, Any], algorithm: str = "grpo",
            shared: dict[str, Any] | None = None) -> dict[str, Any]:
    """One pipeline run of the task; its table row. With `shared` (the row of the seed's first run) its data and
    SFT stages are copied and only the alignment and the evaluation run."""
    from edgerlhf.context import RunContext
    from edgerlhf.pipeline import run_pipeline

    preset = load_config("tiny")
    demo_path, prompt_path = write_task(run_dir.parent / f"task-seed{seed}", seed, preset.model.tokenizer)
    config = load_config("tiny", merge_overrides(merge_overrides(TASK, {
        "seed": seed, "algorithm": algorithm, "data": {"source": str(demo_path)},
        "prompt_data": {"source": str(prompt_path)}}), overrides))
    ctx = RunContext(run_dir)
    started = time.perf_counter()
    if shared is not None:
        for stage in SHARED_STAGES:
            shutil.copytree(Path(shared["run_dir"]) / stage, run_dir / stage, dirs_exist_ok=True)
    reports = run_pipeline(config, ctx, skip=SHARED_STAGES if shared is not None else ())
    ev = reports["evaluate"]
    correct = ev.reward_parts_diff["correct"]
    row = {
        "seed": seed, "algorithm": config.algorithm, "run_dir": str(run_dir),
        "correct_diff": correct.model_dump(), "format_diff": ev.reward_parts_diff["format"].model_dump(),
        "exact_match": {"sft": ev.sft.rewards["correct"].mean, "aligned": ev.ppo.rewards["correct"].mean},
        "length_diff": ev.length_diff.model_dump(), "kl": ev.kl,
        "empty_rate": {"sft": ev.sft.empty_rate, "aligned": ev.ppo.empty_rate},
        "cap_hit_rate": {"sft": ev.sft.cap_hit_rate, "aligned": ev.ppo.cap_hit_rate},
        "learned": correct.low is not None and correct.low > 0.0,
        "seconds": round(time.perf_counter() - started, 1),
    }
    return row


def table(rows: list[dict[str, Any]]) -> str:
    """One row per run, then per algorithm the seeds where the task was learned."""
    lines = ["| algorithm | seed | exact match SFT → aligned | gain (interval) | format gain | length Δ (tokens) | KL | "
             "capped SFT/aligned | learned |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['algorithm']} | {r['seed']} | {r['exact_match']['sft']:.2f} → "
                     f"{r['exact_match']['aligned']:.2f} | {interval_text(r['correct_diff'])} | {interval_text(r['format_diff'])} | "
                     f"{r['length_diff']['mean']:+.1f} | {r['kl']:.2f} | "
                     f"{r['cap_hit_rate']['sft']:.0%}/{r['cap_hit_rate']['aligned']:.0%} | "
                     f"{'yes' if r['learned'] else 'no'} |")
    lines.append("")
    for algorithm in dict.fromkeys(r["algorithm"] for r in rows):
        runs = [r for r in rows if r["algorithm"] == algorithm]
        lines.append(f"- {algorithm}: learned in {sum(r['learned'] for r in runs)} of {len(runs)} seeds "
                     "(exact-match gain above 0)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgerlhf verifiable", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--algorithms", nargs="+", default=["grpo", "ppo", "rloo"], choices=["grpo", "ppo", "rloo"],
                        help="sampling algorithms, each from the same SFT policy (default: grpo ppo rloo)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        overrides, root, done = start_runs(args, "edgerlhf verifiable", TASK)
    except ValueError as exc:
        print(f"edgerlhf verifiable: {exc}", file=sys.stderr)
        return 2
    rows = list(done)
    for seed in args.seeds:
        run_seed(rows, done, root / f"seed{seed}", {"seed": seed}, args.algorithms,
                 lambda where, algorithm, first: run_one(seed, where, overrides, algorithm, shared=first),
                 lambda r: f"seed {seed} {r['algorithm']}: exact match {r['exact_match']['sft']:.2f} -> "
                           f"{r['exact_match']['aligned']:.2f}, gain {interval_text(r['correct_diff'])} ({r['seconds']:.0f}s)",
                 args.out)
    print(table(rows))
    print(f"runs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
