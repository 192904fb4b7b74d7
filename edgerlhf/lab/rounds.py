"""Two rounds of RLHF on the known-answer task, the second on votes of a simulated voter: does round 2 beat round 1?

    edgerlhf rounds --gold question --seeds 0 1 2 --threads 1 --out rounds.json
    python -m edgerlhf.lab.rounds --gold question --seeds 0 --mix 0.5         # votes mixed with round 1's pairs

Per seed, **round 1** is the known-answer suite's run (`known_answer.run_one`: the `tiny` pipeline with a bf16 reward
model on the gold-labelled pairs, the alignment, the evaluation against SFT) in `<run-root>/<gold>-seed<seed>/`.

Then **a simulated voter** does what a person does in the Arena (`edgerlhf.votes`): round 1's aligned policy answers
each of round 1's training prompts twice (`VOTER_ANSWERS`; PPO's sampling settings and response length, seeded), and
the gold scorer votes for the better answer (`gold.prefers`; a tie makes no pair, as a tie in the Arena makes none).
The votes are written as the Arena's snapshot writes them (`votes.export_lines`), to
`<run-root>/<gold>-seed<seed>-votes.jsonl`.

**Round 2** (`<run-root>/<gold>-seed<seed>-round2/`) continues round 1 (`round.parent_run`,
`edgerlhf.config.RoundConfig`): its SFT policy is round 1's aligned policy, merged (SFT trains nothing), its reward
model trains on the votes (`data.votes_file`; alone, or with `--mix W` as that share of the training pairs beside
round 1's gold pairs, `data.votes_weight`), and it aligns again. Its own evaluation compares it with its SFT policy,
which is round 1's aligned policy, on its own held-out prompts: with the votes alone those are the votes' held-out
prompts, few, and chosen by the voter (prompts where round 1's two answers differed on the gold).

So the row's verdict comes from one more evaluation, on round 1's held-out prompts (`compare_on`): the evaluate stage
run in `<run-root>/<gold>-seed<seed>-round2-vs-round1/` on round 1's data with round 2's SFT policy (round 1's
aligned policy), adapter and reward model. The row's "round 2 − round 1" is its gold gain at equal length (the plain
gain for `concise`, a gold about length) with its bootstrap interval, on the same prompts as round 1's own row, and
round 2 *improved* when that interval is above 0.

Like `edgerlhf known-answer`, a benchmark, not a test: it reports, it does not tune.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from edgerlhf import gold
from edgerlhf.config import next_round
from edgerlhf.contract import (ALGORITHMS, CONFIG_FILE, EVAL_GEN_BATCH, PPO_ADAPTER, SFT_MERGED, merge_overrides,
                               reward_dir)
from edgerlhf.lab.known_answer import add_run_arguments, interval_text, run_one, start_runs

VOTER_ANSWERS = 2
"""Answers of the round-1 policy per prompt, for one vote each prompt."""
VOTER = "round-1 policy"
"""The model the simulated votes name on both sides (two samples of one model: pairs, no rating)."""


def simulate_votes(run_dir: Path, gold_name: str, out: Path, seed: int = 0) -> dict[str, Any]:
    """The gold's votes on two answers of the run's aligned policy to each of its training prompts, written to `out`
    as the Arena's snapshot writes votes; returns what was voted (`votes`, `ties`, `pairs`, `file`)."""
    import torch

    from edgerlhf import votes
    from edgerlhf.data import prompts
    from edgerlhf.generation import Sampling, generate
    from edgerlhf.models import load_policy, read_run_config

    config = read_run_config(run_dir)
    model, tokenizer = load_policy(run_dir, "ppo", config.device)
    asked = [row["prompt"] for row in prompts(run_dir, "train")]
    sampling = Sampling.of(config.ppo)
    answers: list[list[str]] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(0, len(asked), EVAL_GEN_BATCH):
            batch = asked[i:i + EVAL_GEN_BATCH]
            drawn = [generate(model, tokenizer, batch, config.ppo.response_length, sampling).responses
                     for _ in range(VOTER_ANSWERS)]
            answers += [list(pair) for pair in zip(*drawn)]
    cast, ties = [], 0
    for vote_id, (prompt, (a, b)) in enumerate(zip(asked, answers), start=1):
        better = gold.prefers(prompt, a, b, gold_name)
        ties += better is None
        cast.append({"id": vote_id, "prompt": prompt, "model_a": VOTER, "model_b": VOTER, "answer_a": a,
                     "answer_b": b, "choice": "tie" if better is None else "a" if better else "b", "better": None})
    lines = list(votes.export_lines(cast))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(lines), encoding="utf-8")
    return {"votes": len(cast), "ties": ties, "pairs": len(lines), "file": str(out)}


def round_two(parent: Path, votes_file: Path, mix: float) -> dict[str, Any]:
    """The overrides that make a run round 2 of `parent` on the votes of `votes_file` (`mix`: their share of the
    training pairs; 1, the votes alone)."""
    stored = json.loads((parent / CONFIG_FILE).read_text())
    return {"round": next_round(parent, stored), "data": {"votes_file": str(votes_file), "votes_weight": mix}}


def compare_on(first: Path, second: Path, out: Path) -> dict[str, Any]:
    """Round `second`'s aligned policy against its SFT policy (round `first`'s aligned policy) on `first`'s held-out
    prompts: the evaluate stage in `out`, on a copy of `first`'s data and of `second`'s SFT policy, adapter and reward
    model, with `second`'s config. Returns the figures of the evaluate report (as `known_answer.run_one`'s row)."""
    from edgerlhf.context import RunContext
    from edgerlhf.models import read_run_config
    from edgerlhf.pipeline import run_stage

    config = read_run_config(second)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copytree(first / "data", out / "data")
    for part in (SFT_MERGED, PPO_ADAPTER, reward_dir(config.ppo.reward_precision)):
        if (second / part).is_dir():
            shutil.copytree(second / part, out / part)
    (out / CONFIG_FILE).write_text(config.to_json())
    ev = run_stage("evaluate", config, RunContext(out))
    content = gold.get_scorer(config.data.gold_scorer).balance_length
    decisive = ev.gold_diff_equal_length if content else ev.gold_diff
    return {"run_dir": str(out), "n_prompts": ev.n_prompts, "gold_diff": ev.gold_diff.model_dump(),
            "gold_diff_equal_length": ev.gold_diff_equal_length.model_dump(),
            "length_diff": ev.length_diff.model_dump(), "kl": ev.kl,
            "learned": decisive.low is not None and decisive.low > 0.0}


def run_rounds(gold_name: str, seed: int, base: Path, overrides: dict[str, Any], algorithm: str = "ppo",
               mix: float = 1.0) -> dict[str, Any]:
    """Round 1 in `base`, the simulated votes, round 2 in `<base>-round2`, and round 2 against round 1 on round 1's
    held-out prompts in `<base>-round2-vs-round1`; the table row."""
    second_dir, versus = base.with_name(f"{base.name}-round2"), base.with_name(f"{base.name}-round2-vs-round1")
    for where in (base, second_dir, versus):
        shutil.rmtree(where, ignore_errors=True)  # what an interrupted run left
    first = run_one(gold_name, seed, base, overrides, algorithm)
    voted = simulate_votes(base, gold_name, base.with_name(f"{base.name}-votes.jsonl"), seed)
    second = run_one(gold_name, seed, second_dir, merge_overrides(overrides, round_two(base, Path(voted["file"]), mix)),
                     algorithm)
    compared = compare_on(base, second_dir, versus)
    return {"gold": gold_name, "seed": seed, "algorithm": algorithm, "mix": mix, "content": first["content"],
            "round1": first, "votes": voted, "round2": second, "round2_vs_round1": compared,
            "improved": compared["learned"]}


def table(rows: list[dict[str, Any]]) -> str:
    """One row per seed: round 1's gain over SFT, the votes, round 2's gain over round 1 (both on round 1's held-out
    prompts); then the count."""
    lines = ["| gold | algorithm | votes share | seed | round 1 − SFT | votes (ties) | round 2 − round 1 | "
             "length Δ round 2 (tokens) | KL round 2 | RM accuracy round 2 | improved |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        key = "gold_diff_equal_length" if r["content"] else "gold_diff"
        one, two, versus = r["round1"], r["round2"], r["round2_vs_round1"]
        lines.append(f"| {r['gold']} | {r['algorithm']} | {r['mix']:g} | {r['seed']} | {interval_text(one[key])} | "
                     f"{r['votes']['votes'] - r['votes']['ties']} ({r['votes']['ties']}) | "
                     f"{interval_text(versus[key])} | {versus['length_diff']['mean']:+.1f} | {versus['kl']:.2f} | "
                     f"{two['reward_accuracy']:.3f} | {'yes' if r['improved'] else 'no'} |")
    lines.append("")
    for name, algorithm, mix in dict.fromkeys((r["gold"], r["algorithm"], r["mix"]) for r in rows):
        runs = [r for r in rows if (r["gold"], r["algorithm"], r["mix"]) == (name, algorithm, mix)]
        what = "gain at equal length" if runs[0]["content"] else "plain gain: a gold about length"
        lines.append(f"- `{name}` with {algorithm}, votes {mix:g} of the pairs: round 2 beat round 1 in "
                     f"{sum(r['improved'] for r in runs)} of {len(runs)} seeds ({what} above 0)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgerlhf rounds", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gold", default="question", choices=list(gold.SCORERS),
                        help="the gold that labels round 1's pairs and votes on round 1's answers (default: question)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds (default: 0 1 2)")
    parser.add_argument("--algorithm", default="ppo", choices=list(ALGORITHMS),
                        help="alignment algorithm of both rounds (default: ppo)")
    parser.add_argument("--mix", type=float, default=1.0,
                        help="the votes' share of round 2's training pairs, in (0, 1]: 1 (default), the votes alone; "
                             "below 1, mixed with round 1's gold-labelled pairs (data.votes_weight)")
    add_run_arguments(parser)
    args = parser.parse_args(argv)
    try:
        if not 0 < args.mix <= 1:
            raise ValueError(f"--mix must be in (0, 1], got {args.mix}")
        overrides, root, done = start_runs(args, "edgerlhf rounds")
    except ValueError as exc:
        print(f"edgerlhf rounds: {exc}", file=sys.stderr)
        return 2
    rows = list(done)
    for seed in args.seeds:
        identity = {"gold": args.gold, "seed": seed, "algorithm": args.algorithm, "mix": args.mix}
        if any(all(r.get(k) == v for k, v in identity.items()) for r in done):
            continue
        row = run_rounds(args.gold, seed, root / f"{args.gold}-seed{seed}", overrides, args.algorithm, args.mix)
        rows.append(row)
        key = "gold_diff_equal_length" if row["content"] else "gold_diff"
        print(f"{args.gold} seed {seed}: round 1 − SFT {interval_text(row['round1'][key])}, round 2 − round 1 "
              f"{interval_text(row['round2_vs_round1'][key])} after {row['votes']['pairs']} voted pairs "
              f"({row['round1']['seconds'] + row['round2']['seconds']:.0f}s)", file=sys.stderr)
        if args.out:
            Path(args.out).write_text(json.dumps(rows, indent=2))
    print(table(rows))
    print(f"runs: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
