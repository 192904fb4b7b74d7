"""A verifiable known-answer task: stated rewards (`ppo.rewards`), no reward model, a right answer per prompt.

    python -m edgerlhf.lab.verifiable --seeds 0 1 2 --algorithms grpo ppo rloo --out verifiable.json
    edgerlhf verifiable --seeds 0 --algorithms grpo

The task, **echo**: the prompt gives a word, the right answer repeats it, in a fixed format:

    Human: Please echo tiger.
    Assistant: Answer: tiger

`WORDS` holds forty words (one GPT-2 token each), `TEMPLATES` eight ways to ask. The SFT demonstrations are every
word in the first `TAUGHT` templates; the prompts of the alignment and of the evaluation are every word in the
others, split into training and held-out prompts by `data.test_fraction`: SFT has never seen a prompt worded that
way, and a held-out prompt pairs a word with a wording the alignment did not see together. The right answer
depends on the prompt: no one answer is right for two prompts. The reward is `reference_answer` — the answer's last
word equals the prompt's word — plus 0.2 x a format rule (`^Answer:`); an answer cut at the cap pays
`ppo.missing_eos_penalty`. The task is *learned* at a seed when the exact-match rate of the aligned policy minus
SFT's on held-out prompts has a bootstrap interval above 0 (`evaluate.reward_parts_diff["correct"]`).

The `tiny` preset's random base learns to copy a word only from a long warm-up (`TASK`: 1,500 causal-LM steps on
the demonstrations, every parameter trained), so the warm-up is part of this task's SFT; SFT then copies in its
own wordings and sometimes in the new ones, often without the format.

Each seed is one `tiny` pipeline (data -> warm-up + SFT -> alignment -> evaluate; no reward stage) in
`<run-root>/seed<seed>/`; every further algorithm reuses its data and SFT policy, in `seed<seed>-<algorithm>/`.
Like `edgerlhf known-answer`, a benchmark, not a test: it reports, it does not tune.

Written down before any reported run (seeds 0, 1, 2), after pilots at seed 100 only. Dropped there:
- *second of three words*: SFT on 64 or 512 demonstrations answered a word not in the prompt (exact match
  0.01-0.02) and GRPO did not move it;
- *category* (a word's category: animal, food, color, place), asked of words SFT never saw (SFT 0.28, GRPO flat at
  chance over 100 steps) or saw in one wording (SFT 0.33, GRPO 0.28 at 30 steps, 0.24-0.29 over 120 steps with 8
  samples per prompt): a supervised run of the policy's own LoRA on the asked prompts stayed at chance too (train
  exact match 0.27 after 150 steps of 8), so the tiny model's policy adapter cannot hold a word -> category map at
  all, from rewards or from labels; GRPO learned the unconditional "say animal" in 5 steps;
- *echo* with the preset's 150-step warm-up: SFT did not copy at all (loss 0.9 per answer token, exact match 0.01);
- *echo* with the exact match requiring the format (`after:Answer:`): SFT's format depends on the wording, always
  or never, so a group of samples never differs in it and GRPO could not learn it (0.09 -> 0.14-0.16, intervals
  reaching 0), while the same runs raised the share of answers naming the right word by +0.19 [+0.05, +0.33] and
  [+0.08, +0.30]: the criterion became the word, the format a bonus;
- noisy demonstrations (the right word in a third or fewer of them): the warm-up did not learn to copy (0.02).
This version, at seed 100: with six templates taught (two asked) GRPO did not move the exact match (0.35 -> 0.33,
-0.02 [-0.09, +0.06]); with five (three asked, the version written here) it did (0.45 -> 0.60, +0.15 [+0.06,
+0.23]). SFT is right about half the time, not rarely: a wording it has never seen, and a word it must copy.
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

WORDS = ("horse", "tiger", "sheep", "mouse", "eagle", "snake", "whale", "camel", "rabbit", "wolf",
         "bread", "apple", "rice", "cheese", "pizza", "sugar", "soup", "cake", "meat", "salad",
         "red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white",
         "city", "school", "church", "hospital", "forest", "beach", "market", "village", "island", "park")
"""Forty words, one GPT-2 token each with their leading space (checked when the task is written)."""
TEMPLATES = ("Repeat the word {w}.", "Say {w}.", "Write the word: {w}", "Copy this word exactly: {w}",
             "{w} - say it back.", "Please echo {w}.", "What word is this: {w}?", "Type {w} back to me.")
TAUGHT = 5
"""SFT's demonstrations use the first `TAUGHT` templates, the prompts the others."""
SHARED_STAGES = ("data", "sft")
COMPONENTS = [
    {"kind": "reference_answer", "column": "answer", "extract": r"regex:(\w+)\W*$", "compare": "text", "name": "correct"},
    {"kind": "regex", "pattern": "^Answer:", "weight": 0.2, "name": "format"},
]
TASK = {
    "stages": ["data", "sft", "ppo", "evaluate"],
    "data": {"labels": "human", "max_response_tokens": 8, "test_fraction": 0.25},
    "warmup": {"steps": 1500, "max_epochs": 100},
    "ppo": {"rewards": COMPONENTS, "response_length": 8, "steps": 60, "learning_rate": 1e-3},
    "evaluate": {"response_length": 8, "samples_per_prompt": 8},
}
"""The `tiny` preset's changes for this task: a warm-up long enough to learn copying, answers of a few tokens, the
stated rewards and no reward model, 60 alignment steps at a third of the preset's learning rate, 8 answers per
held-out prompt."""


def write_task(root: Path, seed: int, tokenizer_dir: str | None = None) -> tuple[Path, Path]:
    """The demonstrations (`prompt`/`completion`: every word in the first `TAUGHT` templates) and the prompts with
    their `answer` (every word in the other templates), as JSONL, each shuffled by `seed`."""
    if tokenizer_dir is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        split = [w for w in WORDS if len(tok(" " + w)["input_ids"]) != 1]
        if split:
            raise ValueError(f"words that are not one token: {split}")
    demos = [{"prompt": t.format(w=w), "completion": f"Answer: {w}"} for w in WORDS for t in TEMPLATES[:TAUGHT]]
    prompts = [{"prompt": t.format(w=w), "answer": w} for w in WORDS for t in TEMPLATES[TAUGHT:]]
    rng = random.Random(seed)
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
